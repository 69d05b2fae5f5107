"""The radix-select mask path against a sorting reference.

`masking.top_k_mask` finds the threshold by a radix select on the float32
bit patterns, not by a sort; these tests pin it to NumPy sorting on random,
tied, tiny, special-valued and larger tensors, on both digit widths (11-bit
digits below 2^18 entries, 16-bit from there) and on the tie path.
"""

import numpy as np
import pytest
from keras import ops

from kprune import masking
from testing import reference_kept
from testing import reference_magnitude_mask
from testing import requires_tensorflow
from testing import slow_except


def as_np(x):
    return ops.convert_to_numpy(x)


def assert_matches_reference(weights, sparsity):
    mask, threshold = masking.magnitude_mask(weights, sparsity)
    expected = reference_magnitude_mask(weights, sparsity)
    mask = as_np(mask)
    assert mask.sum() == reference_kept(weights.size, sparsity)
    np.testing.assert_array_equal(mask, expected)
    assert float(threshold) == np.abs(weights)[expected].min()


SIZES = [1, 2, 3, 7, 100, 2049, 65536, 200_003, 2**18 - 1, 2**18 + 3]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, "1-1/n"])
def test_random_weights_match_sorting_reference(size, sparsity):
    if sparsity == "1-1/n":
        sparsity = 1 - 1 / size
    weights = np.random.default_rng(size).normal(size=size).astype("float32")
    assert_matches_reference(weights, sparsity)


@pytest.mark.parametrize("size", [5, 1000, 70_001, 2**18 + 5])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99, "1-1/n"])
def test_heavily_tied_weights_keep_lower_indices_first(size, sparsity):
    # Four distinct magnitudes: the threshold value is shared by thousands
    # of entries, of which only some are kept.
    if sparsity == "1-1/n":
        sparsity = 1 - 1 / size
    rng = np.random.default_rng(size)
    weights = rng.integers(-3, 4, size=size).astype("float32")
    assert_matches_reference(weights, sparsity)


@pytest.mark.parametrize("size", [3, 4096, 100_000])
def test_all_equal_weights_keep_a_prefix(size):
    weights = np.full(size, -0.25, "float32")
    mask, threshold = masking.magnitude_mask(weights, 0.75)
    kept = reference_kept(size, 0.75)
    mask = as_np(mask)
    assert mask[:kept].all() and not mask[kept:].any()
    assert float(threshold) == 0.25


def test_zeros_infinities_subnormals_and_extremes_order_by_magnitude():
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38],
        "float32",
    )
    weights = np.tile(special, 50)
    np.random.default_rng(0).shuffle(weights)
    for sparsity in (0.0, 0.1, 0.4, 0.5, 0.8, 0.99):
        assert_matches_reference(weights, sparsity)


def test_already_pruned_zeros_are_dropped_before_nonzeros():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(64, 32)).astype("float32")
    weights[rng.random(weights.shape) < 0.6] = 0.0
    for sparsity in (0.5, 0.6, 0.7):
        assert_matches_reference(weights, sparsity)


@pytest.mark.parametrize("total_bits", [1, 5, 17, 31])
def test_select_kth_largest_finds_key_rank_and_ties(total_bits):
    rng = np.random.default_rng(total_bits)
    keys = rng.integers(0, 2**total_bits, size=3000).astype("int32")
    ordered = np.sort(keys)[::-1]
    for k in (1, 2, 1500, 2999, 3000):
        key, rank, ties = masking._select_kth_largest(
            keys, lambda chunk: chunk, k, total_bits
        )
        expected = ordered[k - 1]
        assert int(key) == expected
        assert int(rank) == k - np.count_nonzero(keys > expected)
        assert int(ties) == np.count_nonzero(keys == expected)


@pytest.mark.parametrize(
    "total_bits,size", [(31, 10), (31, 2**16), (31, 2**18), (17, 9)]
)
def test_digit_widths_cover_the_key_in_at_most_three_passes(total_bits, size):
    widths = masking._digit_widths(total_bits, size)
    assert sum(widths) == total_bits
    assert max(widths) <= (16 if size >= masking._WIDE_DIGITS_FROM else 11)
    assert len(widths) <= 3


@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_mask_with_tied_block_scores_keeps_lower_blocks(pooling):
    weights = np.ones((12, 8), "float32")
    mask = as_np(masking.block_mask(weights, 0.5, (2, 2), pooling)[0])
    # 24 blocks all score 1: the first 12 in row-major block order stay.
    blocks = mask[::2, ::2].ravel()
    assert blocks[:12].all() and not blocks[12:].any()


@requires_tensorflow
@pytest.mark.parametrize("size", slow_except(1000, [1000, 70_001]))
def test_tie_path_is_identical_under_xla(size):
    import tensorflow as tf

    rng = np.random.default_rng(7)
    tied = rng.integers(-2, 3, size=size).astype("float32")
    distinct = rng.normal(size=size).astype("float32")

    @tf.function(jit_compile=True)
    def compiled(w, s):
        return masking.magnitude_mask(w, s)

    # A tensor sparsity, as training passes it: one XLA compilation for
    # every case (a Python float would retrace for each value).
    for weights in (tied, distinct):
        for sparsity in (0.0, 0.45, 0.99):
            mask, threshold = compiled(
                tf.constant(weights), tf.constant(sparsity)
            )
            expected = reference_magnitude_mask(weights, sparsity)
            np.testing.assert_array_equal(as_np(mask), expected)
            assert float(threshold) == np.abs(weights)[expected].min()


@pytest.mark.parametrize("size", [1500, 4000, 4096, 10_007])
@pytest.mark.parametrize("kind", ["random", "tied", "equal"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, "1-1/n"])
def test_chunked_reads_give_the_same_masks(monkeypatch, size, kind, sparsity):
    # Tensors above `_CHUNK` entries are read chunk by chunk, with the
    # last chunk shorter when the size is not a multiple; a small chunk
    # exercises that path on small tensors.
    monkeypatch.setattr(masking, "_CHUNK", 1000)
    if sparsity == "1-1/n":
        sparsity = 1 - 1 / size
    rng = np.random.default_rng(size)
    weights = {
        "random": rng.normal(size=size),
        "tied": rng.integers(-3, 4, size=size),
        "equal": np.full(size, -0.25),
    }[kind].astype("float32")
    assert_matches_reference(weights, sparsity)
