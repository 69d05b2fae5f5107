"""One-shot pruning (`kprune.oneshot`): the papers' algorithms, exactly.

The references below are transcriptions of the papers written for these
tests, in the papers' layout (`W` of shape `(out, in)`, one row per output
unit), not the library's: magnitude per layer, Wanda's per-output
comparison of `|W| * ||X||` (Sun et al., 2023, Eq. 1 and Sec. 3), and
SparseGPT's Algorithm 1 (Frantar & Alistarh, 2023) without the lazy batch
updates: each column's error is applied to all later columns at once,
which the blocked updates must equal.
"""

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from kprune import _keras_internals
from kprune import oneshot as oneshot_module
from kprune.oneshot import oneshot
from testing import reference_kept
from testing import slow_except
from testing import tiny_gpt2


def reference_magnitude(weights, sparsity):
    """`(out, in)` weights; zeros the smallest magnitudes of the layer."""
    flat = np.abs(weights).ravel()
    pruned = np.argsort(flat, kind="stable")[: int(flat.size * sparsity)]
    result = weights.copy().ravel()
    result[pruned] = 0
    return result.reshape(weights.shape)


def reference_wanda(weights, inputs, sparsity, m_by_n=None):
    """Wanda: per output row, zero the lowest `|W_ij| * ||X_j||_2`."""
    norms = np.sqrt((inputs.astype(np.float64) ** 2).sum(axis=0))
    result = weights.copy()
    for row in range(weights.shape[0]):
        score = np.abs(weights[row]) * norms
        if m_by_n is None:
            lowest = np.argsort(score)[: int(weights.shape[1] * sparsity)]
            result[row, lowest] = 0
        else:
            m, n = m_by_n
            for start in range(0, weights.shape[1], n):
                group = np.argsort(score[start : start + n])[:m]
                result[row, start + group] = 0
    return result


def reference_sparsegpt(
    weights, inputs, sparsity, m_by_n=None, blocksize=128, percdamp=0.01
):
    """SparseGPT, Algorithm 1, with every update applied at once."""
    w = weights.astype(np.float64).copy()
    x = inputs.astype(np.float64)
    columns = w.shape[1]
    hessian = 2.0 * x.T @ x / x.shape[0]
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hessian += percdamp * np.mean(np.diag(hessian)) * np.eye(columns)
    # H^-1 = U^T U with U upper triangular: the Cholesky factor the paper
    # reads its rows from.
    inverse = np.linalg.cholesky(np.linalg.inv(hessian)).T
    keep = np.ones_like(w, bool)
    for j in range(columns):
        if m_by_n is None and j % blocksize == 0:
            block = slice(j, min(j + blocksize, columns))
            score = w[:, block] ** 2 / np.diag(inverse)[block] ** 2
            count = int(round(score.size * sparsity))
            lowest = np.argsort(score.ravel())[:count]
            block_keep = np.ones(score.size, bool)
            block_keep[lowest] = False
            keep[:, block] = block_keep.reshape(score.shape)
        if m_by_n is not None and j % m_by_n[1] == 0:
            group = slice(j, j + m_by_n[1])
            score = w[:, group] ** 2 / np.diag(inverse)[group] ** 2
            lowest = np.argsort(score, axis=1)[:, : m_by_n[0]]
            group_keep = np.ones_like(score, bool)
            np.put_along_axis(group_keep, lowest, False, axis=1)
            keep[:, group] = group_keep
        error = np.where(keep[:, j], 0.0, w[:, j]) / inverse[j, j]
        w[:, j:] -= np.outer(error, inverse[j, j:])
    return w * keep


def dense_model(inputs, outputs):
    return keras.Sequential([keras.Input((inputs,)), layers.Dense(outputs)])


def kernel(layer):
    return keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)


