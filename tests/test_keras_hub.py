"""keras-hub models prune with no registration.

kprune knows keras-hub's own layers by their qualified class names, without
importing keras-hub: position embeddings are pruned, normalization scales
are kept dense. Tiny models are built from configs (no downloads).
"""

import keras
import numpy as np
import pytest

import kprune
from kprune import registry
from kprune.wrapper import collect_pruned_layers
from testing import slow_except

keras_hub = pytest.importorskip("keras_hub")

TEXT = dict(
    vocabulary_size=20,
    num_layers=1,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=16,
    max_sequence_length=8,
)
DECODER = dict(
    vocabulary_size=20,
    num_layers=1,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=8,
    intermediate_dim=16,
)
BACKBONES = {
    "BertBackbone": TEXT,
    "GPT2Backbone": TEXT,
    "DistilBertBackbone": TEXT,
    "RobertaBackbone": TEXT,
    "GemmaBackbone": {**DECODER, "head_dim": 4},
    "MistralBackbone": DECODER,
    "LlamaBackbone": DECODER,
}
# Weights worth pruning: embeddings, attention projections, FFN kernels.
# Biases and normalization weights (gamma, beta, scale) are not.
PRUNED_NAMES = ("kernel", "embeddings", "reverse_embeddings")


@pytest.fixture(autouse=True)
def _no_registration(monkeypatch):
    """Forgets registrations of keras-hub classes made by other tests."""
    monkeypatch.setattr(
        registry,
        "_PRUNABLE_WEIGHTS",
        {
            cls: names
            for cls, names in registry._PRUNABLE_WEIGHTS.items()
            if not cls.__module__.startswith("keras_hub")
        },
    )


def _inputs(backbone):
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 20, size=(4, 8)).astype("int32"),
        "padding_mask": np.ones((4, 8), "int32"),
    }
    if "segment_ids" in backbone.input:
        x["segment_ids"] = np.zeros((4, 8), "int32")
    return x


def _worth_pruning(model):
    return sorted(
        v.path for v in model.weights if v.path.split("/")[-1] in PRUNED_NAMES
    )


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_layers_are_known_without_registration(name):
    backbone = getattr(keras_hub.models, name)(**BACKBONES[name])
    assert registry.status(backbone) == registry.PRUNABLE
    pruned = sorted({w.path for w in registry.get_prunable_weights(backbone)})
    assert pruned == _worth_pruning(backbone)


@pytest.mark.parametrize(
    "name",
    slow_except("BertBackbone", sorted(set(BACKBONES) - {"LlamaBackbone"})),
)
def test_backbone_prunes_its_embeddings_attention_and_ffn_only(name):
    backbone = getattr(keras_hub.models, name)(**BACKBONES[name])
    x = _inputs(backbone)
    expected = backbone.predict(x, verbose=0)
    pruned = kprune.prune_low_magnitude(backbone)
    paths = sorted(
        w.path
        for wrapper in collect_pruned_layers(pruned)
        for w, _, _ in wrapper.pruning_vars
    )
    assert paths == _worth_pruning(backbone)
    if name in ("BertBackbone", "GPT2Backbone"):
        assert "position_embedding/embeddings" in paths
    for a, b in zip(
        keras.tree.flatten(pruned.predict(x, verbose=0)),
        keras.tree.flatten(expected),
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_bert_text_classifier_prunes_and_fits_without_registration():
    backbone = keras_hub.models.BertBackbone(**TEXT)
    classifier = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None
    )
    x = _inputs(backbone)
    y = np.array([0, 1, 0, 1])
    pruned = kprune.prune_low_magnitude(
        classifier, kprune.ConstantSparsity(0.5, 0, frequency=1)
    )
    pruned.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    pruned.fit(
        x,
        y,
        batch_size=4,
        epochs=1,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    position = [
        w
        for wrapper in collect_pruned_layers(pruned)
        for w, _, _ in wrapper.pruning_vars
        if w.path.endswith("position_embedding/embeddings")
    ]
    assert len(position) == 1
    zeros = np.mean(keras.ops.convert_to_numpy(position[0]) == 0)
    assert zeros == pytest.approx(0.5)
    assert pruned.predict(x, verbose=0).shape == (4, 2)


def test_registration_takes_precedence_over_the_keras_hub_table():
    kprune.register_prunable_layer(keras_hub.layers.PositionEmbedding, [])
    backbone = keras_hub.models.GPT2Backbone(**TEXT)
    paths = {w.path for w in registry.get_prunable_weights(backbone)}
    assert "position_embedding/embeddings" not in paths
    assert "token_embedding/embeddings" in paths


def test_pruned_gpt2_layers_take_the_cached_decoding_calls():
    # `GPT2CausalLM.generate` calls the backbone's layers one by one with
    # `start_index=`, `self_attention_cache=` and its update index.
    backbone = keras_hub.models.GPT2Backbone(**TEXT)
    pruned = kprune.prune_low_magnitude(backbone)
    wrappers = {w.layer.name: w for w in collect_pruned_layers(pruned)}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    cache = rng.normal(size=(2, 2, 8, 2, 4)).astype("float32")
    index = keras.ops.convert_to_tensor(2, "int32")
    position = wrappers["position_embedding"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(position(x, start_index=index)),
        keras.ops.convert_to_numpy(
            backbone.get_layer("position_embedding")(x, start_index=index)
        ),
        atol=1e-6,
    )
    decoder = wrappers["transformer_layer_0"]
    kwargs = dict(
        self_attention_cache=cache, self_attention_cache_update_index=index
    )
    for a, b in zip(
        decoder(x, **kwargs),
        backbone.get_layer("transformer_layer_0")(x, **kwargs),
        strict=True,
    ):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            atol=1e-5,
        )


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "own kernel"])
def test_masked_lm_head_prunes_its_kernels_not_the_shared_embedding(tied):
    embedding = keras_hub.layers.ReversibleEmbedding(20, 8)
    embedding.build((None, 4))
    head = keras_hub.layers.MaskedLMHead(
        vocabulary_size=20,
        token_embedding=embedding if tied else None,
        name="head",
    )
    head(
        np.zeros((2, 4, 8), "float32"),
        mask_positions=np.zeros((2, 2), "int32"),
    )
    paths = [w.path for w in registry.get_prunable_weights(head)]
    expected = ["head/intermediate_dense/kernel"]
    if not tied:
        expected.append("head/output_kernel")
    assert paths == expected
