"""Mask math: pure functions from weights to boolean masks.

Everything here takes and returns tensors and uses `keras.ops` only, so it
runs inside a compiled training step on any backend and can be tested on its
own. A mask is `True` where a weight is kept.
"""

import functools
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


# Tensors of this many entries or more take 16-bit radix digits.
_WIDE_DIGITS_FROM = 2**18


def _digit_widths(total_bits, size):
    """Radix digit widths, most significant first, for `total_bits` keys.

    Tensors of `_WIDE_DIGITS_FROM` entries or more take 16-bit digits (2
    passes over float32 bits); smaller ones 11-bit digits (3 passes),
    where 64k-bucket histograms cost more than the extra pass (measured
    on TensorFlow's CPU histogram, benchmarks/README.md).
    """
    max_bits = 16 if size >= _WIDE_DIGITS_FROM else 11
    passes = max(1, math.ceil(total_bits / max_bits))
    base, extra = divmod(total_bits, passes)
    return [base + 1] * extra + [base] * (passes - extra)


_INT32_MAX = 2**31 - 1


def _locate(counts, rank):
    """The bucket holding the `rank`-th largest key, from bucket counts.

    Written without gathers: a gather of a computed index takes several
    graph operations on TensorFlow (negative-index handling), and every
    operation of the training step's graph costs memory for as long as
    the step function lives.

    Args:
        counts: 1-D int32 tensor, the count of keys in each bucket (buckets
            ordered by key); its length is a power of 2.
        rank: Scalar int32 tensor, `1 <= rank <= sum(counts)`.

    Returns:
        A tuple `(bucket, above, count)`: the bucket index, the count of
        keys in the buckets after it, and the count in the bucket.
    """
    length = counts.shape[0]
    if length > 4096:
        # Two levels (rows, then a bucket within the row): a suffix sum
        # over 64k buckets would cost as much as a pass over the keys.
        width = 1 << (length.bit_length() // 2)
        grid = ops.reshape(counts, (length // width, width))
        row, above_row, _ = _locate(ops.sum(grid, axis=1), rank)
        row_counts = ops.reshape(ops.slice(grid, (row, 0), (1, width)), [-1])
        column, above_column, count = _locate(row_counts, rank - above_row)
        return row * width + column, above_row + above_column, count
    # Counts from the top bucket down: `at_or_above[j]` counts the keys in
    # bucket `length - 1 - j` and above. It does not decrease, so the
    # buckets above the one sought are those where it is below `rank`; the
    # largest of those sums is the count above it, and the smallest of the
    # others the count from it up.
    at_or_above = ops.cumsum(ops.flip(counts, 0), axis=0)
    above_it = at_or_above < rank
    bucket = length - 1 - ops.sum(ops.cast(above_it, "int32"))
    above = ops.max(ops.where(above_it, at_or_above, 0))
    from_it = ops.min(ops.where(above_it, _INT32_MAX, at_or_above))
    return bucket, above, from_it - above


# A tensor of more entries than this is read in chunks of this many, so
# that a mask update holds no full-size temporary besides its mask: the
# update runs in the training step's forward pass, and full-size keys of
# the largest weight would raise the step's peak memory above plain Keras.
_CHUNK = 2**20


def _loop(count, body, init):
    """`ops.fori_loop(0, count, body, init)`, one iteration at a time."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # By default TensorFlow runs 10 iterations at once, each holding
        # its own chunk's temporaries.
        return tf.while_loop(
            lambda i, value: i < count,
            lambda i, value: (i + 1, body(i, value)),
            (ops.zeros((), "int32"), init),
            parallel_iterations=1,
        )[1]
    return ops.fori_loop(0, count, body, init)


def _fold_chunks(values, fn, init):
    """Folds `fn(accumulator, chunk, start)` over the chunks of 1-D
    `values`, in order, from `init()`; `start` is the chunk's first index.
    A tensor of one chunk is folded from `None` (`init` is not called, so
    the graph holds no unused initial value)."""
    size = values.shape[0]
    if size is None:
        # A tensor of any size, which the caller keeps to one chunk.
        return fn(None, values, 0)
    full, rest = divmod(size, _CHUNK)
    if full <= 1:
        return fn(None, values, 0)

    def body(i, accumulator):
        start = i * _CHUNK
        return fn(accumulator, ops.slice(values, (start,), (_CHUNK,)), start)

    accumulator = _loop(full, body, init())
    if rest:
        accumulator = fn(accumulator, values[full * _CHUNK :], full * _CHUNK)
    return accumulator


def _keys(scores):
    """Non-negative float32 scores as int32 keys that order alike."""
    scores = ops.cast(scores, "float32")
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Keras's `view` on TensorFlow needs a static last dimension, which
        # `_any_length`'s traced function has not.
        return tf.bitcast(scores, tf.int32)
    return ops.view(scores, "int32")


def _count_digits(counts, chunk, start, keys_of, shift, base, buckets):
    """Adds to `counts` (or to nothing, when `None`) the histogram of one
    radix digit of a chunk's keys (`_select_kth_largest`)."""
    digits = keys_of(chunk)
    if shift:
        digits = ops.right_shift(digits, shift)
    if base is not None:
        # Keys that match the prefix get their next digit, in [0, buckets);
        # the others differ in a higher bit, so they land at >= buckets,
        # which the histogram leaves out.
        digits = ops.bitwise_xor(digits, base)
    histogram = ops.cast(_histogram(digits, buckets), "int32")
    return histogram if counts is None else counts + histogram


def _select_kth_largest(values, keys_of, k, total_bits=31, size=None):
    """Radix select: the `k`-th largest score of 1-D `values`.

    Each pass reads the values once, in chunks, and histograms the next
    digit of the keys of those that still match the prefix found so far,
    so the cost is a few reads of the tensor whatever `k`, with no sort.

    Args:
        values: 1-D tensor: scores, or their keys.
        keys_of: Function from a chunk of `values` to its int32 keys
            (`_keys`, or `_same` when `values` are keys already).
        k: Scalar int32 tensor, `1 <= k <= len(values)`.
        total_bits: Python int, the key width: keys are in
            `[0, 2**total_bits)`.
        size: Python int that picks the digit widths, by default
            `len(values)` (needed when that is not known while tracing).

    Returns:
        A tuple `(key, rank, ties)` of scalar int32 tensors: the key of the
        `k`-th largest score, the rank `k` asks for among the entries with
        that key (`k` minus the count of larger keys), and the count of
        entries with that key.
    """
    prefix = None
    rank = ops.cast(k, "int32")
    shift = total_bits
    size = values.shape[0] if size is None else size
    for index, width in enumerate(_digit_widths(total_bits, size)):
        shift -= width
        buckets = 1 << width

        counts = _fold_chunks(
            values,
            functools.partial(
                _count_digits,
                keys_of=keys_of,
                shift=shift,
                base=prefix * buckets if index else None,
                buckets=buckets,
            ),
            functools.partial(ops.zeros, (buckets,), "int32"),
        )
        digit, above, ties = _locate(counts, rank)
        rank = rank - above
        prefix = prefix * buckets + digit if index else digit
    return prefix, rank, ties


def _last_kept_tie(values, keys_of, key, rank):
    """The index of the `rank`-th entry (in index order) whose key is
    `key`, found chunk by chunk."""

    def initial():
        return ops.cast(rank, "int32"), ops.zeros((), "int32")

    def find(state, chunk, start):
        remaining, found = state or initial()
        tied = ops.cast(ops.equal(keys_of(chunk), key), "int32")
        seen = ops.cumsum(tied)
        here = ops.logical_and(remaining > 0, remaining <= seen[-1])
        position = ops.argmax(ops.cast(seen >= remaining, "int32"))
        found = ops.where(here, start + ops.cast(position, "int32"), found)
        return remaining - seen[-1], found

    return _fold_chunks(values, find, initial)[1]


def _prefix_mask(size, last):
    """Boolean `[0, size)` that is True up to index `last` included.

    Built as a `(rows, columns)` grid of row and column comparisons, so it
    holds no full-size int32 positions (unless `size` is odd).
    """
    columns = math.gcd(size, 4096)
    rows = ops.arange(size // columns, dtype="int32")[:, None]
    cols = ops.arange(columns, dtype="int32")[None, :]
    row, col = last // columns, last % columns
    grid = ops.logical_or(rows < row, ops.logical_and(rows == row, cols <= col))
    return ops.reshape(grid, (size,))


def _top_k(values, score, compare, k, size=None):
    """The mask of the `k` largest scores of 1-D `values` (see
    `top_k_mask`).

    Args:
        values: 1-D float tensor.
        score: Function from a chunk of `values` to its non-negative,
            NaN-free float scores.
        compare: Function from `values`, a threshold score and a
            comparison (`"above"`, `"at_least"` or `"equal"`) to the boolean
            tensor of the entries whose score compares so.
        k: Scalar int32 tensor, `1 <= k <= len(values)`.
        size: `None`, or when `values` has no static length (a traced
            function of any length, at most `_CHUNK`), a length of the same
            digit widths (`_digit_widths`).
    """
    if size is None:
        size = values.shape[0]
    if size <= _CHUNK:
        # Small enough to hold: compute the keys once, and compare keys.
        values = _keys(score(values))
        keys_of = _same
        compare = _compare
    else:

        def keys_of(chunk):
            return _keys(score(chunk))

    key, rank, ties = _select_kth_largest(values, keys_of, k, size=size)
    bound = key if size <= _CHUNK else ops.view(key, "float32")

    def keep_all_ties():
        return compare(values, bound, "at_least")

    def keep_lowest_ties():
        above = compare(values, bound, "above")
        tied = compare(values, bound, "equal")
        if size <= _CHUNK:
            # Keys of this size are held already: so can the running count.
            kept = ops.cumsum(ops.cast(tied, "int32")) <= rank
        else:
            last = _last_kept_tie(values, keys_of, key, rank)
            kept = _prefix_mask(size, last)
        return ops.logical_or(above, ops.logical_and(tied, kept))

    keep = ops.cond(ops.equal(rank, ties), keep_all_ties, keep_lowest_ties)
    return keep, ops.view(key, "float32")


def _same(values):
    return values


# The comparisons of a score with the threshold, and their mirror images
# for negative weights.
_COMPARISONS = {
    "above": (ops.greater, ops.less),
    "at_least": (ops.greater_equal, ops.less_equal),
    "equal": (ops.equal, ops.equal),
}


def _compare(scores, threshold, comparison):
    return _COMPARISONS[comparison][0](scores, threshold)


def _compare_magnitudes(weights, threshold, comparison):
    # |w| >= t is w >= t or w <= -t: two boolean temporaries rather than a
    # full-size float one.
    compare, mirrored = _COMPARISONS[comparison]
    return ops.logical_or(
        compare(weights, threshold), mirrored(weights, -threshold)
    )


def top_k_mask(scores, k):
    """Keeps exactly the `k` largest entries of a 1-D tensor of scores.

    Ties at the threshold are broken by position: among equal scores the
    lower index is kept, so exactly `k` entries are kept whatever the ties.
    The threshold is found by a radix select on the float32 bit patterns
    (non-negative floats order like their bits as int32): a few reads of
    the scores, in chunks, no sort. Ties, when only some of them are kept,
    take one more read to find the last kept one.

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
    scores = ops.cast(scores, "float32")
    return _top_k(scores, _same, _compare, k)


def magnitude_mask(weights, sparsity):
    """Unstructured magnitude mask of one weight tensor.

    Zeroes exactly `n - kept_count(n, sparsity)` of the `n` entries: those
    of smallest absolute value, ties broken towards keeping lower flat
    indices. Large tensors are read in chunks: besides the mask, the
    update holds no full-size temporary.

    Args:
        weights: Float tensor of any shape.
        sparsity: Scalar target sparsity in `[0, 1)`.

    Returns:
        A tuple `(mask, threshold)`: boolean mask of `weights.shape` and the
        smallest kept magnitude.
    """
    flat = ops.reshape(ops.cast(weights, "float32"), (-1,))
    k = kept_count(flat.shape[0], sparsity)
    if flat.shape[0] <= _CHUNK and _tracing_tensorflow():
        keep, threshold = _any_length(flat, k)
    else:
        keep, threshold = _magnitude_top_k(None, flat, k)
    return ops.reshape(keep, weights.shape), threshold


def _magnitude_top_k(size, flat, k):
    return _top_k(flat, ops.abs, _compare_magnitudes, k, size=size)


def _tracing_tensorflow():
    """Whether this call is being traced into a TensorFlow graph (a
    compiled training step)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.inside_function()


# On TensorFlow, the magnitude masks of tensors of up to `_CHUNK` entries,
# as `tf.function`s of 1-D tensors of any length: one per digit widths.
_ANY_LENGTH = {}


def _any_length(flat, k):
    """`_top_k` of the magnitudes of 1-D `flat` (at most `_CHUNK` entries)
    while TensorFlow traces a graph.

    One traced function serves every length of the same digit widths:
    each operation of a training step's graph holds memory for as long as
    the step function lives, and a model's weights come in many shapes
    (benchmarks/README.md).
    """
    import tensorflow as tf

    # The smallest length of each digit width.
    size = _WIDE_DIGITS_FROM if flat.shape[0] >= _WIDE_DIGITS_FROM else 1
    if size not in _ANY_LENGTH:
        _ANY_LENGTH[size] = tf.function(
            functools.partial(_magnitude_top_k, size),
            input_signature=[
                tf.TensorSpec([None], "float32"),
                tf.TensorSpec([], "int32"),
            ],
            autograph=False,
        )
    return _ANY_LENGTH[size](flat, ops.cast(k, "int32"))


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


def _one_graph_per_shape(fn):
    """`fn(weights, sparsity, ...)`, traced once per weight shape and
    options when called inside a TensorFlow graph.

    Inside a compiled training step TensorFlow keeps heap memory for each
    operation of the step's graph for as long as the step function lives
    (about 20 KiB each, benchmarks/README.md), and traces each of them. A
    mask update is 100 to 300 operations; models repeat weight shapes
    (the blocks of a transformer or a ResNet), and as its own
    `tf.function` one traced graph serves every weight of a shape. Other
    backends, and eager calls, run `fn` itself.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    traced = tf.function(fn, autograph=False)

    @functools.wraps(fn)
    def call(weights, sparsity, *args, **kwargs):
        if not _tracing_tensorflow():
            return fn(weights, sparsity, *args, **kwargs)
        # A tensor, so that each sparsity does not trace again.
        sparsity = ops.cast(sparsity, "float32")
        return traced(weights, sparsity, *args, **kwargs)

    return call


@_one_graph_per_shape
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
