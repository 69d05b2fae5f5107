"""A pruned layer is called exactly as the layer it wraps.

Keyword-only calls, masks, `training`, tuple outputs, several inputs and
extra arguments (keras-hub's `cache=`, `padding_mask=`) reach the wrapped
layer as they would unwrapped: the pruned model computes what the plain
model computes, and trains.
"""

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from kprune.wrapper import collect_pruned_layers
from testing import slow_except

RNG = np.random.default_rng(0)
TOKENS = np.array(
    [[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [1, 1, 1, 1, 1], [2, 0, 0, 0, 0]]
)


def _floats(*shape):
    return RNG.normal(size=shape).astype("float32")


@keras.saving.register_keras_serializable(package="kprune_tests")
class CachedBlock(keras.layers.Layer):
    """Calls like keras-hub's decoder blocks: extra tensor and non-tensor
    keyword arguments, two outputs, and no `training` argument."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(8)
        self.dropout = layers.Dropout(0.5)

    def call(self, x, padding_mask=None, cache=None, cache_update_index=0):
        y = self.dropout(self.dense(x))
        if padding_mask is not None:
            y = y * keras.ops.cast(padding_mask[..., None], y.dtype)
        if cache is not None:
            cache = cache + y * cache_update_index
        return y, cache


def mha_keywords():
    x = keras.Input((5, 8))
    y = layers.MultiHeadAttention(2, 4)(query=x, value=x)
    return keras.Model(x, y), _floats(4, 5, 8)


def mha_masked_keywords():
    tokens = keras.Input((5,), dtype="int32")
    e = layers.Embedding(10, 8, mask_zero=True)(tokens)
    y = layers.MultiHeadAttention(2, 4)(query=e, value=e, key=e)
    # Pooling skips masked steps: a lost mask changes the output.
    y = layers.GlobalAveragePooling1D()(y)
    return keras.Model(tokens, y), TOKENS


def lstm_masked_keyword():
    tokens = keras.Input((5,), dtype="int32")
    e = layers.Embedding(10, 8, mask_zero=True)(tokens)
    y = layers.LSTM(4, return_sequences=True)(sequences=e)
    y = layers.GlobalAveragePooling1D()(y)
    return keras.Model(tokens, y), TOKENS


def attention_scores():
    x = keras.Input((5, 8))
    y, scores = layers.MultiHeadAttention(2, 4)(
        query=x, value=x, return_attention_scores=True
    )
    return keras.Model(x, [y, scores]), _floats(4, 5, 8)


def several_inputs():
    a = keras.Input((5, 8))
    b = keras.Input((3, 8))
    y = layers.MultiHeadAttention(2, 4)(a, b, b, use_causal_mask=False)
    return keras.Model([a, b], y), [_floats(4, 5, 8), _floats(4, 3, 8)]


def extra_arguments():
    x = keras.Input((5, 8))
    mask = keras.Input((5,))
    cache = keras.Input((5, 8))
    y, new_cache = CachedBlock()(
        x=x, padding_mask=mask, cache=cache, cache_update_index=2
    )
    model = keras.Model([x, mask, cache], [y, new_cache])
    data = [
        _floats(4, 5, 8),
        (RNG.random((4, 5)) > 0.5).astype("float32"),
        _floats(4, 5, 8),
    ]
    return model, data


CALL_STYLES = [
    mha_keywords,
    mha_masked_keywords,
    lstm_masked_keyword,
    attention_scores,
    several_inputs,
    extra_arguments,
]


def _assert_all_close(a, b):
    for x, y in zip(keras.tree.flatten(a), keras.tree.flatten(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("build", CALL_STYLES, ids=lambda f: f.__name__)
def test_pruned_model_computes_what_the_plain_model_computes(build):
    model, x = build()
    expected = model.predict(x, verbose=0)
    pruned = kprune.prune_low_magnitude(model)
    assert collect_pruned_layers(pruned)
    _assert_all_close(pruned.predict(x, verbose=0), expected)


@pytest.mark.parametrize(
    "build", slow_except(several_inputs, CALL_STYLES), ids=lambda f: f.__name__
)
def test_each_call_style_trains_to_the_target_sparsity(build):
    model, x = build()
    pruned = kprune.prune_low_magnitude(
        model, kprune.ConstantSparsity(0.5, 0, frequency=1)
    )
    y = keras.tree.map_structure(np.zeros_like, model.predict(x, verbose=0))
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(
        x,
        y,
        batch_size=2,
        epochs=1,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    for wrapper in collect_pruned_layers(pruned):
        assert int(wrapper.pruning_step.numpy()) == 2
        for weight, _, _ in wrapper.pruning_vars:
            zeros = np.mean(keras.ops.convert_to_numpy(weight) == 0)
            assert zeros == pytest.approx(0.5, abs=0.05), weight.path


def test_keyword_called_pruned_model_saves_and_reloads(tmp_path):
    model, x = mha_masked_keywords()
    pruned = kprune.prune_low_magnitude(model)
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    _assert_all_close(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0)
    )


def test_training_reaches_a_wrapped_layer_whose_call_does_not_take_it():
    block = CachedBlock()
    wrapped = kprune.PruneLowMagnitude(block)
    x = _floats(4, 5, 8)
    inference, _ = wrapped(x, cache=x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(inference),
        keras.ops.convert_to_numpy(block(x, cache=x)[0]),
        atol=1e-6,
    )
    # The Dropout inside reads `training` from the call context.
    driver = kprune.UpdatePruningStep()
    driver.set_model(wrapped)
    driver.on_train_begin()
    trained, _ = wrapped(x, cache=x, training=True)
    dropped = np.mean(keras.ops.convert_to_numpy(trained) == 0)
    assert 0.2 < dropped < 0.8
