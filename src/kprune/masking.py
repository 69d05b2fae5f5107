"""Mask math: pure functions from weights to boolean masks.

Everything here takes and returns tensors and uses `keras.ops` only, so it
runs inside a compiled training step on any backend and can be tested on its
own. A mask is `True` where a weight is kept.
"""

import math

from keras import ops


def kept_count(size: int, sparsity):
    """Number of entries kept out of `size` at `sparsity`.

    It is `max(round(size * (1 - sparsity)), 1)`, computed in float32 with
    round-half-to-even as in `tfmot`, so at least one entry always survives.

    Args:
        size: Number of entries (a Python int).
        sparsity: Scalar float tensor or number in `[0, 1]`.

    Returns:
        A scalar int32 tensor.
    """
    dense = ops.cast(size, "float32") * (1.0 - ops.cast(sparsity, "float32"))
    return ops.maximum(ops.cast(ops.round(dense), "int32"), 1)


def top_k_mask(scores, k):
    """Keeps exactly the `k` largest entries of a 1-D tensor of scores.

    Ties at the threshold are broken by position: among equal scores the
    lower index is kept, so exactly `k` entries are kept whatever the ties.

    Args:
        scores: 1-D float tensor of non-negative scores.
        k: Scalar int tensor, `1 <= k <= len(scores)`.

    Returns:
        A tuple `(mask, threshold)`: the boolean keep-mask and the smallest
        kept score.
    """
    size = scores.shape[0]
    values, _ = ops.top_k(scores, size, sorted=True)
    threshold = ops.take(values, k - 1)
    above = ops.greater(scores, threshold)
    tied = ops.equal(scores, threshold)
    room = k - ops.sum(ops.cast(above, "int32"))
    tie_rank = ops.cumsum(ops.cast(tied, "int32"))
    keep = ops.logical_or(
        above, ops.logical_and(tied, ops.less_equal(tie_rank, room))
    )
    return keep, threshold


def magnitude_mask(weights, sparsity):
    """Unstructured magnitude mask of one weight tensor.

    Zeroes exactly `n - kept_count(n, sparsity)` of the `n` entries: those
    of smallest absolute value, ties broken towards keeping lower flat
    indices.

    Args:
        weights: Float tensor of any shape.
        sparsity: Scalar target sparsity in `[0, 1)`.

    Returns:
        A tuple `(mask, threshold)`: boolean mask of `weights.shape` and the
        smallest kept magnitude.
    """
    scores = ops.reshape(ops.abs(ops.cast(weights, "float32")), (-1,))
    keep, threshold = top_k_mask(scores, kept_count(scores.shape[0], sparsity))
    return ops.reshape(keep, weights.shape), threshold


def _block_scores(weights, block_size, pooling_type):
    rows, cols = weights.shape
    bh, bw = block_size
    pad_rows = math.ceil(rows / bh) * bh - rows
    pad_cols = math.ceil(cols / bw) * bw - cols
    grid = (math.ceil(rows / bh), bh, math.ceil(cols / bw), bw)
    magnitudes = ops.pad(
        ops.abs(ops.cast(weights, "float32")), ((0, pad_rows), (0, pad_cols))
    )
    magnitudes = ops.reshape(magnitudes, grid)
    if pooling_type == "MAX":
        return ops.max(magnitudes, axis=(1, 3))
    # Average over the real entries only, as TensorFlow's SAME pooling does.
    valid = ops.pad(
        ops.ones((rows, cols), "float32"), ((0, pad_rows), (0, pad_cols))
    )
    counts = ops.sum(ops.reshape(valid, grid), axis=(1, 3))
    return ops.sum(magnitudes, axis=(1, 3)) / counts


