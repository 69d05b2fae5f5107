"""What pruning and stripping copy, reuse and keep of the user's model."""

import socket
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from kprune.wrapper import _PruningConstraint
from kprune.wrapper import collect_pruned_layers
from testing import compile_classifier
from testing import fit_pruned
from testing import pruned_weights
from testing import reference_kept
from testing import tiny_gpt2

SCHEDULE = kprune.ConstantSparsity(0.5, 0, frequency=1)


# keras-io's text_classification_with_transformer.py, as written: not
# registered, and no `**kwargs`, so their config cannot rebuild them.
class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=embed_dim
        )
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.dropout2(self.ffn(out1))
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(vocab_size, embed_dim)
        self.pos_emb = layers.Embedding(maxlen, embed_dim)

    def call(self, x):
        maxlen = keras.ops.shape(x)[-1]
        positions = keras.ops.arange(start=0, stop=maxlen, step=1)
        return self.token_emb(x) + self.pos_emb(positions)


class Scale(layers.Layer):
    """Unregistered, no `**kwargs`, and weights kprune does not know."""

    def __init__(self, size):
        super().__init__()
        self.scale = self.add_weight(shape=(size,), initializer="ones")

    def call(self, x):
        return x * self.scale


def text_transformer():
    inputs = layers.Input(shape=(8,))
    x = TokenAndPositionEmbedding(8, 20, 8)(inputs)
    x = TransformerBlock(8, 2, 16)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = Scale(8)(x)
    x = layers.Dense(8, activation="relu", name="hidden")(x)
    outputs = layers.Dense(2, name="head")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def token_data(n=16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 20, size=(n, 8)), rng.integers(0, 2, size=(n,))


@pytest.mark.slow
def test_layers_without_kwargs_prune_train_and_strip():
    model = text_transformer()
    x, y = token_data()
    before = model.predict(x, verbose=0)
    with pytest.warns(UserWarning, match="shares them with the input") as w:
        pruned = kprune.prune_low_magnitude(
            model, SCHEDULE, layers=lambda layer: not isinstance(layer, Scale)
        )
    (message,) = [str(r.message) for r in w if "shares them" in str(r.message)]
    for name in ("TransformerBlock", "TokenAndPositionEmbedding", "Scale"):
        assert f"({name})" in message
    assert "(Dense)" not in message
    np.testing.assert_allclose(pruned.predict(x, verbose=0), before, atol=1e-5)
    units = {type(w.layer).__name__: w for w in collect_pruned_layers(pruned)}
    assert sorted(units) == [
        "Dense",
        "TokenAndPositionEmbedding",
        "TransformerBlock",
    ]
    # Layers their config cannot rebuild are reused, as tfmot reuses all.
    block = next(lay for lay in model.layers if isinstance(lay, Scale))
    assert any(lay is block for lay in pruned.layers)
    assert units["TransformerBlock"].layer in model.layers
    # The others are copies: the input model's are left alone.
    assert pruned.get_layer("prune_low_magnitude_head").layer is not (
        model.get_layer("head")
    )
    compile_classifier(pruned)
    fit_pruned(pruned, x, y)
    for weight, mask in pruned_weights(pruned):
        assert mask.sum() == reference_kept(weight.size, 0.5)
    assert model.get_layer("head").kernel.constraint is None

    stripped = kprune.strip_pruning(pruned)
    assert not collect_pruned_layers(stripped)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5
    )
    # The shared layers are left without pruning constraints.
    assert not any(
        isinstance(w.constraint, _PruningConstraint) for w in model.weights
    )
    assert not any(
        isinstance(w.constraint, _PruningConstraint) for w in stripped.weights
    )


def test_layers_their_config_rebuilds_are_copied_without_a_warning():
    model = functional_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = kprune.prune_low_magnitude(model, SCHEDULE)
    assert not [r for r in caught if "shares them" in str(r.message)]
    assert not set(map(id, pruned.layers)) & set(map(id, model.layers))


def test_unregistered_dense_subclass_in_a_compiled_model():
    class MyDense(layers.Dense):
        pass

    model = compile_classifier(
        keras.Sequential([keras.Input((6,)), MyDense(8), MyDense(3)])
    )
    pruned = kprune.prune_low_magnitude(model, SCHEDULE)
    # As in tfmot, the pruned model has no optimizer: compile it.
    assert not pruned.compiled
    assert model.compiled
    assert [type(w.layer) for w in collect_pruned_layers(pruned)] == [
        MyDense,
        MyDense,
    ]
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    y = np.arange(16) % 3
    compile_classifier(pruned)
    fit_pruned(pruned, x, y)
    stripped = kprune.strip_pruning(pruned)
    assert not stripped.compiled
    assert [type(layer) for layer in stripped.layers] == [MyDense, MyDense]
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )


def sequential_model():
    return keras.Sequential(
        [layers.Input((6,)), layers.Dense(4), layers.Dense(2)]
    )


def functional_model():
    a = keras.Input((6,))
    b = keras.Input((3,))
    x = layers.Concatenate()([layers.Dense(4)(a), b])
    return keras.Model([a, b], layers.Dense(2)(x))


