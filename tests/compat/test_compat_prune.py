"""tfmot 0.8.1's `prune_low_magnitude`, `strip_pruning` and `prune_scope`,
through kprune's public API.

The facts come from tfmot's `prune_test.py`, `prune_integration_test.py`
and their docs. Where kprune differs on purpose (layers without weights are
not wrapped, subclassed models are pruned, models are cloned), the test
checks kprune's side and docs/migrating.md says why.
"""

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned

PARAMS = {
    "pruning_schedule": kprune.ConstantSparsity(0.5, 0),
    "block_size": (1, 1),
    "block_pooling_type": "AVG",
}


class CustomPrunableLayer(layers.Dense, kprune.PrunableLayer):
    def get_prunable_weights(self):
        return [self.kernel]


def _wrappers(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, kprune.PruneLowMagnitude)
    ]


def _check_wrapper(original, wrapper):
    assert isinstance(wrapper, kprune.PruneLowMagnitude)
    assert wrapper.pruning_schedule == PARAMS["pruning_schedule"]
    assert wrapper.block_size == PARAMS["block_size"]
    assert wrapper.block_pooling_type == PARAMS["block_pooling_type"]
    assert type(wrapper.layer) is type(original)


def test_prune_a_keras_layer_wraps_that_layer():
    layer = layers.Dense(10)
    wrapper = kprune.prune_low_magnitude(layer, **PARAMS)
    _check_wrapper(layer, wrapper)
    assert wrapper.layer is layer
    model = keras.Sequential([keras.Input((10,)), wrapper])
    assert model.output_shape == (None, 10)


def test_prune_a_custom_prunable_layer_prunes_its_chosen_weights():
    layer = CustomPrunableLayer(10)
    wrapper = kprune.prune_low_magnitude(layer, **PARAMS)
    keras.Sequential([keras.Input((10,)), wrapper])
    assert wrapper.layer is layer
    assert [w.path for w, _, _ in wrapper.pruning_vars] == [layer.kernel.path]


def test_prune_a_list_of_layers_wraps_each():
    model_layers = [layers.Dense(10), CustomPrunableLayer(10)]
    wrapped = kprune.prune_low_magnitude(model_layers, **PARAMS)
    assert len(wrapped) == 2
    for layer, wrapper in zip(model_layers, wrapped):
        _check_wrapper(layer, wrapper)
        assert wrapper.layer is layer


def test_prune_a_model_wraps_each_prunable_layer():
    model = keras.Sequential(
        [
            keras.Input((10,)),
            layers.Dense(10),
            layers.Dropout(0.4),
            CustomPrunableLayer(10),
        ]
    )
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    assert len(pruned.layers) == len(model.layers)
    _check_wrapper(model.layers[0], pruned.layers[0])
    _check_wrapper(model.layers[2], pruned.layers[2])
    # tfmot wraps the Dropout too, with nothing to prune; kprune keeps it.
    assert isinstance(pruned.layers[1], layers.Dropout)


def test_prune_a_model_with_an_unprunable_custom_layer_raises():
    class CustomNonPrunableLayer(layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 4))

        def call(self, x):
            return x @ self.w

    model = keras.Sequential(
        [keras.Input((10,)), layers.Dense(10), CustomNonPrunableLayer()]
    )
    with pytest.raises(ValueError, match="CustomNonPrunableLayer"):
        kprune.prune_low_magnitude(model, **PARAMS)


def test_prune_a_model_keeps_layers_already_wrapped():
    inner = kprune.prune_low_magnitude(layers.Dense(10), **PARAMS)
    model = keras.Sequential([keras.Input((10,)), layers.Dense(10), inner])
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    assert len(pruned.layers) == 2
    _check_wrapper(model.layers[0], pruned.layers[0])
    assert isinstance(pruned.layers[1], kprune.PruneLowMagnitude)
    assert not isinstance(pruned.layers[1].layer, kprune.PruneLowMagnitude)


def test_inference_needs_no_callback():
    model = kprune.prune_low_magnitude(
        keras.Sequential(
            [
                keras.Input((100,)),
                layers.Dense(10, activation="relu"),
                layers.Dense(2, activation="sigmoid"),
            ]
        ),
        **PARAMS,
    )
    model.compile(
        loss="categorical_crossentropy", optimizer="sgd", metrics=["accuracy"]
    )
    x = np.random.rand(16, 100).astype("float32")
    y = keras.utils.to_categorical(np.random.randint(2, size=(16, 1)), 2)
    assert model.predict(x, verbose=0).shape == (16, 2)
    model.evaluate(x, y, verbose=0)


