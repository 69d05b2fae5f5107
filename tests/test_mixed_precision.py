import keras
import numpy as np
import pytest

import kprune
from kprune.wrapper import collect_pruned_layers
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import reference_kept
from testing import steps


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "policy", ["mixed_float16", "mixed_bfloat16"], indirect=True
)
def test_mixed_precision_prunes_float32_weights_to_exact_zeros(policy):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(), kprune.ConstantSparsity(0.6, 0, frequency=3)
        )
    )
    x, y = classification_data()
    output = pruned(x[:2])
    assert keras.backend.standardize_dtype(output.dtype) == policy[6:]
    fit_pruned(pruned, x, y, epochs=2)
    assert steps(pruned) == [16, 16]
    for layer in collect_pruned_layers(pruned):
        for weight, mask, threshold in layer.pruning_vars:
            assert weight.dtype == threshold.dtype == "float32"
            kernel = keras.ops.convert_to_numpy(weight)
            kept = keras.ops.convert_to_numpy(mask)
            assert kept.sum() == reference_kept(kernel.size, 0.6)
            assert np.count_nonzero(kernel[~kept]) == 0
            # The threshold is a float32 magnitude, not a rounded one.
            limit = float(keras.ops.convert_to_numpy(threshold))
            assert limit > 0
            assert limit == np.float32(limit)


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_step_counts_loss_scale_optimizer_updates_as_documented(policy):
    # Starting far too high, the loss scale overflows float16 gradients in
    # the first steps, and the optimizer skips those updates.
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.01), initial_scale=2.0**24
    )
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(), kprune.ConstantSparsity(0.5, 0, frequency=1)
        ),
        optimizer=optimizer,
    )
    x, y = classification_data(n=64)
    fit_pruned(pruned, x, y, epochs=1)
    applied = int(keras.ops.convert_to_numpy(optimizer.iterations))
    assert 0 < applied < 16
    # The step advances in the forward pass: it counts batches, as in
    # tfmot, skipped updates included.
    assert steps(pruned) == [16, 16]
    for layer in collect_pruned_layers(pruned):
        for weight, mask, _ in layer.pruning_vars:
            kernel = keras.ops.convert_to_numpy(weight)
            kept = keras.ops.convert_to_numpy(mask)
            assert kept.sum() == reference_kept(kernel.size, 0.5)
            assert np.count_nonzero(kernel[~kept]) == 0
