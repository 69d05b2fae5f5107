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
        run_litert(path, x), pruned.predict(x, verbose=0), atol=1e-5
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
    expected = pruned.predict(x, verbose=0)
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
        run_litert(sparse_path, x), model.predict(x, verbose=0), atol=1e-5
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
    expected = model.predict(x, verbose=0)
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
    expected = model.predict(x, verbose=0)
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
