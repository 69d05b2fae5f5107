"""2:4 (N:M) kernels in the layout of NVIDIA's sparse tensor cores."""

import keras
import numpy as np
import pytest

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp


def two_four(shape, axis, seed=0):
    """Random weights keeping the 2 largest of every 4 along `axis`."""
    rng = np.random.default_rng(seed)
    w = np.moveaxis(rng.normal(size=shape).astype("float32"), axis, -1)
    groups = w.reshape(-1, 4)
    smallest = np.argsort(np.abs(groups), axis=-1)[:, :2]
    np.put_along_axis(groups, smallest, 0.0, axis=-1)
    return np.moveaxis(groups.reshape(w.shape), -1, axis)


def dense_model(inputs=64, units=32):
    model = keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(units, name="fc")]
    )
    kernel, bias = model.layers[0].get_weights()
    model.layers[0].set_weights([two_four(kernel.shape, 0), bias + 0.5])
    return model


def only(exported):
    assert len(exported) == 1
    return next(iter(exported.values()))


def test_dense_matrix_is_transposed_kernel_and_round_trips():
    model = dense_model()
    w = only(kprune.export.semi_structured_weights(model))
    kernel = model.layers[0].get_weights()[0]
    np.testing.assert_array_equal(w["matrix"], kernel.T)
    assert w["matrix"].flags["C_CONTIGUOUS"]
    assert w["values"].shape == (32, 32)
    assert w["indices"].dtype == np.uint8 and w["indices"].max() < 4
    assert w["kernel_shape"] == (64, 32)
    np.testing.assert_array_equal(
        kprune.export.semi_structured_to_dense(w["values"], w["indices"]),
        w["matrix"],
    )


def test_compressed_form_keeps_two_positions_per_group_with_zeros():
    model = dense_model()
    kernel, bias = model.layers[0].get_weights()
    kernel[:4, 0] = [0.0, 0.0, 0.0, 3.0]  # one nonzero in the first group
    model.layers[0].set_weights([kernel, bias])
    w = only(kprune.export.semi_structured_weights(model))
    np.testing.assert_array_equal(w["indices"][0, :2], [0, 3])
    np.testing.assert_array_equal(w["values"][0, :2], [0.0, 3.0])
    np.testing.assert_array_equal(
        kprune.export.semi_structured_to_dense(w["values"], w["indices"]),
        kernel.T,
    )


def test_kernel_breaking_the_pattern_is_named():
    model = dense_model()
    kernel, bias = model.layers[0].get_weights()
    kernel[4:8, 5] = 1.0  # row 5 (unit 5), inputs 4 to 7: 4 nonzeros
    model.layers[0].set_weights([kernel, bias])
    with pytest.raises(ValueError, match=r"'.*fc'.*2:4.*row 5, inputs 4"):
        kprune.export.semi_structured_weights(model)


def test_shape_rule_names_the_layer_and_the_rule():
    model = dense_model(inputs=64, units=3)
    with pytest.raises(ValueError, match=r"fc.*multiple of 32.*dense"):
        kprune.export.semi_structured_weights(model)
    with pytest.raises(ValueError, match=r"multiple of 128"):
        kprune.export.semi_structured_weights(
            dense_model(inputs=64, units=32), dtype="int8"
        )
    w = only(kprune.export.semi_structured_weights(model, dtype=None))
    assert w["matrix"].shape == (3, 64)


def test_model_trained_with_2_4_sparsity_exports():
    model = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(inputs=64, hidden=64, outputs=32),
            kprune.ConstantSparsity(0.5, 0, frequency=1),
            sparsity_m_by_n=(2, 4),
        )
    )
    x, y = classification_data(n=8, shape=(64,))
    fit_pruned(model, x, y)
    exported = kprune.export.semi_structured_weights(model)
    stripped = kprune.strip_pruning(model)
    kernels = [layer.kernel for layer in stripped.layers]
    assert len(exported) == 2
    for w, kernel in zip(exported.values(), kernels):
        matrix = w["matrix"]
        np.testing.assert_array_equal(
            matrix, keras.ops.convert_to_numpy(kernel).T
        )
        groups = (matrix != 0).reshape(matrix.shape[0], -1, 4)
        assert groups.sum(axis=-1).max() <= 2
        np.testing.assert_array_equal(
            kprune.export.semi_structured_to_dense(w["values"], w["indices"]),
            matrix,
        )


def test_unpruned_layers_of_a_pruned_model_stay_out():
    model = keras.Sequential(
        [
            keras.Input((64,)),
            kprune.prune_low_magnitude(
                keras.layers.Dense(32, name="sparse"),
                kprune.ConstantSparsity(0.5, 0),
                sparsity_m_by_n=(2, 4),
            ),
            keras.layers.Dense(3, name="head"),
        ]
    )
    x, y = classification_data(n=4, shape=(64,))
    fit_pruned(compile_classifier(model), x, y)
    exported = kprune.export.semi_structured_weights(model)
    assert [path.split("/")[-1] for path in exported] == ["sparse"]


