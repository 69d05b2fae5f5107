"""keras-hub models prune with no registration.

kprune knows keras-hub's own layers by their qualified class names, without
importing keras-hub: position embeddings are pruned, normalization scales
are kept dense. Tiny models are built from configs (no downloads). The
backbones of the sweep in docs/layers.md ("keras-hub models") are here too:
each trains to its target, strips and saves. A layer nobody describes fails
naming the registration that makes it work.
"""

import ast
import re

import keras
import numpy as np
import pytest

import kprune
from kprune import _keras_internals
from kprune import registry
from kprune.wrapper import collect_pruned_layers
from testing import reference_kept
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


def without(config, *names):
    return {k: v for k, v in config.items() if k not in names}


# Text models that take inputs of any length.
TEXT_ANY_LENGTH = without(TEXT, "max_sequence_length")
BACKBONES = {
    "BertBackbone": TEXT,
    "GPT2Backbone": TEXT,
    "DistilBertBackbone": TEXT,
    "RobertaBackbone": TEXT,
    "GemmaBackbone": {**DECODER, "head_dim": 4},
    "MistralBackbone": DECODER,
    "LlamaBackbone": DECODER,
}
# More backbones, from the sweep in docs/layers.md ("keras-hub models"):
# text decoders (mixtures of experts among them), encoders, seq2seq, vision
# and audio models. Each prunes, trains, strips and saves unregistered.
IMAGE = (16, 16, 3)
VISION = dict(
    image_shape=IMAGE,
    patch_size=4,
    num_layers=1,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=16,
)
SWEEP = {
    "QwenBackbone": DECODER,
    "Qwen3Backbone": {**DECODER, "head_dim": 4},
    "QwenMoeBackbone": {
        **DECODER,
        "moe_intermediate_dim": 8,
        "shared_expert_intermediate_dim": 16,
        "num_experts": 4,
        "top_k": 2,
    },
    "Qwen3MoeBackbone": {
        **DECODER,
        "head_dim": 4,
        "moe_intermediate_dim": 8,
        "num_experts": 4,
        "top_k": 2,
    },
    "MixtralBackbone": {**DECODER, "num_experts": 4, "top_k": 2},
    "GptOssBackbone": {**DECODER, "num_experts": 4, "top_k": 2, "head_dim": 4},
    "Phi3Backbone": DECODER,
    "Gemma3Backbone": {**DECODER, "head_dim": 4, "image_size": 16},
    "FalconBackbone": dict(
        vocabulary_size=20,
        num_layers=1,
        num_attention_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
    ),
    "OPTBackbone": TEXT,
    "BloomBackbone": TEXT_ANY_LENGTH,
    # Its rotary embedding covers a quarter of each head: 4 of 16.
    "GPTNeoXBackbone": {**TEXT, "hidden_dim": 16},
    "AlbertBackbone": {**TEXT, "embedding_dim": 4},
    "DebertaV3Backbone": {**TEXT, "bucket_size": 4},
    "XLMRobertaBackbone": TEXT,
    "FNetBackbone": without(TEXT, "num_heads"),
    "RoformerV2Backbone": {
        **TEXT_ANY_LENGTH,
        "head_size": 4,
    },
    "BartBackbone": TEXT,
    "ViTBackbone": {**without(VISION, "intermediate_dim"), "mlp_dim": 16},
    "CLIPVisionEncoder": VISION,
    "SigLIPVisionEncoder": VISION,
    "MobileNetBackbone": dict(
        stackwise_expansion=[[16], [24]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [8]],
        stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [1]],
        stackwise_se_ratio=[[None], [0.25]],
        stackwise_activation=[["relu"], ["hard_swish"]],
        stackwise_padding=[[1], [1]],
        output_num_filters=16,
        input_num_filters=8,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        squeeze_and_excite=0.5,
        last_layer_filter=16,
        image_shape=(32, 32, 3),
    ),
    "XceptionBackbone": dict(
        stackwise_conv_filters=[[8, 8], [16, 16]],
        stackwise_pooling=[False, True],
        image_shape=(32, 32, 3),
    ),
    "ResNetBackbone": dict(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=IMAGE,
    ),
    "CSPNetBackbone": dict(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 1],
        stackwise_strides=[1, 2],
        stackwise_num_filters=[8, 16],
        block_type="dark_block",
        stage_type="dark",
        image_shape=IMAGE,
    ),
    # The first block's squeeze-excite convs are made but never called.
    "EfficientNetBackbone": dict(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["fused", "unfused"],
        # Not `num_features`: keras-hub 0.32 leaves it out of `get_config`,
        # so a saved backbone loads with the default 1280 and fails.
        input_shape=IMAGE,
    ),
    "MoonshineBackbone": dict(
        vocabulary_size=20,
        filter_dim=8,
        encoder_num_layers=1,
        decoder_num_layers=1,
        hidden_dim=8,
        intermediate_dim=16,
        encoder_num_heads=2,
        decoder_num_heads=2,
    ),
    "WhisperBackbone": {
        **TEXT_ANY_LENGTH,
        "num_mels": 8,
        "max_encoder_sequence_length": 16,
        "max_decoder_sequence_length": 8,
    },
    # Layers holding position or relative position tables, or XLNet's
    # segment encoding, beside their sublayers.
    "DeiTBackbone": VISION,
    "DINOV2Backbone": {**VISION, "position_embedding_shape": IMAGE},
    "SwinTransformerBackbone": dict(
        image_shape=IMAGE,
        embed_dim=8,
        depths=[1],
        num_heads=[2],
        window_size=2,
        patch_size=2,
    ),
    "T5Backbone": {
        **TEXT_ANY_LENGTH,
        "key_value_dim": 4,
    },
    "XLNetBackbone": TEXT_ANY_LENGTH,
    # Its rotary embedding holds its frequencies but is never built.
    "SmolLMBackbone": dict(
        vocabulary_size=20,
        hidden_dim=8,
        intermediate_dim=16,
        num_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=False,
        attention_dropout=0.0,
        rope_layer_enabled_list=[True],
        layer_types=["attention"],
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        max_position_embeddings=8,
        rope_theta=10000.0,
        partial_rotary_factor=1.0,
    ),
}
# Input lengths the config fixes (Whisper's encoder reads all its frames).
LENGTHS = {
    "WhisperBackbone": {"encoder_features": 16},
    # Raw audio, down-sampled 384 times by Moonshine's convolutions.
    "MoonshineBackbone": {
        "encoder_input_values": 2048,
        "encoder_padding_mask": 2048,
    },
}
# Weights worth pruning: embeddings, attention projections, FFN kernels
# (one slice per expert in mixtures of experts). Biases and normalization
# weights (gamma, beta, scale), class tokens and buffers are not.
PRUNED_NAMES = (
    "kernel",
    "depthwise_kernel",
    "pointwise_kernel",
    "embeddings",
    "reverse_embeddings",
    "rel_embedding",  # DeBERTa's relative position embeddings
    "position_embedding",  # DeiT's position table
    "interpolated_position_embeddings",  # DINOv2's
    "relative_position_bias_table",  # Swin's; T5's is named embeddings
    "segment_encoding",  # XLNet's
    "expert_feedforward_gate_dense",
    "expert_feedforward_intermediate_dense",
    "expert_feedforward_output_dense",
    "gate_up_proj",
    "down_proj",
)


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