def block_mask(weights, sparsity, block_size, pooling_type="AVG"):
    """Block-sparse magnitude mask of a rank-2 weight tensor.

    The tensor is tiled into `block_size` blocks (edge blocks may be
    partial); each block is scored by the average (`"AVG"`) or maximum
    (`"MAX"`) magnitude of its entries, and exactly
    `nb - kept_count(nb, sparsity)` of the `nb` blocks are zeroed.

    Args:
        weights: Rank-2 float tensor.
        sparsity: Scalar target sparsity in `[0, 1)`.
        block_size: `(block_height, block_width)`.
        pooling_type: `"AVG"` or `"MAX"`.

    Returns:
        A tuple `(mask, threshold)`: boolean mask of `weights.shape` and the
        smallest kept block score.
    """
    rows, cols = weights.shape
    bh, bw = block_size
    scores = _block_scores(weights, block_size, pooling_type)
    grid_shape = scores.shape
    flat = ops.reshape(scores, (-1,))
    keep, threshold = top_k_mask(flat, kept_count(flat.shape[0], sparsity))
    keep = ops.reshape(keep, grid_shape)
    keep = ops.repeat(ops.repeat(keep, bh, axis=0), bw, axis=1)
    return keep[:rows, :cols], threshold


def m_by_n_mask(weights, m_by_n, axis=-2):
    """N:M mask: `m` zeros in every `n` consecutive input channels.

    Groups run along the input-channel axis (`axis`: -2 for Dense and Conv
    kernels, -1 for transposed convolutions; the last axis in TFLite's
    layout). In each group the `n - m`
    entries of largest magnitude are kept (ties towards the lower index). A
    trailing group shorter than `n`, when the channel count is not a
    multiple of `n`, keeps `min(n - m, its length)` entries.

    Args:
        weights: Float tensor of rank >= 2.
        m_by_n: `(m, n)` with `0 < m < n`.
        axis: The input-channel axis of `weights`.

    Returns:
        A tuple `(mask, threshold)`: boolean mask of `weights.shape` and the
        smallest kept magnitude.
    """
    m, n = m_by_n
    magnitudes = ops.abs(ops.cast(weights, "float32"))
    channels_last = ops.moveaxis(magnitudes, axis, -1)
    moved_shape = channels_last.shape
    channels = moved_shape[-1]
    rows = ops.reshape(channels_last, (-1, channels))
    padding = math.ceil(channels / n) * n - channels
    # Padding scores -1 ranks below every real magnitude, so short groups
    # keep their real entries first.
    rows = ops.pad(rows, ((0, 0), (0, padding)), constant_values=-1.0)
    groups = ops.reshape(rows, (rows.shape[0], -1, n))
    _, kept = ops.top_k(groups, n - m, sorted=False)
    keep = ops.any(ops.one_hot(kept, n, dtype="int32") > 0, axis=-2)
    keep = ops.reshape(keep, (rows.shape[0], -1))[:, :channels]
    keep = ops.moveaxis(ops.reshape(keep, moved_shape), -1, axis)
    threshold = ops.min(ops.where(keep, magnitudes, float("inf")))
    return keep, threshold


def compute_mask(
    weights,
    sparsity,
    block_size=(1, 1),
    pooling_type="AVG",
    m_by_n=None,
    m_by_n_axis=-2,
):
    """Dispatches to the N:M, block or unstructured mask.

    Args:
        weights: Float tensor.
        sparsity: Scalar target sparsity (ignored by N:M, whose pattern
            fixes the sparsity at `m / n`).
        block_size: `(1, 1)` for unstructured pruning, else a block shape
            for rank-2 weights.
        pooling_type: `"AVG"` or `"MAX"`, for blocks.
        m_by_n: `None`, or `(m, n)` for N:M sparsity.
        m_by_n_axis: The input-channel axis, for N:M.

    Returns:
        A tuple `(mask, threshold)`.
    """
    if m_by_n is not None:
        return m_by_n_mask(weights, m_by_n, m_by_n_axis)
    if tuple(block_size) != (1, 1):
        return block_mask(weights, sparsity, block_size, pooling_type)
    return magnitude_mask(weights, sparsity)
