"""LiteRT export of pruned models."""

import os
import warnings
import zipfile

import keras
import numpy as np
import pytest

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import inference
from testing import mlp
from testing import requires_tensorflow
from testing import small_cnn


def run_litert(path, x, default_delegates=False):
    """Runs a file, with the builtin kernels unless `default_delegates`:
    TF 2.21's default XNNPACK delegate cannot prepare sparse dynamic-range
    models."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_litert.interpreter import OpResolverType
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
        OpResolverType = tf.lite.experimental.OpResolverType
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite's deprecation notice
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=(
                OpResolverType.BUILTIN
                if default_delegates
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            ),
        )
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def trained_pruned_cnn():
    model = compile_classifier(
        kprune.prune_low_magnitude(
            small_cnn(), kprune.ConstantSparsity(0.8, 0, frequency=1)
        )
    )
    x, y = classification_data(shape=(8, 8, 1))
    fit_pruned(model, x, y)
    return model


@requires_tensorflow
def test_litert_file_predicts_like_the_keras_model(tmp_path):
    pruned = trained_pruned_cnn()
    path = tmp_path / "model.tflite"
    kprune.export_litert(pruned, path)
    x, _ = classification_data(n=16, shape=(8, 8, 1))
    np.testing.assert_allclose(
        run_litert(path, x), inference(pruned, x), atol=1e-5
    )


@requires_tensorflow
@pytest.mark.slow
def test_dynamic_range_litert_file_predicts_close_to_the_keras_model(
    tmp_path,
):
    pruned = trained_pruned_cnn()
    path = tmp_path / "model.tflite"
    kprune.export_litert(pruned, path, quantize="dynamic_range")
    x, _ = classification_data(n=16, shape=(8, 8, 1))
    expected = inference(pruned, x)
    actual = run_litert(path, x)
    assert np.max(np.abs(actual - expected)) < 0.05 * np.max(np.abs(expected))


def sparse_dense_model():
    model = keras.Sequential(
        [keras.Input((256,)), keras.layers.Dense(256), keras.layers.Dense(10)]
    )
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    cut = np.quantile(np.abs(kernel), 0.9)
    model.layers[0].kernel.assign(np.where(np.abs(kernel) > cut, kernel, 0))
    return model


@requires_tensorflow
def test_sparse_litert_file_is_smaller_than_the_dense_export(tmp_path):
    model = sparse_dense_model()
    dense_path = tmp_path / "dense.tflite"
    sparse_path = tmp_path / "sparse.tflite"
    model.export(str(dense_path), format="litert", verbose=False)
    kprune.export_litert(model, sparse_path, sparse_format=True)
    # 10% of a 256x256 float32 kernel plus its sparse index arrays.
    assert os.path.getsize(sparse_path) < 0.5 * os.path.getsize(dense_path)
    x, _ = classification_data(n=4, shape=(256,))
    np.testing.assert_allclose(
        run_litert(sparse_path, x), inference(model, x), atol=1e-5
    )


@requires_tensorflow
def test_sparse_dynamic_range_file_is_smaller_and_runs(tmp_path):
    model = sparse_dense_model()
    float_path = tmp_path / "sparse.tflite"
    int8_path = tmp_path / "sparse_int8.tflite"
    kprune.export_litert(model, float_path, sparse_format=True)
    kprune.export_litert(
        model, int8_path, quantize="dynamic_range", sparse_format=True
    )
    assert os.path.getsize(int8_path) < 0.6 * os.path.getsize(float_path)
    x, _ = classification_data(n=4, shape=(256,))
    expected = inference(model, x)
    actual = run_litert(int8_path, x)
    assert np.max(np.abs(actual - expected)) < 0.05 * np.max(np.abs(expected))


def tutorial_model(sparsity=0.8):
    """The model of tfmot's `pruning_with_keras` tutorial, its kernels
    magnitude-pruned: the Dense kernel has 2028 inputs, so TFLite's sparse
    format would index them with 16 bits."""
    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Reshape((28, 28, 1)),
            keras.layers.Conv2D(12, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    for layer in (model.layers[1], model.layers[-1]):
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        cut = np.quantile(np.abs(kernel), sparsity)
        layer.kernel.assign(np.where(np.abs(kernel) > cut, kernel, 0))
    return model


def zipped_size(path):
    """Bytes of `path` in a zip, as the tfmot tutorials measure it."""
    with zipfile.ZipFile(f"{path}.zip", "w", zipfile.ZIP_DEFLATED) as f:
        f.write(path)
    return os.path.getsize(f"{path}.zip")


@requires_tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "dynamic_range"])
def test_litert_file_zips_no_larger_than_the_tutorials_conversion(
    tmp_path, quantize
):
    import tensorflow as tf

    model = tutorial_model()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    plain_path = tmp_path / "tutorial.tflite"
    plain_path.write_bytes(converter.convert())
    path = tmp_path / "kprune.tflite"
    kprune.export_litert(model, path, quantize=quantize)
    # The weights are the same bytes; `model.export` names the signature's
    # tensors and the conversion metadata a few bytes differently (8-16
    # bytes measured). TFLite's sparse format would add kilobytes here.
    assert zipped_size(path) <= zipped_size(plain_path) + 64
    # And the default XNNPACK delegate runs it.
    x = np.random.default_rng(0).random((4, 28, 28), np.float32)
    expected = inference(model, x)
    actual = run_litert(path, x, default_delegates=True)
    assert np.max(np.abs(actual - expected)) < 0.05 * np.max(np.abs(expected))


@requires_tensorflow
def test_sparse_format_is_smaller_unzipped_and_larger_zipped(tmp_path):
    model = tutorial_model()
    dense_path = tmp_path / "dense.tflite"
    sparse_path = tmp_path / "sparse.tflite"
    kprune.export_litert(model, dense_path, quantize="dynamic_range")
    kprune.export_litert(
        model, sparse_path, quantize="dynamic_range", sparse_format=True
    )
    assert os.path.getsize(sparse_path) < os.path.getsize(dense_path)
    assert zipped_size(sparse_path) > zipped_size(dense_path)


@pytest.mark.parametrize(
    "path, kwargs, match",
    [
        ("model.h5", {}, "must end with `.tflite`"),
        ("model.tflite", {"quantize": "int4"}, "quantize"),
        ("model.tflite", {"optimizations": []}, "optimizations"),
        ("model.tflite", {"sparse_format": "yes"}, "sparse_format"),
    ],
)
def test_export_litert_rejects_bad_arguments(tmp_path, path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kprune.export_litert(mlp(), tmp_path / path, **kwargs)
    assert not os.listdir(tmp_path)


def test_export_litert_needs_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="TensorFlow backend.*'jax'"):
        kprune.export_litert(mlp(), tmp_path / "model.tflite")


# XNNPACK's sparse inference: `export_litert(sparse_format=True)` of a
# model that passes `PruneForLatencyOnXNNPack`, read back from the file.


def xnnpack_net(size, stem_padding="valid", sparsity=0.8):
    """A MobileNet-style net within XNNPACK's sparse rules (with
    `stem_padding="valid"`), its 1x1 convolutions pruned to `sparsity`."""
    layers = keras.layers
    i = keras.Input((size, size, 3))
    x = i
    if stem_padding == "valid":
        x = layers.ZeroPadding2D(1)(x)
    x = layers.Conv2D(8, 3, strides=2, padding=stem_padding, name="stem")(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    x = layers.DepthwiseConv2D(3, padding="same")(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Conv2D(32, 1, name="expand")(x)
    y = layers.ZeroPadding2D(1)(x)
    y = layers.DepthwiseConv2D(3, strides=2)(y)
    y = layers.Conv2D(32, 1, name="project")(layers.ReLU()(y))
    x = layers.Add()([y, layers.Conv2D(32, 1, name="skip")(y)])
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    model = keras.Model(i, layers.Dense(4)(layers.Flatten()(x)))
    for layer in model.layers:
        if kprune.PruneForLatencyOnXNNPack().allow_pruning(layer):
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            cut = np.quantile(np.abs(kernel), sparsity)
            layer.kernel.assign(np.where(np.abs(kernel) > cut, kernel, 0))
    return model


def litert_graph(path):
    """(operators as (name, inputs, outputs), tensor values) of a file,
    read with TensorFlow's Analyzer and interpreter, not with kprune."""
    import contextlib
    import io
    import re

    import tensorflow as tf

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        tf.lite.experimental.Analyzer.analyze(model_path=str(path))
    ops = []
    for line in report.getvalue().splitlines():
        match = re.match(r"\s*Op#\d+ (\w+)\((.*)\) -> \[(.*)\]", line)
        if match:
            name, inputs, outputs = match.groups()
            ops.append(
                (
                    name,
                    [int(t) for t in re.findall(r"T#(\d+)", inputs)],
                    [int(t) for t in re.findall(r"T#(\d+)", outputs)],
                )
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite's deprecation notice
        interpreter = tf.lite.Interpreter(
            model_path=str(path),
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=(
                tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            ),
        )
    interpreter.allocate_tensors()
    interpreter.invoke()  # DENSIFY writes the dense weights
    values = {
        d["index"]: interpreter.get_tensor(d["index"])
        for d in interpreter.get_tensor_details()
    }
    return ops, values


# TFLite operators of XNNPACK's sparse subgraph in these models.
SPARSE_OPS = {
    "PAD",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DENSIFY",
    "ADD",
    "MUL",
    "RELU",
    "RELU6",
    "MEAN",
}


@requires_tensorflow
@pytest.mark.parametrize("size", [17, 16])
def test_sparse_export_follows_xnnpack_sparse_inference_rules(tmp_path, size):
    # At odd sizes the converter folds ZeroPadding2D into "SAME" padding,
    # which XNNPACK refuses at stride 2; `export_litert` unfolds it.
    model = xnnpack_net(size)
    kprune.PruneForLatencyOnXNNPack().ensure_model_supports_pruning(model)
    path = tmp_path / "model.tflite"
    kprune.export_litert(model, path, sparse_format=True)
    assert kprune.export.xnnpack_sparse_problems(path) == []

    ops, values = litert_graph(path)
    producer = {t: op for op in ops for t in op[2]}
    # The start: a PAD of 1 on each side, then a 3x3 convolution on 3
    # channels (XNNPACK folds the PAD into it).
    pad, conv = ops[0], ops[1]
    assert pad[0] == "PAD" and pad[1][0] == 0  # the model input
    np.testing.assert_array_equal(
        values[pad[1][1]], [[0, 0], [1, 1], [1, 1], [0, 0]]
    )
    assert conv[0] == "CONV_2D" and conv[1][0] == pad[2][0]
    assert values[conv[1][1]].shape == (8, 3, 3, 3)
    # The sparse part ends at a MEAN over height and width; before it
    # only supported operators.
    end = next(k for k, op in enumerate(ops) if op[0] == "MEAN")
    np.testing.assert_array_equal(values[ops[end][1][1]], [1, 2])
    assert {op[0] for op in ops[: end + 1]} <= SPARSE_OPS
    assert not {"CONV_2D", "DEPTHWISE_CONV_2D"} & {op[0] for op in ops[end:]}
    # Each 1x1 convolution reads its weights stored sparse, through a
    # DENSIFY, and more than 2/3 of them are zero.
    pointwise = [
        op
        for op in ops[:end]
        if op[0] == "CONV_2D" and values[op[1][1]].shape[1:3] == (1, 1)
    ]
    assert len(pointwise) == 3
    for op in pointwise:
        assert producer[op[1][1]][0] == "DENSIFY"
        assert np.mean(values[op[1][1]] == 0) > 2 / 3
    x = np.random.default_rng(0).random((2, size, size, 3), np.float32)
    np.testing.assert_allclose(
        run_litert(path, x), inference(model, x), atol=1e-5
    )


@requires_tensorflow
def test_xnnpack_sparse_problems_explains_each_broken_rule(tmp_path):
    # "SAME" at stride 2 on 16x16 pads 0 above and 1 below, and 60% of
    # zeros is not more than 2/3.
    model = xnnpack_net(16, stem_padding="same", sparsity=0.6)
    sparse, dense = tmp_path / "sparse.tflite", tmp_path / "dense.tflite"
    kprune.export_litert(model, sparse, sparse_format=True)
    problems = kprune.export.xnnpack_sparse_problems(sparse)
    assert len(problems) == 2
    assert "CONV_2D" in problems[0]
    assert "TensorFlow 'SAME' padding at stride 2" in problems[0]
    assert "XNNPACK needs more than 2/3" in problems[1]
    kprune.export_litert(model, dense)
    (no_sparse, *_) = kprune.export.xnnpack_sparse_problems(dense)
    assert "No float32 weight is stored in TFLite's sparse format" in no_sparse


@requires_tensorflow
def test_depthwise_5x5_rewrite_exports_to_a_sparse_ready_file(tmp_path):
    layers = keras.layers
    i = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2)(layers.ZeroPadding2D(1)(i))
    x = layers.Conv2D(32, 1)(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 0 / 1
    x = layers.Conv2D(32, 1)(x)
    model = keras.Model(i, layers.GlobalAveragePooling2D()(x))
    model = kprune.pruning_policy.make_xnnpack_compatible(
        model, depthwise_5x5=True
    )
    kprune.PruneForLatencyOnXNNPack().ensure_model_supports_pruning(model)
    for layer in model.layers:
        if kprune.PruneForLatencyOnXNNPack().allow_pruning(layer):
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            cut = np.quantile(np.abs(kernel), 0.8)
            layer.kernel.assign(np.where(np.abs(kernel) > cut, kernel, 0))
    path = tmp_path / "model.tflite"
    kprune.export_litert(model, path, sparse_format=True)
    assert kprune.export.xnnpack_sparse_problems(path) == []
    ops, values = litert_graph(path)
    (depthwise,) = [op for op in ops if op[0] == "DEPTHWISE_CONV_2D"]
    assert values[depthwise[1][1]].shape == (1, 5, 5, 32)
    x = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
    np.testing.assert_allclose(
        run_litert(path, x), model.predict(x, verbose=0), atol=1e-5
    )


@requires_tensorflow
@pytest.mark.slow
def test_xnnpack_sparse_problems_names_outside_readers_and_int8(tmp_path):
    model = xnnpack_net(16)
    # A feature map that is also a model output leaves the sparse part.
    features = model.get_layer("expand").output
    two_outputs = keras.Model(model.inputs, [model.outputs[0], features])
    path = tmp_path / "two_outputs.tflite"
    kprune.export_litert(two_outputs, path, sparse_format=True)
    (problem,) = kprune.export.xnnpack_sparse_problems(path)
    assert "CONV_2D" in problem and "as a model output" in problem
    # Dynamic-range weights are int8: XNNPACK's sparse kernels are float.
    path = tmp_path / "int8.tflite"
    kprune.export_litert(
        model, path, sparse_format=True, quantize="dynamic_range"
    )
    problems = kprune.export.xnnpack_sparse_problems(path)
    assert problems
    assert all("is not float32" in p for p in problems)
