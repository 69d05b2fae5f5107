"""The pruning engine: one step per batch, groups as plug-ins."""

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import kprune
from kprune import engine
from kprune import masking
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import pruned_weights
from testing import reference_kept
from testing import reference_magnitude_mask
from testing import steps


class NormalizedGlobal(kprune.PruningSchedule):
    """A cross-layer algorithm written outside kprune: one threshold over
    the group on magnitudes scaled by each weight's largest one."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, step):
        return self.schedule(step)

    def get_config(self):
        return {"schedule": self.schedule}

    def mask_group_key(self):
        return "normalized"

    def make_mask_group(self, model, wrappers):
        return NormalizedGroup(wrappers)


class NormalizedGroup(engine.MaskGroup):
    def compute_masks(self, weights, sparsity):
        scores = []
        for weight in weights:
            magnitude = ops.abs(ops.reshape(weight, (-1,)))
            scores.append(magnitude / ops.max(magnitude))
        total = sum(s.shape[0] for s in scores)
        keep, threshold = masking.top_k_mask(
            ops.concatenate(scores), masking.kept_count(total, sparsity)
        )
        masks, start = [], 0
        for weight, score in zip(weights, scores):
            part = keep[start : start + score.shape[0]]
            start += score.shape[0]
            masks.append(ops.reshape(part, weight.shape))
        return masks, [threshold] * len(weights)


def test_a_cross_layer_algorithm_plugs_in_without_touching_kprune():
    pruned = kprune.prune_low_magnitude(
        mlp(), NormalizedGlobal(kprune.ConstantSparsity(0.6, 0, frequency=2))
    )
    compile_classifier(pruned)
    x, y = classification_data(n=16)
    fit_pruned(pruned, x, y)
    rows = pruned_weights(pruned)
    kept = sum(int(mask.sum()) for _, mask in rows)
    size = sum(mask.size for _, mask in rows)
    assert kept == reference_kept(size, 0.6)
    # One threshold over the group: the layers end at different sparsities.
    assert len({int(mask.sum()) * 1000 // mask.size for _, mask in rows}) > 1
    for weight, mask in rows:
        assert np.count_nonzero(weight[~mask]) == 0
    assert steps(pruned) == [4, 4]


def test_mismatched_group_fails_at_train_begin_and_connects_nothing():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            kprune.prune_low_magnitude(
                layers.Dense(4),
                kprune.GlobalSparsity(kprune.ConstantSparsity(0.5, 0)),
            ),
            kprune.prune_low_magnitude(
                layers.Dense(3),
                kprune.GlobalSparsity(kprune.ConstantSparsity(0.7, 0)),
            ),
        ]
    )
    callback = kprune.UpdatePruningStep()
    callback.set_model(model)
    with pytest.raises(ValueError, match="must share one schedule"):
        callback.on_train_begin()
    with pytest.raises(RuntimeError, match="UpdatePruningStep"):
        model(np.zeros((2, 8), "float32"), training=True)


def test_a_layer_called_twice_in_a_step_advances_once_and_keeps_one_mask():
    dense = kprune.prune_low_magnitude(
        layers.Dense(4), kprune.ConstantSparsity(0.5, 0, frequency=1)
    )
    inputs = keras.Input((8,))
    outputs = layers.Dense(3)(
        layers.Concatenate()([dense(inputs), dense(inputs * 2.0)])
    )
    model = compile_classifier(keras.Model(inputs, outputs))
    x, y = classification_data(n=12)
    fit_pruned(model, x, y)
    assert steps(model) == [3]
    ((weight, mask),) = pruned_weights(model)
    assert mask.sum() == reference_kept(mask.size, 0.5)
    assert np.count_nonzero(weight[~mask]) == 0


def test_an_update_without_a_training_call_says_what_to_do():
    pruned = kprune.prune_low_magnitude(mlp())
    callback = kprune.UpdatePruningStep()
    callback.set_model(pruned)
    callback.on_train_begin()
    optimizer = keras.optimizers.SGD(0.1)
    variables = pruned.trainable_variables
    grads = [ops.ones(v.shape) for v in variables]
    with pytest.raises(RuntimeError, match="training=True"):
        optimizer.apply(grads, variables)


def test_a_frozen_pruned_layer_keeps_its_masks_and_step():
    pruned = kprune.prune_low_magnitude(
        mlp(), kprune.ConstantSparsity(0.5, 0, frequency=1)
    )
    first = pruned.layers[0]
    first.trainable = False
    compile_classifier(pruned)
    x, y = classification_data(n=8)
    fit_pruned(pruned, x, y)
    assert steps(pruned) == [-1, 2]
    assert ops.convert_to_numpy(first.pruning_vars[0][1]).all()


def test_training_again_needs_the_callback_again():
    pruned = compile_classifier(kprune.prune_low_magnitude(mlp()))
    x, y = classification_data(n=8)
    fit_pruned(pruned, x, y)
    with pytest.raises(RuntimeError, match="UpdatePruningStep"):
        pruned(x, training=True)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_a_pruning_step_computes_its_loss_with_the_new_masks(run_eagerly):
    # tfmot's order: the weights are masked before the pruning step's
    # forward pass, so that step's loss and gradients see the pruned layer.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), layers.Dense(4)])
    kernel, bias = (ops.convert_to_numpy(w) for w in model.get_weights())
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    pruned = kprune.prune_low_magnitude(
        model, kprune.ConstantSparsity(0.5, 0, frequency=1)
    )
    # A zero learning rate: the step changes the weights only by the mask.
    pruned.compile(
        optimizer=keras.optimizers.SGD(0.0), loss="mse", run_eagerly=run_eagerly
    )
    history = pruned.fit(
        x,
        y,
        batch_size=8,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    masked = kernel * reference_magnitude_mask(kernel, 0.5)
    with_new_masks = np.mean((x @ masked + bias - y) ** 2)
    with_old_weights = np.mean((x @ kernel + bias - y) ** 2)
    assert abs(with_new_masks - with_old_weights) > 0.01
    np.testing.assert_allclose(
        history.history["loss"][0], with_new_masks, rtol=1e-5
    )


def _graph_operations(function, *specs):
    import tensorflow as tf

    graph = tf.function(function).get_concrete_function(*specs).graph
    graph_def = graph.as_graph_def()
    return len(graph_def.node) + sum(
        len(f.node_def) for f in graph_def.library.function
    )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the traced graph of TensorFlow's training step",
)
def test_another_pruned_layer_does_not_add_a_mask_update_to_the_graph():
    # TensorFlow holds memory for every operation of the training step's
    # graph: a mask update is over a hundred of them, and another layer
    # must not add them again, of a shape already seen or not.
    import tensorflow as tf

    def step_operations(widths):
        model = keras.Sequential(
            [keras.Input((16,))] + [layers.Dense(w) for w in widths]
        )
        model = kprune.prune_low_magnitude(
            model, kprune.ConstantSparsity(0.5, 0, frequency=1)
        )
        model.compile(optimizer="sgd", loss="mse")
        callback = kprune.UpdatePruningStep()
        callback.set_model(model)
        callback.on_train_begin()
        return _graph_operations(
            lambda x, y: model.train_step((x, y)),
            tf.TensorSpec((4, 16)),
            tf.TensorSpec((4, widths[-1])),
        )

    mask_update = _graph_operations(
        masking.magnitude_mask, tf.TensorSpec((16, 16)), tf.TensorSpec(())
    )
    two = step_operations([16, 16])
    assert step_operations([16, 16, 16]) - two < mask_update
    assert step_operations([16, 24, 16]) - two < mask_update