@pytest.mark.parametrize("build", [sequential_model, functional_model])
def test_prune_and_strip_keep_the_model_config(build):
    model = build()
    pruned = kprune.prune_low_magnitude(model)
    assert [lay.name for lay in model.layers] == [
        lay.layer.name
        if isinstance(lay, kprune.PruneLowMagnitude)
        else lay.name
        for lay in pruned.layers
    ]
    assert kprune.strip_pruning(pruned).get_config() == model.get_config()


class TwoTower(keras.Model):
    """How most users write one: no `get_config`, no arguments."""

    def __init__(self):
        super().__init__()
        self.left = layers.Dense(8, activation="relu")
        self.right = [layers.Dense(8, activation="tanh")]
        self.head = layers.Dense(3)

    def call(self, x, training=None):
        return self.head(
            self.left(x, training=training)
            + self.right[0](x, training=training),
            training=training,
        )


def test_subclassed_model_without_config_is_stripped_in_place():
    model = TwoTower()
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    y = np.arange(16) % 3
    model(x[:1])
    pruned = compile_classifier(kprune.prune_low_magnitude(model, SCHEDULE))
    fit_pruned(pruned, x, y)
    expected = pruned.predict(x, verbose=0)
    kernel = model.left.layer.kernel
    stripped = kprune.strip_pruning(pruned)
    assert stripped is model and type(stripped) is TwoTower
    assert not collect_pruned_layers(model)
    assert isinstance(model.right[0], layers.Dense)
    assert model.left.kernel is kernel and kernel.constraint is None
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-6)
    for layer in (model.left, model.right[0], model.head):
        value = keras.ops.convert_to_numpy(layer.kernel)
        assert np.count_nonzero(value) == reference_kept(value.size, 0.5)
    model.fit(x, y, verbose=0)  # a plain model again


@pytest.fixture
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def assert_generates(model):
    out = model.generate(["a b", "c"], max_length=8)
    assert len(out) == 2 and out[0].startswith("a b")


@pytest.mark.slow
@pytest.mark.usefixtures("_no_network")
def test_gpt2_causal_lm_keeps_its_class_trains_and_generates_after_strip():
    import keras_hub

    lm = tiny_gpt2()
    pruned = kprune.prune_low_magnitude(lm, SCHEDULE)
    assert isinstance(pruned, keras_hub.models.GPT2CausalLM)
    assert isinstance(pruned.backbone, keras_hub.models.GPT2Backbone)
    assert pruned.backbone is not lm.backbone
    # `generate` calls these directly, not through the graph.
    blocks = pruned.backbone.transformer_layers
    assert all(isinstance(b, kprune.PruneLowMagnitude) for b in blocks)
    assert isinstance(pruned.backbone.token_embedding, kprune.PruneLowMagnitude)
    assert pruned.backbone.token_embedding in pruned.backbone.layers
    pruned.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    pruned.fit(
        ["a b c", "b c a", "c a b", "a a b"],
        batch_size=2,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    for weight, mask in pruned_weights(pruned):
        assert mask.sum() == reference_kept(weight.size, 0.5)
    stripped = kprune.strip_pruning(pruned)
    assert type(stripped) is keras_hub.models.GPT2CausalLM
    assert type(stripped.backbone) is keras_hub.models.GPT2Backbone
    assert not collect_pruned_layers(stripped)
    assert stripped.backbone.transformer_layers[0] in stripped.backbone.layers
    assert_generates(stripped)
    assert_generates(lm)


@pytest.mark.slow
@pytest.mark.usefixtures("_no_network")
def test_pruned_gpt2_causal_lm_generates():
    pruned = kprune.prune_low_magnitude(tiny_gpt2(), SCHEDULE)
    assert_generates(pruned)


@pytest.mark.slow
@pytest.mark.usefixtures("_no_network")
def test_bert_text_classifier_keeps_its_class_fits_and_predicts(tmp_path):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    classifier = keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=None
    )
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 50, size=(8, 8)).astype("int32"),
        "segment_ids": np.zeros((8, 8), "int32"),
        "padding_mask": np.ones((8, 8), "int32"),
    }
    y = np.arange(8) % 3
    pruned = kprune.prune_low_magnitude(classifier, SCHEDULE)
    assert isinstance(pruned, keras_hub.models.BertTextClassifier)
    assert isinstance(pruned.backbone, keras_hub.models.BertBackbone)
    np.testing.assert_allclose(
        pruned.predict(x, verbose=0),
        classifier.predict(x, verbose=0),
        atol=1e-5,
    )
    pruned.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    pruned.fit(
        x, y, batch_size=4, verbose=0, callbacks=[kprune.UpdatePruningStep()]
    )
    expected = pruned.predict(x, verbose=0)
    # Saved mid-training, it comes back as its graph, wrappers included.
    pruned.save(tmp_path / "pruned.keras")
    loaded = keras.saving.load_model(tmp_path / "pruned.keras")
    assert len(collect_pruned_layers(loaded)) == len(
        collect_pruned_layers(pruned)
    )
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, atol=1e-5
    )
    stripped = kprune.strip_pruning(pruned)
    assert type(stripped) is keras_hub.models.BertTextClassifier
    assert type(stripped.backbone) is keras_hub.models.BertBackbone
    assert not collect_pruned_layers(stripped)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), expected, atol=1e-5
    )
    stripped.save(tmp_path / "stripped.keras")
    reloaded = keras.saving.load_model(tmp_path / "stripped.keras")
    assert type(reloaded) is keras_hub.models.BertTextClassifier
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), expected, atol=1e-5
    )