def _build(name):
    config = {**BACKBONES, **SWEEP}[name]
    return getattr(keras_hub.models, name)(**config)


def _inputs(backbone, lengths=None):
    """A batch of 4 for any backbone: token ids in [1, 20), padding masks
    of ones, segment ids of zeros, images and audio features at random;
    unknown lengths are 8 unless `lengths` says otherwise."""
    rng = np.random.default_rng(0)
    lengths = lengths or {}

    def fill(name, spec):
        shape = [4] + [d or lengths.get(name, 8) for d in spec.shape[1:]]
        dtype = keras.backend.standardize_dtype(spec.dtype)
        if "mask" in name:
            return np.ones(shape, dtype)
        if "segment" in name:
            return np.zeros(shape, dtype)
        if "int" in dtype:
            return rng.integers(1, 20, size=shape).astype(dtype)
        return rng.normal(size=shape).astype(dtype)

    if isinstance(backbone.input, dict):
        return {k: fill(k, v) for k, v in backbone.input.items()}
    return fill(backbone.input.name, backbone.input)


def _pooled_head(model):
    """`model` with a mean-pooled dense head over all its float outputs,
    so that every weight gets a gradient (the optimizer prunes only the
    weights it updates)."""

    def like(spec, name):
        return keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=name)

    if isinstance(model.input, dict):
        inputs = {k: like(v, k) for k, v in model.input.items()}
    else:
        inputs = like(model.input, None)
    pooled = []
    for t in keras.tree.flatten(model(inputs)):
        # Features only: Moonshine also returns its float attention mask,
        # of unknown width.
        dtype = keras.backend.standardize_dtype(t.dtype)
        if "float" in dtype and t.shape[-1] is not None:
            if len(t.shape) > 2:
                t = keras.layers.Reshape((-1, t.shape[-1]))(t)
                t = keras.layers.GlobalAveragePooling1D()(t)
            pooled.append(t)
    if len(pooled) > 1:
        pooled = [keras.layers.Concatenate()(pooled)]
    return keras.Model(inputs, keras.layers.Dense(1)(pooled[0]))


