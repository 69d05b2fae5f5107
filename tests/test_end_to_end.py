"""End to end on real data: scikit-learn's digits, and the example."""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import kprune
from testing import pruned_weights
from testing import reference_kept

ROOT = pathlib.Path(__file__).resolve().parents[1]


def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], data.target[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.mark.slow
def test_pruned_digits_classifier_keeps_its_accuracy_at_80_percent():
    (x_train, y_train), (x_test, y_test) = digits()
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    compile_args = {
        "optimizer": "adam",
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": ["accuracy"],
    }
    model.compile(**compile_args)
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    dense_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]

    end_step = 44 * 6  # 6 epochs of 44 batches
    pruned = kprune.prune_low_magnitude(
        model, kprune.PolynomialDecay(0.5, 0.8, 0, end_step, frequency=22)
    )
    pruned.compile(**compile_args)
    pruned.fit(
        x_train,
        y_train,
        epochs=8,
        batch_size=32,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    stripped = kprune.strip_pruning(pruned)
    stripped.compile(**compile_args)
    pruned_accuracy = stripped.evaluate(x_test, y_test, verbose=0)[1]

    assert dense_accuracy > 0.9
    assert pruned_accuracy >= dense_accuracy - 0.03
    for weight, mask in pruned_weights(pruned):
        assert mask.sum() == reference_kept(weight.size, 0.8)
    kernels = [
        layer.kernel.numpy()
        for layer in stripped.layers
        if hasattr(layer, "kernel")
    ]
    zeros = sum(int((k == 0).sum()) for k in kernels)
    assert zeros / sum(k.size for k in kernels) == pytest.approx(0.8, abs=0.01)


@pytest.mark.slow
def test_example_runs_end_to_end_and_reports_sizes(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "prune_fashion_mnist.py"),
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test accuracy, pruned" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["pruned_zipped_bytes"] < results["dense_zipped_bytes"] / 2
    assert results["compact_bytes"] < results["pruned_zipped_bytes"]
    assert results["compact_int8_bytes"] < results["compact_bytes"]
    assert all(pathlib.Path(p).stat().st_size > 0 for p in results["plots"])
    assert len(results["plots"]) == 3
    assert [round(row["sparsity"], 2) for row in results["layers"]] == [
        0.8,
        0.8,
    ]
    assert results["pruned_accuracy"] > 0.8
    assert any((out / "logs" / "train").iterdir())


def test_example_without_fashion_mnist_says_so_and_uses_digits(
    monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import fashion_mnist

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", "/nonexistent/fmnist")
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    source, ((x_train, y_train), (x_test, _)) = fashion_mnist.load_data("auto")
    assert "digits" in source
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert x_train.shape[1:] == (28, 28) and x_test.shape[1:] == (28, 28)
    assert set(np.unique(y_train)) == set(range(10))
