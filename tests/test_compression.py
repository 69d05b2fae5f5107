"""The compact sparse format: round trips, int8, sizes and bad files."""

import gzip
import json
import os
import pathlib
import shutil
import stat
import sys

import h5py
import keras
import numpy as np
import pytest

import kprune
from kprune.compression import quantize_int8
from kprune.compression import read_compact
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import inference
from testing import mlp
from testing import small_cnn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def trained_pruned_cnn(sparsity=0.8):
    model = compile_classifier(
        kprune.prune_low_magnitude(
            small_cnn(), kprune.ConstantSparsity(sparsity, 0, frequency=1)
        )
    )
    x, y = classification_data(shape=(8, 8, 1))
    fit_pruned(model, x, y)
    return model


def magnitude_pruned(model, sparsity):
    """Zeros the smallest kernel entries of a plain model, in place."""
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            values = keras.ops.convert_to_numpy(kernel)
            cut = np.quantile(np.abs(values), sparsity)
            kernel.assign(np.where(np.abs(values) > cut, values, 0))
    return model


def assert_bit_identical(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def test_float_round_trip_restores_stripped_weights_bit_for_bit(tmp_path):
    pruned = trained_pruned_cnn()
    path = tmp_path / "model.h5"
    kprune.save_compact(pruned, path)
    expected = kprune.strip_pruning(pruned).get_weights()
    assert_bit_identical(expected, kprune.load_compact(path).get_weights())
    into = small_cnn()
    assert kprune.load_compact(path, into) is into
    assert_bit_identical(expected, into.get_weights())


def test_loaded_model_predicts_like_the_pruned_model(tmp_path):
    pruned = trained_pruned_cnn()
    path = tmp_path / "model.h5"
    kprune.save_compact(pruned, path)
    x, _ = classification_data(n=8, shape=(8, 8, 1))
    np.testing.assert_array_equal(
        inference(kprune.load_compact(path), x),
        inference(pruned, x),
    )


def test_negative_zero_and_special_values_survive(tmp_path):
    model = mlp()
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel).copy()
    kernel[0, :4] = [-0.0, 0.0, np.inf, np.nan]
    kernel[1] = 0.0
    model.layers[0].kernel.assign(kernel)
    path = tmp_path / "model.h5"
    kprune.save_compact(model, path)
    assert_bit_identical(
        model.get_weights(), kprune.load_compact(path).get_weights()
    )


def test_sparse_tensors_are_stored_sparse_and_dense_ones_as_they_are(
    tmp_path,
):
    path = tmp_path / "model.h5"
    model = trained_pruned_cnn()
    # Biases without zeros: a few steps can leave a channel dead (its bias
    # still at its initial zero), and a half-zero bias is stored sparse.
    for weight in model.weights:
        if weight.path.endswith("bias"):
            weight.assign(keras.ops.ones(weight.shape))
    kprune.save_compact(model, path)
    with h5py.File(path) as f:
        index = json.loads(gzip.decompress(f["index"][()].tobytes()))
    assert [e["encoding"] for e in index] == [
        "sparse",
        "dense",
        "sparse",
        "dense",
    ]


def test_compact_file_is_far_smaller_than_the_keras_weights_file(tmp_path):
    model = keras.Sequential(
        [keras.Input((256,)), keras.layers.Dense(256), keras.layers.Dense(10)]
    )
    magnitude_pruned(model, 0.9)
    keras_path = tmp_path / "model.weights.h5"
    model.save_weights(keras_path)
    float_path = tmp_path / "float.h5"
    int8_path = tmp_path / "int8.h5"
    kprune.save_compact(model, float_path)
    kprune.save_compact(model, int8_path, quantize="int8")
    keras_size = os.path.getsize(keras_path)
    float_size = os.path.getsize(float_path)
    # 10% of the values in float32 plus positions: 0.16x with overhead.
    assert float_size < 0.2 * keras_size
    assert os.path.getsize(int8_path) < 0.6 * float_size


def test_int8_values_are_within_half_a_scale_of_the_originals(tmp_path):
    pruned = trained_pruned_cnn()
    path = tmp_path / "int8.h5"
    kprune.save_compact(pruned, path, quantize="int8")
    expected = kprune.strip_pruning(pruned).get_weights()
    restored = kprune.load_compact(path).get_weights()
    changed = False
    for original, loaded in zip(expected, restored):
        if original.ndim < 2:
            assert original.tobytes() == loaded.tobytes()
            continue
        reduce_axes = tuple(range(original.ndim - 1))
        scale = np.max(np.abs(original), axis=reduce_axes) / 127
        error = np.abs(original.astype(np.float64) - loaded)
        assert np.all(error <= scale / 2 * (1 + 1e-6))
        # A pruned weight stays exactly zero.
        assert np.all(loaded[original == 0] == 0)
        changed |= not np.array_equal(original, loaded)
    assert changed


