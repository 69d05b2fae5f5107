import keras
import numpy as np
import pytest
from keras import ops

from kprune import masking
from testing import reference_kept
from testing import reference_magnitude_mask
from testing import xla_compile


def as_np(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (5, 3), (3, 3, 2, 4)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99])
def test_magnitude_mask_matches_sorting_reference(shape, sparsity):
    weights = np.random.default_rng(0).normal(size=shape).astype("float32")
    mask, threshold = masking.magnitude_mask(weights, sparsity)
    expected = reference_magnitude_mask(weights, sparsity)
    np.testing.assert_array_equal(as_np(mask), expected)
    assert float(threshold) == np.abs(weights)[expected].min()


@pytest.mark.parametrize("size", [2, 3, 10, 97, 1000])
def test_magnitude_mask_count_is_exact_at_one_minus_one_over_n(size):
    weights = np.random.default_rng(size).normal(size=size).astype("float32")
    sparsity = 1 - 1 / size
    mask, _ = masking.magnitude_mask(weights, sparsity)
    assert np.count_nonzero(as_np(mask)) == reference_kept(size, sparsity)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_ties_are_broken_towards_lower_index_with_exact_count(sparsity):
    weights = np.ones((6, 4), "float32")
    weights[0, 0] = -1.0  # magnitudes all tie
    mask, _ = masking.magnitude_mask(weights, sparsity)
    kept = reference_kept(24, sparsity)
    flat = as_np(mask).ravel()
    assert flat.sum() == kept
    assert flat[:kept].all() and not flat[kept:].any()


def test_mixed_ties_keep_exactly_the_requested_count():
    weights = np.array([3, 1, 2, 2, 2, 0, 2, 5], "float32")
    mask, threshold = masking.magnitude_mask(weights, 0.5)
    np.testing.assert_array_equal(
        as_np(mask), [True, False, True, True, False, False, False, True]
    )
    assert float(threshold) == 2.0


def test_sparsity_zero_keeps_everything_and_high_sparsity_keeps_one():
    weights = np.random.default_rng(1).normal(size=50).astype("float32")
    assert as_np(masking.magnitude_mask(weights, 0.0)[0]).all()
    assert as_np(masking.magnitude_mask(weights, 0.999)[0]).sum() == 1


def reference_block_mask(weights, sparsity, block, pooling):
    rows, cols = weights.shape
    bh, bw = block
    gr, gc = -(-rows // bh), -(-cols // bw)
    scores = np.zeros((gr, gc), "float32")
    for i in range(gr):
        for j in range(gc):
            tile = np.abs(weights[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw])
            scores[i, j] = tile.max() if pooling == "MAX" else tile.mean()
    keep = reference_magnitude_mask(scores, sparsity)
    return np.repeat(np.repeat(keep, bh, 0), bw, 1)[:rows, :cols]


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (3, 10)])
@pytest.mark.parametrize("block", [(2, 2), (4, 1), (1, 3)])
@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_mask_matches_reference(shape, block, pooling):
    weights = np.random.default_rng(2).normal(size=shape).astype("float32")
    mask, _ = masking.block_mask(weights, 0.6, block, pooling)
    np.testing.assert_array_equal(
        as_np(mask), reference_block_mask(weights, 0.6, block, pooling)
    )


def test_block_mask_prunes_whole_blocks():
    weights = np.random.default_rng(3).normal(size=(16, 8)).astype("float32")
    mask = as_np(masking.block_mask(weights, 0.75, (4, 2), "AVG")[0])
    tiles = mask.reshape(4, 4, 4, 2).transpose(0, 2, 1, 3).reshape(16, 8)
    assert set(tiles.sum(axis=1)) <= {0, 8}
    assert (tiles.sum(axis=1) == 8).sum() == reference_kept(16, 0.75)


def groups_along_inputs(weights_or_mask, n):
    moved = np.moveaxis(weights_or_mask, -2, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    return [rows[:, i : i + n] for i in range(0, rows.shape[1], n)]


@pytest.mark.parametrize("shape", [(8, 5), (3, 3, 12, 4), (16, 2)])
@pytest.mark.parametrize("m_by_n", [(2, 4), (1, 4), (3, 8)])
def test_m_by_n_mask_has_exactly_m_zeros_per_group(shape, m_by_n):
    m, n = m_by_n
    weights = np.random.default_rng(4).normal(size=shape).astype("float32")
    mask = as_np(masking.m_by_n_mask(weights, m_by_n)[0])
    assert mask.shape == weights.shape
    for group, values in zip(
        groups_along_inputs(mask, n), groups_along_inputs(np.abs(weights), n)
    ):
        # A trailing group shorter than n keeps min(n - m, its length).
        assert (group.sum(axis=1) == min(n - m, group.shape[1])).all()
        kept_min = np.where(group, values, np.inf).min(axis=1)
        dropped_max = np.where(group, -np.inf, values).max(axis=1)
        assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("channels,expected_tail", [(6, 2), (5, 1), (7, 2)])
def test_m_by_n_handles_channel_count_not_divisible_by_n(
    channels, expected_tail
):
    weights = np.random.default_rng(5).normal(size=(channels, 3))
    mask = as_np(masking.m_by_n_mask(weights.astype("float32"), (2, 4))[0])
    tail = mask[4:]
    assert (mask[:4].sum(axis=0) == 2).all()
    assert (tail.sum(axis=0) == expected_tail).all()


def test_masks_are_identical_under_xla():
    weights = np.random.default_rng(6).normal(size=(32, 16)).astype("float32")

    @xla_compile
    def compiled(w, s):
        return (
            masking.magnitude_mask(w, s)[0],
            masking.block_mask(w, s, (2, 2), "MAX")[0],
            masking.m_by_n_mask(w, (2, 4))[0],
        )

    got = compiled(
        keras.ops.convert_to_tensor(weights),
        keras.ops.convert_to_tensor(0.7, "float32"),
    )
    expected = (
        masking.magnitude_mask(weights, 0.7)[0],
        masking.block_mask(weights, 0.7, (2, 2), "MAX")[0],
        masking.m_by_n_mask(weights, (2, 4))[0],
    )
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(as_np(a), as_np(b))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TensorFlow traces one mask function for tensors of any length",
)
def test_masks_in_a_traced_graph_are_exact_whatever_the_length():
    # Inside a graph, tensors of up to 2^20 entries share a traced
    # function of 1-D tensors of unknown length: one for 11-bit digits,
    # one for 16-bit ones (600x800 entries).
    import tensorflow as tf

    rng = np.random.default_rng(0)
    traced = tf.function(masking.magnitude_mask)
    for shape in [(7,), (3, 5), (300, 40), (600, 800)]:
        weights = rng.normal(size=shape).astype("float32")
        tied = np.round(weights * 2) / 2
        for w in (weights, tied):
            for sparsity in (0.0, 0.3, 0.9):
                mask, threshold = traced(tf.constant(w), tf.constant(sparsity))
                assert mask.shape == shape
                expected = reference_magnitude_mask(w, sparsity)
                np.testing.assert_array_equal(mask.numpy(), expected)
                assert float(threshold) == np.abs(w)[expected].min()
    assert len(masking._ANY_LENGTH) == 2
