"""Global, structured and sensitivity on real data (scikit-learn digits)."""

import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from test_end_to_end import digits

import kprune

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPILE = {
    "optimizer": "adam",
    "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    "metrics": ["accuracy"],
}


def digits_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="out"),
        ]
    )


@pytest.mark.slow
def test_structured_digits_classifier_shrinks_and_keeps_its_accuracy():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = digits()
    model = digits_cnn()
    model.compile(**COMPILE)
    model.fit(x_train, y_train, epochs=10, batch_size=32, verbose=0)
    dense_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    pruned = kprune.prune_low_magnitude(
        model,
        kprune.StructuredSparsity(
            kprune.PolynomialDecay(0.0, 0.5, 0, 44 * 3, frequency=11)
        ),
    )
    pruned.compile(**COMPILE)
    pruned.fit(
        x_train,
        y_train,
        epochs=6,
        batch_size=32,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    small = kprune.shrink_model(pruned)
    assert small.get_layer("conv").filters == 8
    assert small.get_layer("hidden").units == 32
    assert small.count_params() < model.count_params() / 2
    np.testing.assert_allclose(
        small.predict(x_test, verbose=0),
        pruned.predict(x_test, verbose=0),
        rtol=1e-4,
        atol=1e-4,
    )
    small.compile(**COMPILE)
    assert dense_accuracy > 0.9
    assert small.evaluate(x_test, y_test, verbose=0)[1] >= dense_accuracy - 0.05


@pytest.mark.slow
def test_global_beats_uniform_where_layers_differ_in_size():
    (x_train, y_train), (x_test, y_test) = digits()
    keras.utils.set_random_seed(0)
    model = digits_cnn()
    model.compile(**COMPILE)
    model.fit(x_train, y_train, epochs=10, batch_size=32, verbose=0)
    accuracy = {}
    for name in ("uniform", "global"):
        keras.utils.set_random_seed(0)
        ramp = kprune.PolynomialDecay(0.5, 0.97, 0, 44 * 3, frequency=11)
        schedule = ramp if name == "uniform" else kprune.GlobalSparsity(ramp)
        pruned = kprune.prune_low_magnitude(model, schedule)
        pruned.compile(**COMPILE)
        pruned.fit(
            x_train,
            y_train,
            epochs=5,
            batch_size=32,
            verbose=0,
            callbacks=[kprune.UpdatePruningStep()],
        )
        accuracy[name] = pruned.evaluate(x_test, y_test, verbose=0)[1]
    # At 97% the 144-weight convolution keeps 4 weights under uniform
    # pruning; the global threshold leaves it far more.
    assert accuracy["global"] > accuracy["uniform"] + 0.05


@pytest.mark.slow
def test_sensitivity_example_runs_on_digits(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "sensitivity_fashion_mnist.py"),
            "--dataset",
            "digits",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| conv1 |" in result.stdout
    assert "Suggested targets" in result.stdout
    assert "Test accuracy, pruned to the suggested targets" in result.stdout