def test_quantize_int8_codes_are_per_channel_symmetric():
    values = np.array([[1.0, -0.5], [-2.0, 0.25]], np.float32)
    codes, scales = quantize_int8(values)
    np.testing.assert_allclose(scales, [2.0 / 127, 0.5 / 127])
    np.testing.assert_array_equal(codes, [[64, -127], [-127, 64]])
    zero_codes, zero_scales = quantize_int8(np.zeros((3, 2), np.float32))
    assert not zero_codes.any() and np.all(zero_scales > 0)


def load_classification_data():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from fashion_mnist import load_data
    finally:
        sys.path.pop(0)
    source, ((x_train, y_train), (x_test, y_test)) = load_data("auto")
    scale = np.float32(1 / 255)
    return (
        (x_train[:12000] * scale, y_train[:12000]),
        (x_test * scale, y_test),
    )


@pytest.mark.slow
def test_int8_model_stays_within_one_point_of_float_accuracy(tmp_path):
    (x_train, y_train), (x_test, y_test) = load_classification_data()
    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    compile_classifier(model).fit(
        x_train, y_train, batch_size=128, epochs=2, verbose=0
    )
    steps = int(np.ceil(len(x_train) / 128))
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            model, kprune.PolynomialDecay(0.5, 0.9, 0, steps, frequency=20)
        ),
        metrics=["accuracy"],
    )
    pruned.fit(
        x_train,
        y_train,
        batch_size=128,
        epochs=2,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    float_path = tmp_path / "float.h5"
    int8_path = tmp_path / "int8.h5"
    kprune.save_compact(pruned, float_path)
    kprune.save_compact(pruned, int8_path, quantize="int8")
    accuracies = []
    for path in (float_path, int8_path):
        loaded = compile_classifier(
            kprune.load_compact(path), metrics=["accuracy"]
        )
        accuracies.append(loaded.evaluate(x_test, y_test, verbose=0)[1])
    float_accuracy, int8_accuracy = accuracies
    assert float_accuracy > 0.7
    assert abs(float_accuracy - int8_accuracy) <= 0.01


def test_rejects_bad_quantize_and_leaves_existing_file(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="quantize"):
        kprune.save_compact(mlp(), path, quantize="int4")
    with pytest.raises(ValueError, match="Keras model"):
        kprune.save_compact("not a model", path)
    assert path.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["model.h5"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["022", "002"])
def test_compact_file_has_the_mode_of_any_new_file(tmp_path, umask):
    path = tmp_path / "model.h5"
    previous = os.umask(umask)
    try:
        kprune.save_compact(mlp(), path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["model.h5"]


@pytest.fixture
def saved(tmp_path):
    model = magnitude_pruned(mlp(), 0.8)
    path = tmp_path / "model.h5"
    kprune.save_compact(model, path)
    return path


def assert_untouched_after(call, model, match):
    before = weights_of(model)
    with pytest.raises(ValueError, match=match):
        call()
    assert_bit_identical(before, weights_of(model))


def test_truncated_file_fails_clearly_and_touches_nothing(saved, tmp_path):
    truncated = tmp_path / "truncated.h5"
    data = saved.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    model = mlp()
    assert_untouched_after(
        lambda: kprune.load_compact(truncated, model), model, "damaged"
    )


def test_modified_values_fail_the_checksum(saved):
    with h5py.File(saved, "r+") as f:
        values = f["values/float32"]
        data = values[()]
        data[0] += 1
        values[...] = data
    model = mlp()
    assert_untouched_after(
        lambda: kprune.load_compact(saved, model), model, "CRC-32"
    )


def test_wrong_architecture_fails_and_touches_nothing(saved):
    wider = mlp(hidden=32)
    assert_untouched_after(
        lambda: kprune.load_compact(saved, wider),
        wider,
        r"shape \(8, 16\).*shape \(8, 32\).*different architecture",
    )
    deeper = keras.Sequential(
        [keras.Input((8,)), *[keras.layers.Dense(16) for _ in range(3)]]
    )
    assert_untouched_after(
        lambda: kprune.load_compact(saved, deeper),
        deeper,
        "holds 4 weights but the model has 6",
    )


def test_loading_into_a_pruned_model_says_to_strip_it(saved):
    pruned = kprune.prune_low_magnitude(mlp())
    assert_untouched_after(
        lambda: kprune.load_compact(saved, pruned), pruned, "strip_pruning"
    )


def test_files_not_in_the_format_fail_clearly(tmp_path):
    model = mlp()
    keras_weights = tmp_path / "model.weights.h5"
    model.save_weights(keras_weights)
    keras_file = tmp_path / "model.keras"
    model.save(keras_file)
    for path in (keras_weights, keras_file):
        assert_untouched_after(
            lambda p=path: kprune.load_compact(p, model),
            model,
            "not in kprune's compact format",
        )
    with pytest.raises(FileNotFoundError):
        kprune.load_compact(tmp_path / "missing.h5")


def test_newer_format_version_says_to_upgrade(saved, tmp_path):
    newer = tmp_path / "newer.h5"
    shutil.copy(saved, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["kprune_format_version"] = 99
    with pytest.raises(ValueError, match="version 99.*Upgrade kprune"):
        read_compact(newer)
