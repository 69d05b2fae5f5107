"""tfmot code passes NumPy values and relies on N:M masks from step 1."""

import numpy as np
import pytest

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import pruned_weights
from testing import steps


def test_tutorial_pruning_cell_with_numpy_end_step_trains():
    # `pruning_with_keras.ipynb` computes the end step with NumPy.
    x, y = classification_data(n=16)
    batch_size, epochs = 4, 2
    end_step = np.ceil(len(x) / batch_size).astype(np.int32) * epochs
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(),
            pruning_schedule=kprune.PolynomialDecay(
                initial_sparsity=np.float32(0.50),
                final_sparsity=np.float64(0.80),
                begin_step=np.int64(0),
                end_step=end_step,
                frequency=np.int32(2),
            ),
        )
    )
    fit_pruned(pruned, x, y, epochs=epochs, batch_size=batch_size)
    assert steps(pruned) == [8, 8]
    assert kprune.sparsity_report(pruned)["pruned_total"][
        "sparsity"
    ] == pytest.approx(0.8, abs=0.02)


def test_pattern_arguments_and_per_layer_sparsities_accept_numpy_values():
    model = mlp(outputs=4)
    pruned = kprune.prune_low_magnitude(
        model, block_size=np.array([4, 1]), block_pooling_type="MAX"
    )
    assert pruned.layers[0].block_size == (4, 1)
    assert all(type(b) is int for b in pruned.layers[0].block_size)
    pruned = kprune.prune_low_magnitude(
        model, sparsity_m_by_n=(np.int64(2), np.int32(4))
    )
    assert pruned.layers[0].sparsity_m_by_n == (2, 4)
    names = [layer.name for layer in model.layers]
    pruned = kprune.prune_low_magnitude(
        model, {names[0]: np.float32(0.25), names[1]: np.array(0.5)}
    )
    assert [
        layer.pruning_schedule.target_sparsity for layer in pruned.layers
    ] == [0.25, 0.5]
    with pytest.raises(ValueError, match="block_size"):
        kprune.prune_low_magnitude(model, block_size=(4.5, 1))
    with pytest.raises(ValueError, match="sparsity_m_by_n"):
        kprune.prune_low_magnitude(model, sparsity_m_by_n=(True, 4))


def test_m_by_n_pattern_is_in_force_from_the_first_step():
    # As in tfmot: the N:M mask is set at step 1, whatever the schedule
    # (here the first pruning step would be 100).
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(),
            kprune.ConstantSparsity(0.5, begin_step=0, frequency=100),
            sparsity_m_by_n=(2, 4),
        )
    )
    x, y = classification_data(n=8)
    fit_pruned(pruned, x, y)
    assert steps(pruned) == [2, 2]
    for weight, mask in pruned_weights(pruned):
        rows, columns = weight.shape  # (8, 16), (16, 3)
        kept = mask.reshape(rows // 4, 4, columns).sum(axis=1)
        assert (kept == 2).all()
        assert np.count_nonzero(weight[~mask]) == 0
    report = kprune.sparsity_report(pruned)
    assert report["pruned_total"]["sparsity"] == 0.5
    assert [r["pattern"] for r in report["weights"]][::2] == ["2:4", "2:4"]