def correlated_inputs(n, features, seed=0):
    """Inputs whose features are correlated and of unequal scales."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features))
    scales = np.exp(rng.normal(size=features))
    x = rng.normal(size=(n, features)) @ mixing * scales
    return x.astype("float32")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_dense_layer_matches_the_reference(method):
    x = correlated_inputs(512, 256)
    model = dense_model(256, 16)
    weights = kernel(model.layers[0]).T
    oneshot(model, x, sparsity=0.5, method=method, verbose=0)
    if method == "magnitude":
        expected = reference_magnitude(weights, 0.5)
    elif method == "wanda":
        expected = reference_wanda(weights, x, 0.5)
    else:
        expected = reference_sparsegpt(weights, x, 0.5)
    result = kernel(model.layers[0]).T
    np.testing.assert_array_equal(result == 0, expected == 0)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)


def test_magnitude_matches_kprune_masking():
    model = dense_model(12, 10)
    weights = kernel(model.layers[0])
    oneshot(model, method="magnitude", sparsity=0.7, verbose=0)
    mask, _ = kprune.masking.magnitude_mask(weights.astype("float32"), 0.7)
    np.testing.assert_array_equal(
        kernel(model.layers[0]) != 0, keras.ops.convert_to_numpy(mask)
    )


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_matches_the_reference(method):
    x = correlated_inputs(256, 64)
    model = dense_model(64, 8)
    weights = kernel(model.layers[0]).T
    oneshot(model, x, method=method, sparsity_m_by_n=(2, 4), verbose=0)
    if method == "magnitude":
        expected = reference_wanda(weights, np.ones((1, 64)), 0, (2, 4))
    elif method == "wanda":
        expected = reference_wanda(weights, x, 0, (2, 4))
    else:
        expected = reference_sparsegpt(weights, x, 0, (2, 4))
    result = kernel(model.layers[0]).T
    groups = (result != 0).reshape(8, 16, 4).sum(axis=-1)
    assert (groups == 2).all()
    np.testing.assert_array_equal(result == 0, expected == 0)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)


def test_sparsegpt_blocks_smaller_than_the_layer_match_the_reference():
    # Several mask blocks, a dead input, and a damping of 0.1.
    x = correlated_inputs(300, 48, seed=1)
    x[:, 5] = 0
    model = dense_model(48, 6)
    weights = kernel(model.layers[0]).T
    oneshot(
        model, x, sparsity=0.75, blocksize=16, hessian_damping=0.1, verbose=0
    )
    expected = reference_sparsegpt(weights, x, 0.75, None, 16, 0.1)
    result = kernel(model.layers[0]).T
    np.testing.assert_array_equal(result == 0, expected == 0)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)
    assert (result[:, 5] == 0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_each_layer_keeps_exactly_the_kept_count(method):
    # 13 x 7 at 0.3: 63.7 weights kept rounds to 64; rows of 13 inputs.
    model = keras.Sequential(
        [keras.Input((13,)), layers.Dense(7), layers.Dense(5)]
    )
    x = correlated_inputs(64, 13)
    oneshot(model, x, sparsity=0.3, method=method, blocksize=4, verbose=0)
    for layer in model.layers:
        weights = kernel(layer)
        assert np.count_nonzero(weights) == reference_kept(weights.size, 0.3)


def test_einsum_dense_is_pruned_along_its_contracted_axes():
    # A multi-head output projection: input (batch, seq, heads, head_dim),
    # kernel (heads, head_dim, out); each output sums heads x head_dim.
    inputs = keras.Input((5, 2, 8))
    layer = layers.EinsumDense("abcd,cde->abe", output_shape=(None, 12))
    model = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5, 2, 8)).astype("float32")
    weights = kernel(layer).reshape(16, 12).T
    oneshot(model, x, method="sparsegpt", verbose=0)
    expected = reference_sparsegpt(weights, x.reshape(-1, 16), 0.5)
    result = kernel(layer).reshape(16, 12).T
    np.testing.assert_array_equal(result == 0, expected == 0)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)


def test_einsum_dense_with_input_axis_before_the_batch_axes():
    # Query projection: "abc,cde->abde", contracting the feature axis.
    inputs = keras.Input((5, 8))
    layer = layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3))
    model = keras.Model(inputs, layer(inputs))
    x = correlated_inputs(60, 8).reshape(12, 5, 8)
    weights = kernel(layer).reshape(8, 6).T
    oneshot(model, x, method="wanda", verbose=0)
    expected = reference_wanda(weights, x.reshape(-1, 8), 0.5)
    np.testing.assert_array_equal(
        kernel(layer).reshape(8, 6).T, expected.astype("float32")
    )


def test_layers_are_calibrated_on_the_outputs_of_the_pruned_layers_before():
    model = keras.Sequential(
        [
            keras.Input((32,)),
            layers.Dense(24, activation="relu"),
            layers.Dense(8),
        ]
    )
    x = correlated_inputs(128, 32)
    first, second = (kernel(layer).T for layer in model.layers)
    bias = keras.ops.convert_to_numpy(model.layers[0].bias)
    oneshot(model, x, method="sparsegpt", batch_size=50, verbose=0)
    first = reference_sparsegpt(first, x, 0.5)
    hidden = np.maximum(x @ first.T + bias, 0)
    expected = reference_sparsegpt(second, hidden, 0.5)
    np.testing.assert_allclose(
        kernel(model.layers[1]).T, expected, rtol=1e-3, atol=1e-4
    )


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    x = correlated_inputs(512, 64)
    base = dense_model(64, 32)
    dense = keras.ops.convert_to_numpy(base(x))
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = dense_model(64, 32)
        model.set_weights(base.get_weights())
        oneshot(model, x, method=method, verbose=0)
        output = keras.ops.convert_to_numpy(model(x))
        errors[method] = float(np.mean((output - dense) ** 2))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def _mlp():
    return keras.Sequential(
        [
            keras.Input((16,)),
            layers.Dense(32, activation="relu"),
            layers.Dense(32, activation="relu"),
            layers.Dense(4),
        ]
    )


def _functional():
    a = keras.Input((16,), name="a")
    b = keras.Input((6,), name="b")
    h = layers.Dense(32, activation="relu", name="da")(a)
    g = layers.Dense(32, activation="relu", name="db")(b)
    h = layers.Concatenate()([h, g])
    h = layers.LayerNormalization()(h)
    return keras.Model({"a": a, "b": b}, layers.Dense(4, name="out")(h))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.first = layers.Dense(32, activation="relu")
        self.shared = layers.Dense(32, activation="relu")
        self.head = layers.Dense(4)

    def call(self, x):
        # `shared` is called twice: both calls' inputs calibrate it.
        return self.head(self.shared(self.shared(self.first(x))))


def _inputs(kind, n=256):
    rng = np.random.default_rng(3)
    if kind == "functional":
        return {
            "a": rng.normal(size=(n, 16)).astype("float32"),
            "b": rng.normal(size=(n, 6)).astype("float32"),
        }
    return correlated_inputs(n, 16, seed=3)


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_models_keep_their_outputs_at_low_sparsity(kind, method):
    model = {"sequential": _mlp, "functional": _functional}.get(
        kind, _Subclassed
    )()
    x = _inputs(kind)
    dense = keras.ops.convert_to_numpy(model(x))
    result = oneshot(model, x, sparsity=0.2, method=method, verbose=0)
    assert result is model
    output = keras.ops.convert_to_numpy(model(x))
    relative = np.mean((output - dense) ** 2) / np.mean(dense**2)
    assert relative < 0.05
    for layer in model.layers:
        if isinstance(layer, layers.Dense):
            weights = kernel(layer)
            assert np.count_nonzero(weights) == reference_kept(
                weights.size, 0.2
            )


def test_calibration_data_may_be_an_iterable_of_batches_or_of_x_y_pairs():
    # Lists and tuples are model inputs, as in `fit`; batches come from
    # any other iterable.
    x = _inputs("sequential", 96)
    weights = _mlp().get_weights()
    pairs = ((x[i : i + 48], None) for i in (0, 48))
    assert_same_pruning(weights, (x, iter([x[:48], x[48:]]), pairs))


def test_layers_argument_prunes_only_the_chosen_layers():
    model = _mlp()
    before = [kernel(layer) for layer in model.layers]
    oneshot(
        model,
        _inputs("sequential"),
        layers=[model.layers[1].name],
        verbose=0,
    )
    after = [kernel(layer) for layer in model.layers]
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[2], before[2])
    assert np.mean(after[1] == 0) == 0.5


def one_shot_pruned(layer):
    """The selector docs/oneshot.md gives: layers holding a kernel that is
    at least half zeros."""
    return any(
        np.mean(keras.ops.convert_to_numpy(w) == 0) >= 0.5
        for w in layer.weights
        if w.name == "kernel"
    )


def _attention_model():
    inputs = keras.Input((6, 8))
    h = layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    h = layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, layers.Dense(4)(h))


@pytest.mark.parametrize(
    "kind",
    slow_except("mlp_unstructured", ["mlp_unstructured", "attention_2_4"]),
)
def test_zeros_stay_fixed_during_a_recovery_fine_tune(kind):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(64, 4)).astype("float32")
    if kind == "mlp_unstructured":
        model, x = _mlp(), _inputs("sequential", 64)
        oneshot(model, x, method="sparsegpt", verbose=0)
    else:
        model = _attention_model()
        x = rng.normal(size=(64, 6, 8)).astype("float32")
        oneshot(model, x, sparsity_m_by_n=(2, 4), verbose=0)
    kernels = [w for w in model.weights if w.name == "kernel"]
    zeros = [keras.ops.convert_to_numpy(w) == 0 for w in kernels]
    assert all(z.mean() == 0.5 for z in zeros)
    # The mask is computed once, at the first step, from the pruned
    # weights: their zeros are the smallest magnitudes. 2:4 keeps half of
    # each kernel, so an unstructured mask of 0.5 finds the same zeros.
    pruned = kprune.prune_low_magnitude(
        model,
        kprune.ConstantSparsity(0.5, begin_step=1, end_step=1),
        layers=one_shot_pruned,
    )
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    tuned = kprune.strip_pruning(pruned)
    after = [w for w in tuned.weights if w.name == "kernel"]
    assert len(after) == len(zeros)
    for weight, before in zip(after, zeros):
        value = keras.ops.convert_to_numpy(weight)
        np.testing.assert_array_equal(value == 0, before)
    # The fine-tune changed the kept weights.
    assert not all(
        np.array_equal(keras.ops.convert_to_numpy(a), b)
        for a, b in zip(after, [keras.ops.convert_to_numpy(w) for w in kernels])
    )


def _unchanged(model, before):
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, "`sparsity` must be a number in \\[0, 1\\)"),
        ({"sparsity": -0.1}, "`sparsity` must be a number in \\[0, 1\\)"),
        ({"method": "obs"}, "must be one of \\['magnitude', 'sparsegpt'"),
        (
            {"sparsity_m_by_n": (2, 5)},
            "for these layers \\(input channels\\): \\[.dense \\(16\\)",
        ),
        ({"sparsity_m_by_n": (4, 2)}, "`sparsity_m_by_n` must be a tuple"),
        ({"layers": ["nope"]}, "does not have: \\['nope'\\]"),
        ({"blocksize": 0}, "`blocksize` must be an integer > 0"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, message):
    model = _mlp()
    before = model.get_weights()
    with pytest.raises(ValueError, match=message):
        oneshot(model, _inputs("sequential", 16), verbose=0, **kwargs)
    _unchanged(model, before)


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_calibration_data_of_the_wrong_shape_raises(kind):
    model = _mlp() if kind == "sequential" else _Subclassed()
    if kind == "subclassed":
        model(_inputs(kind, 2))
    before = model.get_weights()
    x = np.ones((8, 5), "float32")
    with pytest.raises(ValueError, match="calibration"):
        oneshot(model, x, verbose=0)
    _unchanged(model, before)


def test_missing_calibration_data_raises_for_data_methods():
    model = _mlp()
    with pytest.raises(ValueError, match="`calibration_data` is required"):
        oneshot(model, method="wanda", verbose=0)


def test_a_model_with_nothing_prunable_raises():
    model = keras.Sequential(
        [keras.Input((4, 3)), layers.LayerNormalization(), layers.Flatten()]
    )
    before = model.get_weights()
    with pytest.raises(ValueError, match="no layer that one-shot pruning"):
        oneshot(model, np.ones((2, 4, 3), "float32"), verbose=0)
    _unchanged(model, before)


def test_an_unbuilt_subclassed_model_is_built_on_the_calibration_data():
    model = _Subclassed()
    oneshot(model, _inputs("subclassed", 32), method="wanda", verbose=0)
    assert np.mean(kernel(model.first) == 0) == 0.5


CONVOLUTIONS = {
    "conv2d_same_strided": (
        lambda: layers.Conv2D(4, 3, strides=2, padding="same"),
        (9, 7, 4),
    ),
    "conv2d_valid_dilated": (
        lambda: layers.Conv2D(4, 3, dilation_rate=2),
        (9, 7, 4),
    ),
    "conv2d_even_kernel_same": (
        lambda: layers.Conv2D(4, (2, 4), strides=(1, 3), padding="same"),
        (9, 7, 4),
    ),
    "conv2d_channels_first": (
        lambda: layers.Conv2D(
            4, 3, strides=2, padding="same", data_format="channels_first"
        ),
        (3, 7, 6),
    ),
    "conv1d_causal": (lambda: layers.Conv1D(4, 3, padding="causal"), (9, 4)),
    "conv2d_1x1": (lambda: layers.Conv2D(4, 1), (9, 7, 4)),
    "conv3d_same": (lambda: layers.Conv3D(4, 2, padding="same"), (5, 4, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(CONVOLUTIONS))
def test_convolution_rows_reproduce_the_convolution(name):
    make, shape = CONVOLUTIONS[name]
    layer = make()
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    output = keras.ops.convert_to_numpy(layer(x))
    if layer.data_format == "channels_first":
        output = np.moveaxis(output, 1, -1)
    output = output - keras.ops.convert_to_numpy(layer.bias)
    linear = oneshot_module._linear(layer)
    np.testing.assert_allclose(
        linear.rows(x) @ linear.matrix(),
        output.reshape(-1, 4),
        rtol=1e-4,
        atol=1e-4,
    )


def test_conv2d_sparsegpt_matches_the_reference_on_its_patches():
    conv = layers.Conv2D(8, 3, padding="same", name="conv")
    model = keras.Sequential([keras.Input((6, 6, 4)), conv])
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 4)).astype("float32")
    rows = oneshot_module._linear(conv).rows(x)
    weights = kernel(conv).reshape(36, 8).T
    oneshot(model, x, sparsity_m_by_n=(2, 4), verbose=0)
    expected = reference_sparsegpt(weights, rows, 0, (2, 4))
    result = kernel(conv).reshape(36, 8).T
    np.testing.assert_array_equal(result == 0, expected == 0)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)


def test_a_failure_half_way_restores_the_pruned_layers(monkeypatch):
    model = _mlp()
    before = model.get_weights()
    calls = []
    prune = oneshot_module._SparseGPT.prune

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return prune(self, *args, **kwargs)

    monkeypatch.setattr(oneshot_module._SparseGPT, "prune", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        oneshot(model, _inputs("sequential", 32), verbose=0)
    _unchanged(model, before)


def assert_same_pruning(weights, calibration_sources):
    """The MLP with `weights`, pruned from each source of the same
    calibration batches, gets the same kernels."""
    results = []
    for data in calibration_sources:
        model = _mlp()
        model.set_weights(weights)
        oneshot(model, data, batch_size=48, verbose=0)
        results.append([kernel(layer) for layer in model.layers])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _tiny_gpt2_causal_lm():
    pytest.importorskip("keras_hub")
    return tiny_gpt2()


@pytest.mark.slow
@pytest.mark.parametrize("m_by_n", [None, (2, 4)])
def test_gpt2_causal_lm_is_pruned_in_place_and_still_generates(m_by_n):
    keras_hub = pytest.importorskip("keras_hub")
    lm = _tiny_gpt2_causal_lm()
    rng = np.random.default_rng(0)
    tokens = {
        "token_ids": rng.integers(1, 8, size=(32, 8)).astype("int32"),
        "padding_mask": np.ones((32, 8), "int32"),
    }
    embedding = keras.ops.convert_to_numpy(
        lm.backbone.token_embedding.embeddings
    )
    result = oneshot(lm, tokens, sparsity_m_by_n=m_by_n, verbose=0)
    assert result is lm and type(lm) is keras_hub.models.GPT2CausalLM
    linear = [
        layer
        for layer in _keras_internals.flatten_layers(lm.backbone)
        if isinstance(layer, (layers.Dense, layers.EinsumDense))
    ]
    # Per block: query, key, value, attention output, two FFN layers.
    assert len(linear) == 12
    for layer in linear:
        weights = kernel(layer)
        if m_by_n is None:
            assert np.count_nonzero(weights) == weights.size // 2
        else:
            # (in, out): 2 of every 4 consecutive inputs of each output.
            matrix = oneshot_module._linear(layer).matrix()
            groups = (matrix.T != 0).reshape(-1, 4)
            assert (groups.sum(axis=-1) == 2).all()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(lm.backbone.token_embedding.embeddings),
        embedding,
    )
    out = lm.generate(["a b", "c"], max_length=8)
    assert len(out) == 2 and out[0].startswith("a b")


def test_self_attention_projections_are_calibrated_in_one_pass():
    model = _attention_model()
    attention = model.layers[1]
    x = np.random.default_rng(0).normal(size=(32, 6, 8)).astype("float32")
    linears, _ = oneshot_module._select(model, None)
    groups, _, _ = oneshot_module._call_order(model, linears, x)
    names = [[linear.layer.name for linear in group] for group in groups]
    assert names == [
        ["query", "key", "value"],
        ["attention_output"],
        [model.layers[-1].name],
    ]
    projections = [attention.query_dense, attention.key_dense]
    projections.append(attention.value_dense)
    before = [kernel(layer).reshape(8, 8).T for layer in projections]
    oneshot(model, x, verbose=0)
    for layer, weights in zip(projections, before):
        expected = reference_sparsegpt(weights, x.reshape(-1, 8), 0.5)
        result = kernel(layer).reshape(8, 8).T
        np.testing.assert_array_equal(result == 0, expected == 0)
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have")
def test_int8_quantization_keeps_the_zeros():
    model = _mlp()
    oneshot(model, _inputs("sequential", 64), verbose=0)
    zeros = [kernel(layer) == 0 for layer in model.layers]
    model.quantize("int8")
    for layer, before in zip(model.layers, zeros):
        quantized = keras.ops.convert_to_numpy(layer.kernel)
        assert quantized.dtype == np.int8
        assert (quantized[before] == 0).all()


class _Batches(keras.utils.PyDataset):
    def __init__(self, x):
        super().__init__()
        self.x = x

    def __len__(self):
        return 2

    def __getitem__(self, index):
        x = self.x[index * 48 : (index + 1) * 48]
        return x, np.zeros((len(x), 4), "float32")


def test_calibration_data_may_be_a_tf_dataset_or_a_py_dataset():
    import tensorflow as tf

    x = _inputs("sequential", 96)
    weights = _mlp().get_weights()
    assert_same_pruning(
        weights,
        (
            x,
            tf.data.Dataset.from_tensor_slices((x, x[:, :4])).batch(48),
            _Batches(x),
        ),
    )


def test_dict_calibration_data_of_the_wrong_shape_names_the_input():
    model = _functional()
    before = model.get_weights()
    x = _inputs("functional", 8)
    x["b"] = x["b"][:, :5]
    with pytest.raises(ValueError, match="input 'b' has shape \\(None, 6\\)"):
        oneshot(model, x, verbose=0)
    _unchanged(model, before)


def test_mixed_precision_layers_are_pruned_from_their_float32_kernels():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            layers.Dense(8, dtype="mixed_bfloat16"),
            layers.Dense(4, dtype="mixed_float16"),
        ]
    )
    oneshot(model, _inputs("sequential", 32), verbose=0)
    for layer in model.layers:
        assert layer.kernel.dtype == "float32"
        assert np.mean(kernel(layer) == 0) == 0.5


def test_a_sparsity_dict_prunes_each_named_layer_to_its_own_sparsity():
    model = _mlp()
    names = [layer.name for layer in model.layers]
    last = kernel(model.layers[2])
    oneshot(
        model,
        _inputs("sequential", 64),
        sparsity={names[0]: 0.75, names[1]: 0.25},
        verbose=0,
    )
    assert np.mean(kernel(model.layers[0]) == 0) == 0.75
    assert np.mean(kernel(model.layers[1]) == 0) == 0.25
    np.testing.assert_array_equal(kernel(model.layers[2]), last)
    with pytest.raises(ValueError, match="not both"):
        oneshot(model, _inputs("sequential", 8), {names[0]: 0.5}, layers=[])
    with pytest.raises(ValueError, match="`sparsity` must be a number"):
        oneshot(model, _inputs("sequential", 8), {names[0]: 1.5})


def test_layers_it_cannot_prune_are_left_dense_with_a_warning():
    inputs = keras.Input((4, 8))
    per_head = layers.EinsumDense("abc,bcd->abd", output_shape=(4, 6))
    h = per_head(inputs)
    model = keras.Model(inputs, layers.Dense(3)(h))
    before = kernel(per_head)
    x = np.random.default_rng(0).normal(size=(16, 4, 8)).astype("float32")
    with pytest.warns(UserWarning, match="keeps kernel axes \\['b'\\]"):
        oneshot(model, x, verbose=0)
    np.testing.assert_array_equal(kernel(per_head), before)
    assert np.mean(kernel(model.layers[-1]) == 0) == 0.5


def test_branches_on_one_input_keep_their_own_statistics():
    # Inception-like: a 1x1 and a 3x3 convolution read the same tensor, in
    # one pass, but unfold it differently.
    inputs = keras.Input((6, 6, 4))
    small = layers.Conv2D(8, 1, name="small")
    large = layers.Conv2D(8, 3, padding="same", name="large")
    h = layers.Concatenate()([small(inputs), large(inputs)])
    model = keras.Model(inputs, h)
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 4)).astype("float32")
    linears, _ = oneshot_module._select(model, None)
    groups, _, _ = oneshot_module._call_order(model, linears, x)
    assert [[x.layer.name for x in group] for group in groups] == [
        ["small", "large"]
    ]
    before = {
        layer.name: (
            kernel(layer).reshape(-1, 8).T,
            oneshot_module._linear(layer).rows(x),
        )
        for layer in (small, large)
    }
    oneshot(model, x, verbose=0)
    for layer in (small, large):
        weights, rows = before[layer.name]
        expected = reference_sparsegpt(weights, rows, 0.5)
        result = kernel(layer).reshape(-1, 8).T
        np.testing.assert_array_equal(result == 0, expected == 0)
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)
