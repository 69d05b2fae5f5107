"""StructuredSparsity through attention: MultiHeadAttention heads and the
feed-forward units of keras-hub transformer blocks, found by tracing the
blocks' graphs."""

import os

import keras
import numpy as np
import pytest
from keras import layers

import kprune
import testing
from kprune import _keras_internals
from kprune.wrapper import collect_pruned_layers

keras_hub = pytest.importorskip("keras_hub")

VOCABULARY, LENGTH, HIDDEN, HEADS, FFN = 50, 8, 16, 4, 32


def small_backbone(cls, num_layers):
    """A keras-hub backbone of the small sizes above, seeded."""
    keras.utils.set_random_seed(0)
    return cls(
        vocabulary_size=VOCABULARY,
        num_layers=num_layers,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=FFN,
        max_sequence_length=LENGTH,
    )


def bert(num_layers=2):
    return small_backbone(keras_hub.models.BertBackbone, num_layers)


def bert_inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, LENGTH), "int32")
    padding[1, 5:] = 0
    padding[-1, 2:] = 0
    return {
        "token_ids": rng.integers(0, VOCABULARY, (batch, LENGTH)).astype(
            "int32"
        ),
        "segment_ids": rng.integers(0, 2, (batch, LENGTH)).astype("int32"),
        "padding_mask": padding,
    }


def numpy_outputs(model, x):
    outputs = model(x)
    if isinstance(outputs, dict):
        return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}
    return {"output": keras.ops.convert_to_numpy(outputs)}


def assert_same_outputs(a, b, x, tolerance=1e-5):
    first, second = numpy_outputs(a, x), numpy_outputs(b, x)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_allclose(
            first[key], second[key], rtol=tolerance, atol=tolerance
        )


def mask(pruned, path):
    for wrapper in collect_pruned_layers(pruned):
        for weight, mask_variable, _ in wrapper.pruning_vars:
            if weight.path == path:
                return keras.ops.convert_to_numpy(mask_variable)
    raise KeyError(path)


def gpt2(num_layers=2):
    return small_backbone(keras_hub.models.GPT2Backbone, num_layers)