def _write_back_position_tables(model):
    """Does what keras-hub 0.32's DINOv2 fails to do half the time.

    `DINOV2Embedding` saves its trained position table (by interpolating it
    back into its frozen source table) only when the signed sum of its
    changes is positive, so a trained model, pruned or not, loads about half
    the time with its initial table. A user must write it back before
    saving, as here, with keras-hub's own interpolation.
    """
    for layer in _layers(model):
        if type(layer).__name__ == "DINOV2Embedding":
            layer.position_embeddings.assign(
                layer._interpolate_position_embeddings(
                    layer.interpolated_position_embeddings,
                    patch_size=layer.patch_size,
                    source_shape=layer.image_shape,
                    target_shape=layer.position_embedding_shape,
                    antialias=layer.antialias_in_interpolation,
                )
            )


def _outputs(model, x):
    return [
        keras.ops.convert_to_numpy(t)
        for t in keras.tree.flatten(model(x, training=False))
    ]


def _worth_pruning(model):
    return sorted(
        v.path for v in model.weights if v.path.split("/")[-1] in PRUNED_NAMES
    )


@pytest.mark.parametrize("name", sorted(BACKBONES) + sorted(SWEEP))
def test_backbone_layers_are_known_without_registration(name):
    backbone = _build(name)
    assert registry.status(backbone) == registry.PRUNABLE
    # A list, not a set: T5's two relative position tables share a path.
    pruned = sorted(w.path for w in registry.get_prunable_weights(backbone))
    assert pruned == _worth_pruning(backbone)


@pytest.mark.parametrize(
    "name",
    slow_except("BertBackbone", sorted(set(BACKBONES) - {"LlamaBackbone"})),
)
def test_backbone_prunes_its_embeddings_attention_and_ffn_only(name):
    backbone = _build(name)
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


