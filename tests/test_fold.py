"""`kprune.structured.fold_batchnorm`: BatchNormalization folded into the
layer before it computes the same function with fewer operations."""

import os

import keras
import numpy as np
import pytest
from keras import layers

import kprune
import testing


def randomize_batch_norms(model, seed=0):
    """Random statistics, scales and shifts, far from the initial 0 and 1,
    so a wrongly folded channel shows in the outputs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            for weight in layer.weights:
                n = weight.shape[0]
                if "variance" in weight.path or "gamma" in weight.path:
                    weight.assign(rng.uniform(0.5, 1.5, n))
                else:
                    weight.assign(rng.normal(0.0, 0.5, n))
    return model


def batch_norms(model):
    return sorted(
        layer.name
        for layer in model.layers
        if isinstance(layer, layers.BatchNormalization)
    )


def assert_same_function(a, b, x, tolerance=1e-5):
    """Outputs equal up to `tolerance` relative to their largest value.
    Called eagerly, as inference: tracing a `predict` function for each of
    two large models costs more than the comparison needs."""
    want = keras.ops.convert_to_numpy(a(x, training=False))
    got = keras.ops.convert_to_numpy(b(x, training=False))
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * scale)


def images(side, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (batch, side, side, 3)).astype("float32")


def test_every_batch_norm_of_resnet50_folds():
    model = keras.applications.ResNet50(
        weights=None,
        input_shape=(32, 32, 3),
        classes=10,
        classifier_activation=None,
    )
    randomize_batch_norms(model)
    folded = kprune.structured.fold_batchnorm(model)
    assert len(batch_norms(model)) == 53
    assert batch_norms(folded) == []
    assert_same_function(model, folded, images(32))


# JAX runs the eager pruning step of a model this size slowly (see
# test_structured_graphs.py); ResNet50 above covers folding there.
@(pytest.mark.slow if keras.backend.backend() == "jax" else lambda f: f)
def test_shrunk_mobilenetv2_folds_and_keeps_the_pruned_function():
    model = testing.small_mobilenetv2()
    pruned = testing.prune_at_once(randomize_batch_norms(model))
    small = kprune.structured.shrink_model(pruned)
    folded = kprune.structured.fold_batchnorm(small)
    assert len(batch_norms(small)) == 52
    assert batch_norms(folded) == []
    assert folded.count_params() < small.count_params()
    x = images(32)
    assert_same_function(small, folded, x)
    assert_same_function(pruned, folded, x, tolerance=1e-4)


def test_unpruned_mobilenetv2_folds_every_batch_norm():
    model = testing.small_mobilenetv2()
    randomize_batch_norms(model)
    folded = kprune.structured.fold_batchnorm(model)
    assert batch_norms(folded) == []
    assert_same_function(model, folded, images(32))


def mixed_model():
    """One of each case: what folds, and what must stay."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="c0")(inputs)
    x = layers.BatchNormalization(name="bn_no_bias")(x)
    x = layers.Conv2D(8, 3, padding="same", name="c1")(x)
    x = layers.BatchNormalization(center=False, name="bn_no_center")(x)
    x = layers.ReLU()(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    x = layers.BatchNormalization(scale=False, name="bn_no_scale")(x)
    x = layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    x = layers.BatchNormalization(center=False, scale=False, name="bn_sep")(x)
    # `shared`'s output also feeds the Add: it must stay unnormalized.
    shared = layers.Conv2D(8, 1, name="shared")(x)
    y = layers.BatchNormalization(name="bn_after_shared")(shared)
    x = layers.Add()([shared, y])
    x = layers.Conv2D(8, 1, activation="relu", name="relu_conv")(x)
    x = layers.BatchNormalization(name="bn_after_activation")(x)
    x = layers.BatchNormalization(name="bn_after_bn")(x)
    x = layers.Conv2D(8, 1, name="c2")(x)
    x = layers.BatchNormalization(axis=1, name="bn_other_axis")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(6, name="dense")(x)
    outputs = layers.BatchNormalization(name="bn_dense")(x)
    return randomize_batch_norms(keras.Model(inputs, outputs))


def test_folds_each_case_and_leaves_the_rest():
    model = mixed_model()
    folded = kprune.structured.fold_batchnorm(model)
    assert batch_norms(folded) == [
        "bn_after_activation",
        "bn_after_bn",
        "bn_after_shared",
        "bn_other_axis",
    ]
    assert folded.get_layer("c0").use_bias
    assert not model.get_layer("c0").use_bias
    assert folded.count_params() < model.count_params()
    assert_same_function(model, folded, images(8, batch=3))


def test_batch_norm_before_a_model_output_stays():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, name="c")(inputs)
    y = layers.BatchNormalization(name="bn")(x)
    model = randomize_batch_norms(keras.Model(inputs, [x, y]))
    folded = kprune.structured.fold_batchnorm(model)
    assert batch_norms(folded) == ["bn"]
    x = images(8)
    for want, got in zip(model.predict_on_batch(x), folded.predict_on_batch(x)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_folds_a_sequential_model_into_a_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(4, 3, use_bias=False, name="c"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(5, name="d"),
            layers.BatchNormalization(name="bn_d"),
        ],
        name="seq",
    )
    randomize_batch_norms(model)
    folded = kprune.structured.fold_batchnorm(model)
    assert isinstance(folded, keras.Sequential)
    assert folded.name == "seq"
    assert batch_norms(folded) == []
    assert_same_function(model, folded, images(8))


def test_sequential_built_on_data_folds_for_any_batch_size():
    model = keras.Sequential(
        [layers.Conv2D(4, 3, name="c"), layers.BatchNormalization(name="bn")]
    )
    model(images(8, batch=2))
    randomize_batch_norms(model)
    folded = kprune.structured.fold_batchnorm(model)
    assert batch_norms(folded) == []
    assert_same_function(model, folded, images(8, batch=5))


def test_refuses_a_model_without_a_graph():
    model = keras.Sequential([layers.Dense(3), layers.BatchNormalization()])
    with pytest.raises(ValueError, match="known inputs"):
        kprune.structured.fold_batchnorm(model)


def test_folded_model_saves_and_loads(tmp_path):
    model = mixed_model()
    folded = kprune.structured.fold_batchnorm(model)
    path = os.path.join(tmp_path, "folded.keras")
    folded.save(path)
    loaded = keras.saving.load_model(path)
    assert batch_norms(loaded) == batch_norms(folded)
    assert_same_function(model, loaded, images(8))


def test_model_is_unchanged_by_folding():
    model = mixed_model()
    before = [np.array(w) for w in model.get_weights()]
    kprune.structured.fold_batchnorm(model)
    assert len(batch_norms(model)) == 9
    for want, got in zip(before, model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_refuses_a_model_with_pruning_wrappers():
    pruned = kprune.prune_low_magnitude(mixed_model())
    with pytest.raises(ValueError, match="strip_pruning"):
        kprune.structured.fold_batchnorm(pruned)