def gpt2_inputs(batch=4, length=LENGTH, seed=0):
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, length), "int32")
    padding[-1, length // 2 :] = 0
    return {
        "token_ids": rng.integers(0, VOCABULARY, (batch, length)).astype(
            "int32"
        ),
        "padding_mask": padding,
    }


def kept_heads(pruned, block, attention="self_attention_layer"):
    """The heads kept by the masks of the 4 projections, which agree."""
    attention = f"{block}/{attention}"
    heads = [
        mask(pruned, f"{attention}/{name}/kernel").any(axis=(0, 2))
        for name in ("query", "key", "value")
    ]
    heads.append(
        mask(pruned, f"{attention}/attention_output/kernel").any((1, 2))
    )
    for other in heads[1:]:
        np.testing.assert_array_equal(other, heads[0])
    return heads[0]


def test_bert_loses_heads_and_ffn_units_and_matches_the_masked_model():
    model = bert()
    pruned = testing.prune_at_once(model, 0.5)
    x = bert_inputs()
    for block in ("transformer_layer_0", "transformer_layer_1"):
        heads = kept_heads(pruned, block)
        assert heads.sum() == HEADS // 2
        # Whole heads: a kept head keeps its whole slice.
        query = mask(pruned, f"{block}/self_attention_layer/query/kernel")
        np.testing.assert_array_equal(query.all(axis=(0, 2)), heads)
        units = mask(pruned, f"{block}/feedforward_intermediate_dense/kernel")
        units = units.any(axis=0)
        assert units.sum() == FFN // 2
        # The output Dense reads only the kept units and keeps its own.
        rows = mask(pruned, f"{block}/feedforward_output_dense/kernel")
        np.testing.assert_array_equal(rows.any(axis=1), units)
        assert rows.any(axis=0).all()

    small = kprune.structured.shrink_model(pruned)
    assert not collect_pruned_layers(small)
    attention = small.get_layer("transformer_layer_0_self_attention_layer")
    assert attention.num_heads == HEADS // 2
    assert attention.query_dense.kernel.shape == (HIDDEN, 2, HIDDEN // HEADS)
    assert attention.output_dense.kernel.shape == (2, HIDDEN // HEADS, HIDDEN)
    intermediate = small.get_layer(
        "transformer_layer_0_feedforward_intermediate_dense"
    )
    assert intermediate.units == FFN // 2
    # Each block loses 2 heads (q, k, v kernels and biases, output kernel
    # rows) and 16 FFN units (a kernel column and bias, an output row).
    head_dim = HIDDEN // HEADS
    per_head = 3 * (HIDDEN * head_dim + head_dim) + head_dim * HIDDEN
    per_unit = HIDDEN + 1 + HIDDEN
    removed = 2 * (2 * per_head + (FFN // 2) * per_unit)
    dense = kprune.strip_pruning(pruned)
    assert small.count_params() == dense.count_params() - removed
    assert_same_outputs(small, pruned, x)
    # The masks do change the model: the dense weights give other outputs.
    unmasked = numpy_outputs(model, x)["sequence_output"]
    assert (
        np.abs(unmasked - numpy_outputs(small, x)["sequence_output"]).max()
        > 1e-3
    )


@pytest.mark.parametrize("backbone", [bert, gpt2])
def test_tracing_leaves_the_model_unchanged(backbone):
    model = backbone(num_layers=1)
    pruned = testing.prune_at_once(model, 0.5)
    kprune.structured.structured_plan(pruned)
    kprune.structured.shrink_model(pruned)
    block = pruned.get_layer("prune_low_magnitude_transformer_layer_0").layer
    for layer in _keras_internals.flatten_layers(block):
        assert _keras_internals.call_count(layer) == 0, layer.name
        assert not layer._outbound_nodes, layer.name
    assert len(pruned.operations) == len(model.operations)


def test_shrunk_bert_round_trips_through_a_keras_file(tmp_path):
    pruned = testing.prune_at_once(bert(num_layers=1), 0.5)
    small = kprune.structured.shrink_model(pruned)
    path = os.path.join(tmp_path, "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    x = bert_inputs()
    assert_same_outputs(loaded, small, x, tolerance=1e-6)
    assert loaded.count_params() == small.count_params()


def test_plan_explains_every_transformer_layer_left_whole():
    pruned = kprune.prune_low_magnitude(
        bert(num_layers=1),
        kprune.StructuredSparsity(kprune.ConstantSparsity(0.5, 1)),
    )
    plan = kprune.structured.structured_plan(pruned)
    block = "transformer_layer_0"
    assert plan[block] is None
    assert plan[f"{block}/self_attention_layer"] is None
    assert plan[f"{block}/feedforward_intermediate_dense"] is None
    # The residual `x + residual` and the LayerNorm keep the hidden size.
    why = plan[f"{block}/feedforward_output_dense"]
    assert "keras.ops Add" in why and block in why
    for name in ("token_embedding", "segment_embedding", "position_embedding"):
        assert "no channel rule" in plan[name]
    assert plan["pooled_dense"] == "its output is a model output"
    # Every layer with weights StructuredSparsity prunes is in the plan.
    assert set(plan) >= {w.layer.name for w in collect_pruned_layers(pruned)}


def test_fit_trains_the_masks_of_heads_and_ffn_units():
    model = bert(num_layers=1)
    pruned = kprune.prune_low_magnitude(
        model,
        kprune.StructuredSparsity(
            kprune.ConstantSparsity(0.5, begin_step=1, frequency=1)
        ),
    )
    x = bert_inputs(batch=4)
    assert kept_heads(pruned, "transformer_layer_0").all()
    outputs = numpy_outputs(pruned, x)
    y = {k: np.zeros(v.shape, "float32") for k, v in outputs.items()}
    pruned.compile(optimizer="adam", loss={k: "mse" for k in outputs})
    testing.fit_pruned(pruned, x, y, epochs=2)
    assert kept_heads(pruned, "transformer_layer_0").sum() == HEADS // 2
    units = mask(
        pruned, "transformer_layer_0/feedforward_intermediate_dense/kernel"
    )
    assert units.any(axis=0).sum() == FFN // 2
    # The optimizer keeps the removed heads' weights at zero.
    path = "transformer_layer_0/self_attention_layer/query/kernel"
    (query,) = [w for w in pruned.weights if w.path == path]
    query = keras.ops.convert_to_numpy(query)
    heads = kept_heads(pruned, "transformer_layer_0")
    assert not query[:, ~heads].any()
    small = kprune.structured.shrink_model(pruned)
    assert_same_outputs(small, pruned, x)


def attention_model():
    """Dense -> MultiHeadAttention (self-attention) -> Dense -> pooling."""
    inputs = keras.Input((6, 8))
    h = layers.Dense(12, activation="relu", name="proj")(inputs)
    a = layers.MultiHeadAttention(num_heads=4, key_dim=3, name="mha")(h, h)
    a = layers.Dense(10, activation="relu", name="after")(a)
    a = layers.GlobalAveragePooling1D()(a)
    return keras.Model(inputs, layers.Dense(3, name="head")(a))


def test_a_functional_multi_head_attention_loses_heads_and_its_inputs():
    keras.utils.set_random_seed(0)
    pruned = testing.prune_at_once(attention_model(), 0.5)
    plan = kprune.structured.structured_plan(pruned)
    assert plan["mha"] is None and plan["proj"] is None
    assert plan["after"] is None
    x = np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32")
    small = kprune.structured.shrink_model(pruned)
    attention = small.get_layer("mha")
    assert attention.num_heads == 2
    # The attention's projections read only the 6 kept units of `proj`.
    assert attention.query_dense.kernel.shape == (6, 2, 3)
    assert small.get_layer("proj").units == 6
    assert small.get_layer("after").units == 5
    assert_same_outputs(small, pruned, x)


def test_attention_keeps_at_least_one_head():
    keras.utils.set_random_seed(0)
    pruned = testing.prune_at_once(attention_model(), 0.95)
    small = kprune.structured.shrink_model(pruned)
    assert small.get_layer("mha").num_heads == 1
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")
    assert_same_outputs(small, pruned, x)


def test_gpt2_decoder_blocks_lose_heads_and_ffn_units_for_any_input_size(
    tmp_path,
):
    # GPT-2's TransformerDecoder builds its causal mask from the batch and
    # sequence sizes: it is traced with placeholder sizes, and the shrunk
    # model runs the block's own call with smaller sublayers.
    model = gpt2()
    pruned = testing.prune_at_once(model, 0.5)
    plan = kprune.structured.structured_plan(pruned)
    for block in ("transformer_layer_0", "transformer_layer_1"):
        assert plan[block] is None
        assert plan[f"{block}/self_attention"] is None
        assert plan[f"{block}/feedforward_intermediate_dense"] is None
        assert kept_heads(pruned, block, "self_attention").sum() == HEADS // 2
        units = mask(pruned, f"{block}/feedforward_intermediate_dense/kernel")
        assert units.any(axis=0).sum() == FFN // 2
    small = kprune.structured.shrink_model(pruned)
    assert not collect_pruned_layers(small)
    head_dim = HIDDEN // HEADS
    per_head = 3 * (HIDDEN * head_dim + head_dim) + head_dim * HIDDEN
    per_unit = HIDDEN + 1 + HIDDEN
    removed = 2 * (2 * per_head + (FFN // 2) * per_unit)
    assert small.count_params() == model.count_params() - removed
    # Any batch size and sequence length, shorter than the traced one too.
    for batch, length in ((4, LENGTH), (3, 5), (1, 1)):
        assert_same_outputs(small, pruned, gpt2_inputs(batch, length))
    path = os.path.join(tmp_path, "small.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.count_params() == small.count_params()
    assert_same_outputs(loaded, small, gpt2_inputs(2, 6), tolerance=1e-6)
    # The masks do change the model: the dense weights give other outputs.
    x = gpt2_inputs()
    gap = numpy_outputs(model, x)["output"] - numpy_outputs(small, x)["output"]
    assert np.abs(gap).max() > 1e-3


def test_gpt2_causal_lm_logits_shrink_and_generate_runs_on_the_masked_lm():
    """The documented path: GPT2CausalLM's backbone is a nested model, so
    the LM is pruned as a flat functional model from the backbone's inputs
    to the logits (its tied token embedding), and `generate()` runs on the
    GPT2CausalLM given the stripped (masked) weights."""
    backbone = gpt2(num_layers=1)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    # Pruned as it is, the LM's blocks are inside its backbone and stay,
    # and shrinking keeps the token embedding shared by the nested
    # backbone and the logits (one copy, not two).
    whole = kprune.prune_low_magnitude(
        lm, kprune.StructuredSparsity(kprune.ConstantSparsity(0.5, 1))
    )
    plan = kprune.structured.structured_plan(whole)
    assert "nested" in plan["transformer_layer_0"]
    same = kprune.structured.shrink_model(whole)
    assert same.count_params() == lm.count_params()
    assert_same_outputs(same, lm, gpt2_inputs(2, 6))
    logits = backbone.token_embedding(backbone.output, reverse=True)
    flat = keras.Model(backbone.input, logits)
    pruned = testing.prune_at_once(flat, 0.5)
    small = kprune.structured.shrink_model(pruned)
    # One block loses 2 heads and 16 FFN units; the token embedding stays
    # shared by the input and the logits.
    head_dim = HIDDEN // HEADS
    per_head = 3 * (HIDDEN * head_dim + head_dim) + head_dim * HIDDEN
    removed = 2 * per_head + (FFN // 2) * (2 * HIDDEN + 1)
    assert small.count_params() == flat.count_params() - removed
    x = gpt2_inputs(2, 6)
    assert_same_outputs(small, pruned, x)
    stripped = kprune.strip_pruning(pruned)
    for layer in lm.backbone.layers:
        layer.set_weights(stripped.get_layer(layer.name).get_weights())
    assert_same_outputs(lm, small, x)
    # Greedy generation fills the padded positions; each token is the
    # argmax of the shrunk model's logits one position before it.
    lm.compile(sampler="greedy")
    prompt = gpt2_inputs(2, LENGTH)
    prompt["padding_mask"][:, 3:] = 0
    generated = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(generated[:, :3], prompt["token_ids"][:, :3])
    scores = numpy_outputs(
        small,
        {"token_ids": generated, "padding_mask": np.ones_like(generated)},
    )["output"]
    np.testing.assert_array_equal(
        scores[:, 2:-1].argmax(axis=-1), generated[:, 3:]
    )


class Untraceable(layers.Layer):
    """A block whose call cannot run on `KerasTensor`s, as one calling a
    backend's own functions."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(6, name="dense")

    def call(self, x):
        if isinstance(x, keras.KerasTensor):
            raise TypeError("a backend function got a KerasTensor")
        return self.dense(x)


def test_a_block_whose_call_cannot_be_traced_keeps_its_units():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 6))
    x = layers.Dense(6, name="d0")(inputs)
    x = Untraceable(name="block")(x)
    model = keras.Model(inputs, layers.Dense(2, name="out")(x))
    pruned = testing.prune_at_once(model, 0.5)
    plan = kprune.structured.structured_plan(pruned)
    assert plan["block"].startswith(
        "StructuredSparsity has no channel rule for Untraceable layers, and "
        "kprune cannot trace its call"
    )
    assert "'block' (Untraceable)" in plan["d0"]
    small = kprune.structured.shrink_model(pruned)
    assert small.count_params() == model.count_params()
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype("float32")
    assert_same_outputs(small, pruned, x)


class FeedForward(layers.Layer):
    """A user's block: Dense -> ReLU -> Dense, added to its input."""

    def __init__(self, hidden, units, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.units = units
        self.up = layers.Dense(units, activation="relu", name="up")
        self.down = layers.Dense(hidden, name="down")

    def call(self, x):
        return x + self.down(self.up(x))

    def get_config(self):
        return {
            **super().get_config(),
            "hidden": self.hidden,
            "units": self.units,
        }


def test_a_custom_block_is_traced_and_inlined_as_plain_keras_layers(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 6))
    x = FeedForward(6, 10, name="block")(inputs)
    model = keras.Model(inputs, layers.Dense(2, name="head")(x))
    pruned = testing.prune_at_once(model, 0.5)
    plan = kprune.structured.structured_plan(pruned)
    assert plan["block"] is None and plan["block/up"] is None
    assert "keras.ops Add in 'block'" in plan["block/down"]
    small = kprune.structured.shrink_model(pruned)
    assert small.get_layer("block_up").units == 5
    x = np.random.default_rng(0).normal(size=(3, 5, 6)).astype("float32")
    assert_same_outputs(small, pruned, x)
    # The user's class is gone: the file loads without it.
    path = os.path.join(tmp_path, "small.keras")
    small.save(path)
    assert_same_outputs(keras.saving.load_model(path), small, x, 1e-6)


def test_layers_that_run_their_sublayers_otherwise_are_left_whole():
    """RNNs and TimeDistributed hold sublayers but do not call them as
    layers: their graph cannot be followed, and the plan says so."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 6))
    x = layers.Dense(8, name="d0")(inputs)
    x = layers.TimeDistributed(layers.Dense(8), name="td")(x)
    x = layers.Bidirectional(layers.GRU(4, return_sequences=True), name="bi")(x)
    x = layers.Dense(6, name="d1")(x)
    model = keras.Model(inputs, layers.Dense(2, name="out")(x))
    pruned = testing.prune_at_once(model, 0.5)
    plan = kprune.structured.structured_plan(pruned)
    for name, kind in (("td", "TimeDistributed"), ("bi", "Bidirectional")):
        assert plan[name].startswith(
            f"StructuredSparsity has no channel rule for {kind} layers"
        ), plan[name]
    assert "'td' (TimeDistributed)" in plan["d0"]
    assert plan["d1"] is None
    small = kprune.structured.shrink_model(pruned)
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype("float32")
    assert_same_outputs(small, pruned, x)
