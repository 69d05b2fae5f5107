"""One-shot pruning block by block (`kprune.oneshot`, issue 14 point 2).

A model whose layers lie in a chain of blocks (keras-hub's
`sequential_blocks`, a `Sequential` model's layers) is calibrated by
running each block alone on its inputs kept from the block before. These
tests check that this gives the weights of the path that runs the whole
model from its input for every group of layers (still used for other
models), and that it runs the layers before the blocks once per batch.
"""

import keras
import numpy as np
import pytest
from keras import layers

from kprune import _keras_internals
from kprune import oneshot as oneshot_module
from kprune.oneshot import oneshot
from kprune.oneshot import quantize_gptq
from testing import slow_except
from testing import tiny_gpt2


def _tokens(n=16, vocabulary=8, length=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(1, vocabulary, (n, length)).astype("int32"),
        "padding_mask": np.ones((n, length), "int32"),
    }


def _whole_model_passes(monkeypatch):
    """Makes `oneshot` find no blocks, so that it runs the whole model for
    every group of layers."""
    monkeypatch.setattr(
        oneshot_module, "_candidate_blocks", lambda model, structure=None: []
    )


def _values(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def _assert_same_values(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _no_hook_left(model):
    return all(
        "call" not in vars(layer)
        for layer in _keras_internals.flatten_layers(model, include_self=True)
    )


def _gpt2_blocks(lm):
    return lm.get_quantization_layer_structure("gptq")["sequential_blocks"]


@pytest.mark.parametrize(
    "kwargs",
    slow_except(
        {"method": "sparsegpt"},
        [
            {"method": "sparsegpt"},
            {"method": "wanda"},
            {"method": "sparsegpt", "sparsity_m_by_n": (2, 4)},
            {"method": "wanda", "sparsity_m_by_n": (2, 4)},
        ],
    ),
    ids=["sparsegpt", "wanda", "sparsegpt_2_4", "wanda_2_4"],
)
def test_gpt2_pruned_by_blocks_equals_pruned_by_whole_model_passes(
    kwargs, monkeypatch
):
    pytest.importorskip("keras_hub")
    lm = tiny_gpt2()
    weights = lm.get_weights()
    x = _tokens()
    oneshot(lm, x, batch_size=4, verbose=0, **kwargs)
    by_blocks = _values(lm)
    lm.set_weights(weights)
    _whole_model_passes(monkeypatch)
    oneshot(lm, x, batch_size=4, verbose=0, **kwargs)
    _assert_same_values(by_blocks, _values(lm))
    assert _no_hook_left(lm)


def test_gpt2_layers_before_the_blocks_run_once_per_batch():
    pytest.importorskip("keras_hub")
    lm = tiny_gpt2()
    embedding = lm.backbone.token_embedding
    last_block = _gpt2_blocks(lm)[-1]
    counts = {embedding.name: 0, last_block.name: 0}
    for layer in (embedding, last_block):
        original = layer.call

        def call(*args, _original=original, _name=layer.name, **kwargs):
            # Calls on a calibration batch (of 4), not the symbolic ones
            # of keras-hub's `get_quantization_layer_structure`, and not
            # the tied embedding's calls as the output projection.
            if args[0].shape[0] == 4 and not kwargs.get("reverse"):
                counts[_name] += 1
            return _original(*args, **kwargs)

        layer.call = call
    oneshot(lm, _tokens(), batch_size=4, verbose=0)
    # One pass finds the order of the layers; then the model runs once per
    # batch (4), up to the first block. Whole-model passes would run the
    # embedding 33 times (once more per group of layers and batch).
    assert counts[embedding.name] == 1 + 4
    # The last block: the first pass, then once per batch (stopped early)
    # for each of its 4 groups (query/key/value, attention output, the two
    # feed-forward layers); its output is never needed.
    assert counts[last_block.name] == 1 + 4 * 4


def test_gpt2_failure_in_a_later_block_restores_every_layer(monkeypatch):
    pytest.importorskip("keras_hub")
    lm = tiny_gpt2()
    before = _values(lm)
    calls = []
    prune = oneshot_module._SparseGPT.prune

    def failing(self, *args, **kwargs):
        calls.append(1)
        # Query, key, value, attention output, 2 FFN layers: the 8th layer
        # is the second block's key projection.
        if len(calls) == 8:
            raise RuntimeError("out of memory")
        return prune(self, *args, **kwargs)

    monkeypatch.setattr(oneshot_module._SparseGPT, "prune", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        oneshot(lm, _tokens(), batch_size=4, verbose=0)
    assert len(calls) == 8
    _assert_same_values(before, _values(lm))
    assert _no_hook_left(lm)


def test_gpt2_progress_bar_counts_blocks(capsys):
    pytest.importorskip("keras_hub")
    lm = tiny_gpt2()
    oneshot(lm, _tokens(), batch_size=4, verbose=1)
    out = capsys.readouterr().out
    assert "2/2" in out and "/block" in out


@pytest.mark.slow
def test_bert_masked_lm_blocks_and_head_equal_whole_model_passes(
    monkeypatch,
):
    # keras-hub's structure for a MaskedLM names only the token embedding
    # before the blocks, while BERT adds position and segment embeddings
    # and a layer norm, and the blocks take a padding mask: the inputs of
    # the first block are taken from the model's own pass. The masked-LM
    # head's Dense layer comes after the blocks.
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    lm = keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)
    rng = np.random.default_rng(0)
    x = _tokens(vocabulary=16)
    x["padding_mask"][:, 6:] = 0
    x["segment_ids"] = np.zeros((16, 8), "int32")
    x["mask_positions"] = rng.integers(0, 6, (16, 2)).astype("int32")
    linears, _ = oneshot_module._select(lm, None)
    groups, _, chain = oneshot_module._call_order(
        lm, linears, x, oneshot_module._candidate_blocks(lm)
    )
    assert chain is not None
    assert chain[1] == [0] * 4 + [1] * 4 + [None, None]
    assert [linear.layer.name for linear in groups[-1]] == [
        "intermediate_dense"
    ]
    weights = lm.get_weights()
    oneshot(lm, x, batch_size=4, verbose=0)
    by_blocks = _values(lm)
    lm.set_weights(weights)
    _whole_model_passes(monkeypatch)
    oneshot(lm, x, batch_size=4, verbose=0)
    _assert_same_values(by_blocks, _values(lm))


@pytest.mark.slow
def test_gptq_by_blocks_equals_gptq_by_whole_model_passes(monkeypatch):
    pytest.importorskip("keras_hub")
    x = _tokens()
    config = keras.quantizers.GPTQConfig(None, None, group_size=8)
    results = []
    for blocks in (True, False):
        keras.utils.set_random_seed(0)
        lm = tiny_gpt2()
        if not blocks:
            _whole_model_passes(monkeypatch)
        quantize_gptq(lm, x, config, batch_size=4, verbose=0)
        results.append(_values(lm))
    _assert_same_values(*results)


class _Block(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(8, activation="tanh")

    def call(self, x, shift):
        return self.dense(x) + shift


class _Stack(keras.Model):
    """Three blocks, each given `shift`: the same tensor, or with
    `per_block`, a number of its own."""

    def __init__(self, per_block, **kwargs):
        super().__init__(**kwargs)
        self.per_block = per_block
        self.stack = [_Block() for _ in range(3)]
        self.head = layers.Dense(2)

    def call(self, x):
        shift = keras.ops.mean(x, axis=-1, keepdims=True)
        for index, block in enumerate(self.stack):
            x = block(x, shift=float(index) if self.per_block else shift)
        return self.head(x)

    def get_quantization_layer_structure(self, mode=None):
        return {"pre_block_layers": [], "sequential_blocks": self.stack}


@pytest.mark.parametrize("per_block", [False, True])
def test_blocks_are_used_only_when_each_takes_the_arguments_of_the_first(
    per_block, monkeypatch
):
    model = _Stack(per_block)
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    model(x)
    linears, _ = oneshot_module._select(model, None)
    _, _, chain = oneshot_module._call_order(
        model, linears, x, oneshot_module._candidate_blocks(model)
    )
    if per_block:
        assert chain is None
    else:
        assert chain == (model.stack, [0, 1, 2, None])
    weights = model.get_weights()
    oneshot(model, x, batch_size=8, verbose=0)
    result = _values(model)
    model.set_weights(weights)
    _whole_model_passes(monkeypatch)
    oneshot(model, x, batch_size=8, verbose=0)
    _assert_same_values(result, _values(model))


def test_sequential_layers_are_blocks_but_a_residual_model_has_none():
    sequential = keras.Sequential(
        [
            keras.Input((8,)),
            layers.Dense(8, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(4),
        ]
    )
    inputs = keras.Input((8,))
    h = layers.Dense(8)(inputs)
    residual = keras.Model(inputs, layers.Add()([h, layers.Dense(8)(h)]))
    x = np.ones((4, 8), "float32")
    chains = []
    for model in (sequential, residual):
        linears, _ = oneshot_module._select(model, None)
        _, _, chain = oneshot_module._call_order(
            model, linears, x, oneshot_module._candidate_blocks(model)
        )
        chains.append(chain)
    assert chains[0] == (sequential.layers, [0, 2])
    assert chains[1] is None