@pytest.mark.parametrize(
    "name", slow_except("RoformerV2Backbone", sorted(SWEEP))
)
def test_backbone_trains_to_target_strips_and_saves(name, tmp_path):
    backbone = _build(name)
    x = _inputs(backbone, LENGTHS.get(name))
    pruned = kprune.prune_low_magnitude(
        backbone, kprune.ConstantSparsity(0.5, 0, frequency=1)
    )
    model = _pooled_head(pruned)
    model.compile(optimizer="adam", loss="mse")
    model.fit(
        x,
        np.ones((4, 1), "float32"),
        batch_size=2,
        epochs=1,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    wrapped = [
        (w, keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(m))
        for wrapper in collect_pruned_layers(pruned)
        for w, m, _ in wrapper.pruning_vars
    ]
    assert len(wrapped) == len(_worth_pruning(backbone))
    for variable, weight, mask in wrapped:
        if variable.trainable:
            assert mask.sum() == reference_kept(weight.size, 0.5)
            assert np.count_nonzero(weight[~mask]) == 0
        else:
            # A frozen layer (Whisper's sinusoidal position embedding)
            # keeps its weights: the optimizer never updates them.
            assert mask.all()

    expected = _outputs(pruned, x)
    stripped = kprune.strip_pruning(pruned)
    assert not collect_pruned_layers(stripped)
    for a, b in zip(_outputs(stripped, x), expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    _write_back_position_tables(stripped)
    stripped.save(tmp_path / "stripped.keras")
    loaded = keras.saving.load_model(tmp_path / "stripped.keras")
    for a, b in zip(_outputs(loaded, x), expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Pruned with an unstructured schedule, no layer is structured.
    assert kprune.structured.structured_plan(pruned) == {}


@pytest.mark.parametrize(
    "name", slow_except("RoformerV2Backbone", sorted(SWEEP))
)
def test_structured_plan_explains_every_backbone_layer_it_keeps(name):
    pruned = kprune.prune_low_magnitude(
        _build(name),
        kprune.structured.StructuredSparsity(kprune.ConstantSparsity(0.5, 0)),
    )
    plan = kprune.structured.structured_plan(pruned)
    names = {w.layer.name for w in collect_pruned_layers(pruned)}
    assert names <= set(plan)
    for reason in plan.values():
        assert reason is None or (isinstance(reason, str) and reason)


# Layers of the keras-hub table, forgotten by a test to see what a user meets
# with a layer nobody describes: weights of its own that are matrices, and
# sublayers.
FORGOTTEN = {
    "DeiTBackbone": "models.deit.deit_layers.DeiTEmbeddings",
    "SwinTransformerBackbone": (
        "models.swin_transformer.swin_transformer_layers.WindowAttention"
    ),
}


@pytest.mark.parametrize("name", sorted(FORGOTTEN))
def test_undescribed_weights_fail_naming_a_registration_that_works(
    name, monkeypatch
):
    monkeypatch.delitem(
        registry._PRUNABLE_BY_NAME, registry._KERAS_HUB + FORGOTTEN[name]
    )
    backbone = _build(name)
    before = [keras.ops.convert_to_numpy(w) for w in backbone.weights]
    with pytest.raises(ValueError) as error:
        kprune.prune_low_magnitude(backbone)
    for a, w in zip(before, backbone.weights, strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(w))
        assert w.constraint is None
    # The user copies the registration the message suggests.
    classes = {type(layer).__name__: type(layer) for layer in _layers(backbone)}
    found = re.search(
        r"register_prunable_layer\((\w+), (\[[^]]*\])\)", str(error.value)
    )
    assert FORGOTTEN[name].endswith("." + found[1])
    names = ast.literal_eval(found[2])
    kprune.register_prunable_layer(classes[found[1]], names)
    pruned = kprune.prune_low_magnitude(backbone)
    # It keeps the sublayers' kernels pruned, by their dotted names, and
    # prunes what the table would.
    assert any("." in n and n.endswith("kernel") for n in names)
    pruned_paths = sorted(
        w.path
        for wrapper in collect_pruned_layers(pruned)
        for w, _, _ in wrapper.pruning_vars
    )
    assert pruned_paths == _worth_pruning(backbone)


def _layers(model):
    return _keras_internals.flatten_layers(model)
