"""Subclassed models, custom layers, nested models, choosing layers."""

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from kprune import registry
from kprune.wrapper import collect_pruned_layers
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import pruned_weights
from testing import reference_kept
from testing import steps

SCHEDULE = kprune.ConstantSparsity(0.75, 0, frequency=1)


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(registry._PRUNABLE_WEIGHTS)
    yield
    registry._PRUNABLE_WEIGHTS.clear()
    registry._PRUNABLE_WEIGHTS.update(saved)


@keras.saving.register_keras_serializable(package="kprune_tests")
class Net(keras.Model):
    """A subclassed model with layers in an attribute, a list and a dict."""

    def __init__(self, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.stem = layers.Dense(16, activation="relu")
        self.blocks = [layers.Dense(16, activation="relu") for _ in range(2)]
        self.heads = {"out": layers.Dense(classes)}
        self.norm = layers.LayerNormalization()
        self.drop = layers.Dropout(0.1)

    def call(self, x, training=None):
        # Passing `training` on is what JAX training needs (docs/layers.md).
        x = self.stem(x, training=training)
        for block in self.blocks:
            x = x + block(x, training=training)
        x = self.drop(self.norm(x), training=training)
        return self.heads["out"](x, training=training)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


@keras.saving.register_keras_serializable(package="kprune_tests")
class Block(layers.Layer):
    """A custom layer holding other layers, created in `build`."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.attention = layers.MultiHeadAttention(2, 4)
        self.attention.build(input_shape, input_shape)
        self.ffn = [layers.Dense(self.units, activation="relu"), None]
        self.ffn[0].build(input_shape)
        self.out = layers.Dense(input_shape[-1])
        self.out.build((*input_shape[:-1], self.units))
        self.norm = layers.LayerNormalization()
        self.norm.build(input_shape)

    def call(self, x):
        x = self.norm(x + self.attention(x, x))
        return x + self.out(self.ffn[0](x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def built_net():
    net = Net()
    net(np.zeros((1, 8), "float32"))
    return net


def assert_at_target(model, sparsity=0.75):
    pairs = pruned_weights(model)
    assert pairs
    for weight, mask in pairs:
        assert mask.sum() == reference_kept(weight.size, sparsity)
        assert np.count_nonzero(weight[~mask]) == 0


def test_subclassed_model_is_pruned_in_place_trained_and_stripped():
    net = built_net()
    x, y = classification_data(shape=(8,))
    before = net.predict(x, verbose=0)
    pruned = kprune.prune_low_magnitude(net, SCHEDULE)
    assert pruned is net
    np.testing.assert_allclose(pruned.predict(x, verbose=0), before, atol=1e-6)
    wrapped = [layer.layer for layer in collect_pruned_layers(net)]
    assert wrapped == [net.stem.layer, *[b.layer for b in net.blocks]] + [
        net.heads["out"].layer
    ]
    assert isinstance(net.norm, layers.LayerNormalization)
    compile_classifier(net)
    fit_pruned(net, x, y, epochs=2)
    assert steps(net) == [16, 16, 16, 16]
    assert_at_target(net)

    expected = net.predict(x, verbose=0)
    stem_kernel = net.stem.layer.kernel
    stripped = kprune.strip_pruning(net)
    # Stripped in place, as it was pruned: the same object, its own layers.
    assert stripped is net
    assert not collect_pruned_layers(net)
    assert isinstance(net.stem, layers.Dense)
    assert net.stem.kernel is stem_kernel
    assert stem_kernel.constraint is None
    assert not any("mask" in w.path for w in net.weights)
    np.testing.assert_allclose(net.predict(x, verbose=0), expected, atol=1e-6)
    assert_at_target_plain(net)
    # It trains on as a plain model.
    net.fit(x, y, verbose=0)


def assert_at_target_plain(model):
    for layer in (model.stem, *model.blocks, model.heads["out"]):
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        assert (kernel != 0).sum() == reference_kept(kernel.size, 0.75)


def test_failed_pruning_of_a_subclassed_model_changes_nothing():
    class Mystery(layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 3))

        def call(self, x):
            return x @ self.w

    class WithMystery(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(4)
            self.mystery = Mystery(name="mystery")

        def call(self, x):
            return self.mystery(self.dense(x))

    model = WithMystery()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="mystery.*register_prunable_layer"):
        kprune.prune_low_magnitude(model)
    assert isinstance(model.dense, layers.Dense)
    assert model.dense.kernel.constraint is None
    with pytest.raises(ValueError, match="does not have.*nope"):
        kprune.prune_low_magnitude(model, layers=["dense", "nope"])
    assert not collect_pruned_layers(model)
    # Leaving the unknown layer out works.
    kprune.prune_low_magnitude(model, layers=["dense"])
    assert [w.layer.name for w in collect_pruned_layers(model)] == [
        model.dense.layer.name
    ]


@pytest.mark.slow
def test_subclassed_model_resumes_from_save_weights(tmp_path):
    x, y = classification_data(shape=(8,))
    schedule = kprune.PolynomialDecay(0.2, 0.8, 0, 24, frequency=2)
    net = compile_classifier(kprune.prune_low_magnitude(built_net(), schedule))
    fit_pruned(net, x, y)
    net.save_weights(tmp_path / "net.weights.h5")
    fresh = compile_classifier(
        kprune.prune_low_magnitude(built_net(), schedule)
    )
    fresh.optimizer.build(fresh.trainable_variables)  # to restore its state
    fresh.load_weights(tmp_path / "net.weights.h5")
    assert steps(fresh) == [8, 8, 8, 8]
    for (w1, m1), (w2, m2) in zip(pruned_weights(net), pruned_weights(fresh)):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(m1, m2)
    fit_pruned(fresh, x, y, epochs=2)
    assert steps(fresh) == [24, 24, 24, 24]
    assert_at_target(fresh, 0.8)


def functional_with_custom_and_subclassed():
    inputs = keras.Input((5, 4))
    x = Block(name="block")(inputs)
    x = layers.Flatten()(x)
    inner = Net(name="net")
    return keras.Model(inputs, inner(x))


@pytest.mark.slow
def test_custom_layers_and_subclassed_models_inside_functional_models():
    model = functional_with_custom_and_subclassed()
    x, y = classification_data(shape=(5, 4))
    pruned = kprune.prune_low_magnitude(model, SCHEDULE)
    np.testing.assert_allclose(
        pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    units = {w.layer.name: w for w in collect_pruned_layers(pruned)}
    assert sorted(units) == ["block", "net"]
    names = [w.name for w, _, _ in units["block"].pruning_vars]
    assert names == ["kernel"] * 6  # q, k, v, output, ffn, out
    assert len(units["net"].pruning_vars) == 4
    compile_classifier(pruned)
    fit_pruned(pruned, x, y)
    assert_at_target(pruned)
    stripped = kprune.strip_pruning(pruned)
    assert not collect_pruned_layers(stripped)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0),
        pruned.predict(x, verbose=0),
        atol=1e-5,
    )


@pytest.mark.slow
def test_custom_layer_unit_round_trips_through_a_keras_file(tmp_path):
    model = functional_with_custom_and_subclassed()
    x, y = classification_data(shape=(5, 4))
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            model, kprune.PolynomialDecay(0.2, 0.8, 0, 20, frequency=2)
        )
    )
    fit_pruned(pruned, x, y)
    pruned.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert steps(loaded) == steps(pruned) == [8, 8]
    for (w1, m1), (w2, m2) in zip(
        pruned_weights(pruned), pruned_weights(loaded)
    ):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )


def test_layers_argument_prunes_only_chosen_layers_with_their_own_targets():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layers.Flatten()(x)
    x = layers.Dense(8, name="hidden")(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x))
    pruned = kprune.prune_low_magnitude(
        model,
        kprune.ConstantSparsity(0.5, 0, frequency=1),
        layers={
            "head": {"pruning_schedule": SCHEDULE},
            layers.Conv2D: {"sparsity_m_by_n": (2, 4)},
        },
    )
    chosen = {w.layer.name: w for w in collect_pruned_layers(pruned)}
    assert sorted(chosen) == ["conv", "head"]
    assert chosen["conv"].sparsity_m_by_n == (2, 4)
    assert chosen["head"].pruning_schedule == SCHEDULE
    compile_classifier(pruned)
    x_, y_ = classification_data(shape=(8, 8, 1))
    fit_pruned(pruned, x_, y_)
    head = chosen["head"].layer.kernel.numpy()
    assert (head == 0).sum() == head.size - reference_kept(head.size, 0.75)
    assert (pruned.get_layer("hidden").kernel.numpy() != 0).all()
    # A list prunes with the call's arguments; a function selects too.
    listed = kprune.prune_low_magnitude(
        model, layers=[lambda layer: layer.name.startswith("h")]
    )
    assert sorted(w.layer.name for w in collect_pruned_layers(listed)) == [
        "head",
        "hidden",
    ]


@pytest.mark.parametrize(
    "layers_arg,match",
    [
        (["nope"], "does not have.*nope"),
        ({"head": {"sparsity": 0.5}}, "may set only"),
        ({"head": {"block_size": (0, 1)}}, "block_size"),
        ([3], "Argument `layers`"),
    ],
)
def test_bad_layers_argument_is_rejected(layers_arg, match):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layers.Dense(3, name="head")(inputs))
    with pytest.raises(ValueError, match=match):
        kprune.prune_low_magnitude(model, layers=layers_arg)
    with pytest.raises(ValueError, match="whole models"):
        kprune.prune_low_magnitude(layers.Dense(2), layers=["head"])


def test_register_prunable_layer_for_a_class_you_cannot_edit():
    class ThirdParty(layers.Layer):
        def build(self, shape):
            self.table = self.add_weight(shape=(shape[-1], 4))
            self.scale = self.add_weight(shape=(4,))

        def call(self, x):
            return (x @ self.table) * self.scale

    class Subclass(ThirdParty):
        pass

    model = keras.Sequential(
        [keras.Input((6,)), ThirdParty(name="tp"), Subclass(), Subclass()]
    )
    with pytest.raises(ValueError, match="register_prunable_layer"):
        kprune.prune_low_magnitude(model)
    kprune.register_prunable_layer(ThirdParty, ["table"])
    pruned = kprune.prune_low_magnitude(model, SCHEDULE)
    assert [len(w.pruning_vars) for w in collect_pruned_layers(pruned)] == [
        1,
        1,
        1,
    ]
    kprune.register_prunable_layer(Subclass, [])
    pruned = kprune.prune_low_magnitude(model, SCHEDULE)
    assert [w.layer.name for w in collect_pruned_layers(pruned)] == ["tp"]
    with pytest.raises(ValueError, match="layer_class"):
        kprune.register_prunable_layer("Dense", ["kernel"])
    with pytest.raises(ValueError, match="weight_names"):
        kprune.register_prunable_layer(ThirdParty, [""])


def test_tfmot_clone_function_pattern_on_a_model_with_custom_layers():
    model = functional_with_custom_and_subclassed()

    def prune_block_only(layer):
        if isinstance(layer, Block):
            return kprune.prune_low_magnitude(layer, SCHEDULE)
        return layer

    pruned = keras.models.clone_model(model, clone_function=prune_block_only)
    assert [w.layer.name for w in collect_pruned_layers(pruned)] == ["block"]
