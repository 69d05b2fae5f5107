"""Mask math: pure functions from weights to boolean masks.

Everything here takes and returns tensors and uses `keras.ops` only, so it
runs inside a compiled training step on any backend and can be tested on its
own. A mask is `True` where a weight is kept.
"""

import math

import keras
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


def _histogram(digits, length):
    """Counts of each value in `[0, length)` of a non-negative int32 tensor.

    Values `>= length` are not counted. `length` is a Python int, so the
    output shape is static: the histogram compiles under XLA and `jax.jit`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        # `ops.bincount` sizes its output from the data (no XLA), and
        # TensorFlow's segment sum is ~20x slower than its bincount on CPU.
        import tensorflow as tf

        return tf.raw_ops.DenseBincount(
            input=digits,
            size=length,
            weights=tf.zeros((0,), "int32"),
            binary_output=False,
        )
    if backend == "torch":
        digits = ops.minimum(digits, length)
        return ops.bincount(digits, minlength=length + 1)[:length]
    # Segment sums drop the out-of-range segment ids.
    return ops.segment_sum(
        ops.ones_like(digits), digits, num_segments=length, sorted=False
    )


def _digit_widths(total_bits, size):
    """Radix digit widths, most significant first, for `total_bits` keys.

    Tensors of 2^16 entries or more take 16-bit digits (2 passes over
    float32 bits); smaller ones 11-bit digits (3 passes), where 64k-bucket
    histograms would cost more than the extra pass.
    """
    max_bits = 16 if size >= 2**16 else 11
    passes = max(1, math.ceil(total_bits / max_bits))
    base, extra = divmod(total_bits, passes)
    return [base + 1] * extra + [base] * (passes - extra)


def _locate(counts, rank):
    """The bucket holding the `rank`-th largest key, from bucket counts.

    Args:
        counts: 1-D int32 tensor, the count of keys in each bucket (buckets
            ordered by key); its length is a power of 2.
        rank: Scalar int32 tensor, `1 <= rank <= sum(counts)`.

    Returns:
        A tuple `(bucket, above)`: the bucket index and the count of keys in
        the buckets after it.
    """
    length = counts.shape[0]
    if length > 4096:
        # Two levels (rows, then a bucket within the row): a suffix sum
        # over 64k buckets would cost as much as a pass over the keys.
        width = 1 << (length.bit_length() // 2)
        grid = ops.reshape(counts, (length // width, width))
        row, above_row = _locate(ops.sum(grid, axis=1), rank)
        column, above_column = _locate(
            ops.take(grid, row, axis=0), rank - above_row
        )
        return row * width + column, above_row + above_column
    at_or_above = ops.flip(ops.cumsum(ops.flip(counts, 0)), 0)
    bucket = ops.sum(ops.cast(at_or_above >= rank, "int32")) - 1
    return bucket, ops.take(at_or_above, bucket) - ops.take(counts, bucket)


def _select_kth_largest(keys, k, total_bits):
    """Radix select: the `k`-th largest of non-negative int32 `keys`.

    Each pass reads the keys once and histograms the next digit of those
    that still match the prefix found so far, so the cost is a few reads of
    the tensor whatever `k`, with no sort.

    Args:
        keys: 1-D int32 tensor, values in `[0, 2**total_bits)`.
        k: Scalar int32 tensor, `1 <= k <= len(keys)`.
        total_bits: Python int, the key width.

    Returns:
        A tuple `(key, rank, ties)` of scalar int32 tensors: the `k`-th
        largest key, the rank `k` asks for among the entries equal to it
        (`k` minus the count of larger keys), and the count of entries
        equal to it.
    """
    prefix = ops.zeros((), "int32")
    rank = ops.cast(k, "int32")
    shift = total_bits
    for index, width in enumerate(_digit_widths(total_bits, keys.shape[0])):
        shift -= width
        buckets = 1 << width
        digits = ops.right_shift(keys, shift) if shift else keys
        if index:
            # Keys that match the prefix get their next digit, in
            # [0, buckets); the others differ in a higher bit, so they land
            # at >= buckets, which the histogram leaves out.
            digits = ops.bitwise_xor(digits, prefix * buckets)
        counts = ops.cast(_histogram(digits, buckets), "int32")
        digit, above = _locate(counts, rank)
        rank = rank - above
        prefix = prefix * buckets + digit
    return prefix, rank, ops.take(counts, digit)


def top_k_mask(scores, k):
    """Keeps exactly the `k` largest entries of a 1-D tensor of scores.

    Ties at the threshold are broken by position: among equal scores the
    lower index is kept, so exactly `k` entries are kept whatever the ties.
    The threshold is found by a radix select on the float32 bit patterns
    (non-negative floats order like their bits as int32): a few reads of
    the scores, no sort. Ties, when only some of them are kept, take one
    more radix select on their positions.

    Args:
        scores: 1-D float tensor of non-negative, NaN-free scores, without
            `-0.0` (`ops.abs` gives `+0.0`).
        k: Scalar int tensor, `1 <= k <= len(scores)`.

    Returns:
        A tuple `(mask, threshold)`: the boolean keep-mask and the smallest
        kept score (float32).

    Example:

    >>> mask, threshold = top_k_mask(np.array([3.0, 1.0, 2.0, 2.0]), 2)
    >>> ops.convert_to_numpy(mask)
    array([ True, False,  True, False])
    """
    size = scores.shape[0]
    keys = ops.view(ops.cast(scores, "float32"), "int32")
    key, rank, ties = _select_kth_largest(keys, k, 31)

    def keep_all_ties():
        return ops.greater_equal(keys, key)

    def keep_lowest_ties():
        # Tied positions keyed so that a lower index is a larger key.
        tied = ops.equal(keys, key)
        positions = ops.where(
            tied, size - ops.arange(size, dtype="int32"), ops.zeros((), "int32")
        )
        last, _, _ = _select_kth_largest(positions, rank, size.bit_length())
        return ops.logical_or(
            ops.greater(keys, key), ops.greater_equal(positions, last)
        )

    keep = ops.cond(ops.equal(rank, ties), keep_all_ties, keep_lowest_ties)
    return keep, ops.view(key, "float32")


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