@pytest.mark.parametrize("with_input", [False, True])
def test_prune_a_sequential_model_keeps_its_built_state(with_input):
    stack = [layers.Dense(10), layers.Dense(10)]
    model = keras.Sequential(
        [keras.Input((10,)), *stack] if with_input else stack
    )
    built = model.built
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    assert model.built == built
    assert pruned.built == built
    assert len(_wrappers(pruned)) == 2
    with kprune.prune_scope():
        loaded = keras.models.model_from_json(pruned.to_json())
    assert loaded.built == built


def test_prune_a_functional_model_with_two_inputs():
    i1, i2 = keras.Input((10,)), keras.Input((10,))
    outputs = layers.Add()([layers.Dense(10)(i1), layers.Dense(10)(i2)])
    model = keras.Model([i1, i2], outputs)
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    # tfmot wraps the `Add` too (3 wrappers); kprune wraps the 2 `Dense`.
    assert len(_wrappers(pruned)) == 2
    assert pruned.built
    loaded = keras.models.model_from_json(pruned.to_json())
    assert loaded.built


def test_a_reused_layer_is_pruned_once():
    inputs = keras.Input((10,))
    dense = layers.Dense(10)
    model = keras.Model(inputs, dense(dense(inputs)))
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    assert len(_wrappers(pruned)) == 1


def test_nested_models_are_pruned_recursively():
    inner = keras.Sequential([keras.Input((10,)), layers.Dense(10)])
    model = keras.Sequential([keras.Input((10,)), inner, layers.Dense(10)])
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    assert len(_wrappers(pruned)) == 2


@pytest.mark.parametrize("to_prune", [object(), "model", 3])
def test_other_objects_are_refused(to_prune):
    with pytest.raises(ValueError, match="to_prune"):
        kprune.prune_low_magnitude(to_prune, **PARAMS)


def test_prune_leaves_the_input_model_unchanged():
    model = keras.Sequential([keras.Input((10,)), layers.Dense(10)])
    before = [w.copy() for w in model.get_weights()]
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    assert pruned is not model
    assert not _wrappers(model)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_prune_a_compiled_model_returns_it_uncompiled():
    # tfmot documents that the optimizer is removed: compile after pruning.
    model = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    pruned = kprune.prune_low_magnitude(model, **PARAMS)
    assert not pruned.compiled
    assert pruned.optimizer is None


@pytest.mark.parametrize("with_input", [False, True])
def test_strip_pruning_sequential_gives_back_the_config(with_input):
    stack = [layers.Dense(10), layers.Dense(10)]
    model = keras.Sequential(
        [keras.Input((10,)), *stack] if with_input else stack
    )
    stripped = kprune.strip_pruning(kprune.prune_low_magnitude(model, **PARAMS))
    assert not _wrappers(stripped)
    assert stripped.get_config() == model.get_config()


def test_strip_pruning_functional_gives_back_the_config():
    i1, i2 = keras.Input((10,)), keras.Input((10,))
    outputs = layers.Add()([layers.Dense(10)(i1), layers.Dense(10)(i2)])
    model = keras.Model([i1, i2], outputs)
    stripped = kprune.strip_pruning(kprune.prune_low_magnitude(model, **PARAMS))
    assert not _wrappers(stripped)
    assert stripped.get_config() == model.get_config()


def test_strip_pruning_keeps_the_sparse_weights_and_predictions():
    model = kprune.prune_low_magnitude(
        keras.Sequential(
            [keras.Input((8,)), layers.Dense(16), layers.Dense(3)]
        ),
        pruning_schedule=kprune.ConstantSparsity(0.5, 0, frequency=1),
    )
    compile_classifier(model)
    x, y = classification_data()
    fit_pruned(model, x, y)
    stripped = kprune.strip_pruning(model)
    for layer in stripped.layers:
        assert np.mean(layer.get_weights()[0] == 0) == 0.5
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_prune_scope_loads_a_pruned_model(tmp_path):
    pruned = kprune.prune_low_magnitude(
        keras.Sequential([keras.Input((10,)), layers.Dense(10)]), **PARAMS
    )
    pruned.save(tmp_path / "pruned.keras")
    with kprune.prune_scope():
        loaded = keras.saving.load_model(tmp_path / "pruned.keras")
    assert isinstance(loaded.layers[0], kprune.PruneLowMagnitude)
    # tfmot needs the scope for whole-model files; kprune registers its
    # classes, so the file loads without it too.
    loaded = keras.saving.load_model(tmp_path / "pruned.keras")
    assert loaded.layers[0].pruning_schedule == PARAMS["pruning_schedule"]


def test_weights_load_into_the_same_pruned_architecture(tmp_path):
    def build():
        return kprune.prune_low_magnitude(
            keras.Sequential(
                [keras.Input((10,)), layers.Dense(10), layers.Dense(2)]
            ),
            **PARAMS,
        )

    pruned = build()
    pruned.save_weights(tmp_path / "pruned.weights.h5")
    other = build()
    other.load_weights(tmp_path / "pruned.weights.h5")
    for a, b in zip(pruned.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
