"""Training paths that only one backend has."""

import keras
import numpy as np
import pytest

import kprune
from testing import classification_data
from testing import mlp
from testing import pruned_weights
from testing import reference_kept
from testing import steps


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="needs the JAX backend"
)
def test_jax_custom_training_loop_with_stateless_calls():
    import jax

    pruned = kprune.prune_low_magnitude(
        mlp(), kprune.ConstantSparsity(0.6, 0, frequency=2)
    )
    optimizer = keras.optimizers.Adam()
    optimizer.build(pruned.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    callback = kprune.UpdatePruningStep()
    callback.set_model(pruned)
    callback.on_train_begin()

    def compute_loss(trainable, non_trainable, x, y):
        y_pred, non_trainable = pruned.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return loss_fn(y, y_pred), non_trainable

    @jax.jit
    def train_step(state, x, y):
        trainable, non_trainable, optimizer_vars = state
        (_, non_trainable), grads = jax.value_and_grad(
            compute_loss, has_aux=True
        )(trainable, non_trainable, x, y)
        trainable, optimizer_vars = optimizer.stateless_apply(
            optimizer_vars, grads, trainable
        )
        return trainable, non_trainable, optimizer_vars

    state = (
        [v.value for v in pruned.trainable_variables],
        [v.value for v in pruned.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    x, y = classification_data(n=32)
    for i in range(0, 32, 4):
        state = train_step(state, x[i : i + 4], y[i : i + 4])
    variables = pruned.trainable_variables + pruned.non_trainable_variables
    for variable, value in zip(variables, state[0] + state[1]):
        variable.assign(value)
    assert steps(pruned) == [8, 8]
    for weight, mask in pruned_weights(pruned):
        assert mask.sum() == reference_kept(weight.size, 0.6)
        assert np.count_nonzero(weight[~mask]) == 0