def test_attention_einsum_kernels_in_out_by_in_orientation():
    x = np.random.default_rng(1).normal(size=(2, 5, 64)).astype("float32")
    query = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 32))
    query.build(x.shape)
    kernel = two_four((64, 2, 32), axis=0)
    query.set_weights([kernel])
    output = keras.layers.EinsumDense("abcd,cde->abe", (None, 64))
    output.build((2, 5, 2, 32))
    out_kernel = two_four((2, 32, 64), axis=1, seed=2)
    output.set_weights([out_kernel])
    inputs = keras.Input((5, 64))
    model = keras.Model(inputs, output(query(inputs)))

    exported = kprune.export.semi_structured_weights(model)
    q, o = (exported[layer.path] for layer in (query, output))
    np.testing.assert_array_equal(
        q["matrix"], np.transpose(kernel, (1, 2, 0)).reshape(64, 64)
    )
    np.testing.assert_array_equal(o["matrix"], out_kernel.reshape(64, 64).T)
    y = keras.ops.convert_to_numpy(query(x)).reshape(10, 64)
    np.testing.assert_allclose(
        x.reshape(10, 64) @ q["matrix"].T, y, rtol=1e-5, atol=1e-5
    )


def test_conv_matrix_is_filters_by_channels_last_patch():
    x = np.random.default_rng(3).normal(size=(1, 5, 5, 64)).astype("float32")
    conv = keras.layers.Conv2D(32, 3, use_bias=False, name="conv")
    model = keras.Sequential([keras.Input((5, 5, 64)), conv])
    conv.set_weights([two_four((3, 3, 64, 32), axis=2)])
    w = only(kprune.export.semi_structured_weights(model))
    kernel = conv.get_weights()[0]
    np.testing.assert_array_equal(
        w["matrix"], np.transpose(kernel, (3, 0, 1, 2)).reshape(32, 576)
    )
    patch = x[0, 1:4, 2:5, :].reshape(-1)  # output position (1, 2)
    y = keras.ops.convert_to_numpy(model(x))[0, 1, 2]
    np.testing.assert_allclose(w["matrix"] @ patch, y, rtol=1e-4, atol=1e-4)


def test_layer_without_a_gemm_matrix_is_refused_by_name():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 8)),
            keras.layers.DepthwiseConv2D(3, name="dw"),
        ]
    )
    assert kprune.export.semi_structured_weights(model) == {}
    with pytest.raises(ValueError, match=r"dw.*DepthwiseConv2D.*dense"):
        kprune.export.semi_structured_weights(model, layers=["dw"])
    with pytest.raises(ValueError, match=r"`layers` names 'nope'"):
        kprune.export.semi_structured_weights(model, layers=["nope"])


def test_torch_matmul_of_exported_matrix_equals_dense_layer():
    torch = pytest.importorskip("torch")
    model = dense_model()
    x = np.random.default_rng(4).normal(size=(64, 6)).astype("float32")
    w = only(kprune.export.semi_structured_weights(model))
    bias = model.layers[0].get_weights()[1]
    y = torch.from_numpy(w["matrix"]) @ torch.from_numpy(x)
    expected = keras.ops.convert_to_numpy(model(x.T)) - bias
    np.testing.assert_allclose(y.numpy().T, expected, rtol=1e-5, atol=1e-5)


def test_torch_semi_structured_tensors_need_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: CPU rejection not checked")
    w = only(kprune.export.semi_structured_weights(dense_model()))
    matrix = torch.from_numpy(w["matrix"]).half()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.sparse.to_sparse_semi_structured(matrix)


def attention_model():
    inputs = keras.Input((8, 64))
    attention = keras.layers.MultiHeadAttention(2, 32, name="attention")
    return keras.Model(inputs, attention(inputs, inputs))


def test_naming_an_attention_layer_exports_its_projections():
    model = attention_model()
    for variable in model.weights:
        if variable.path.endswith("output/kernel"):
            variable.assign(two_four((2, 32, 64), axis=1))
        elif variable.path.endswith("kernel"):
            variable.assign(two_four((64, 2, 32), axis=0))
    exported = kprune.export.semi_structured_weights(
        model, layers=["attention"]
    )
    assert sorted(path.split("/")[-1] for path in exported) == [
        "attention_output",
        "key",
        "query",
        "value",
    ]
    assert all(w["matrix"].shape == (64, 64) for w in exported.values())


def test_attention_pruned_2_4_exports():
    # The query, key and value kernels are grouped along their own input
    # axis (0, of their EinsumDense), not the attention layer's (-2, which
    # is their heads axis): all four projections come out 2:4.
    model = kprune.prune_low_magnitude(
        attention_model(),
        kprune.ConstantSparsity(0.5, 0),
        sparsity_m_by_n=(2, 4),
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(5).normal(size=(4, 8, 64)).astype("float32")
    fit_pruned(model, x, x)
    assert len(kprune.export.semi_structured_weights(model)) == 4
