"""Structured pruning on Fashion-MNIST: size and CPU latency after shrinking.

Trains a CNN (Conv 32 - BatchNorm - ReLU - MaxPool - Conv 64 - ReLU - MaxPool -
Flatten - Dense 128 - Dense 10) dense for 2 epochs, then for each target
fraction of units removed, prunes it with
`kprune.structured.StructuredSparsity(PolynomialDecay(0 -> target))` for 2
epochs (ramp over the first) and `kprune.structured.shrink_model`s it. Reports
test accuracy, parameters, `.keras` file size, the largest prediction gap
between the masked and the shrunk model, and the median CPU latency of one
forward pass (a `tf.function` of the model, batch 1 and 64), dense and shrunk
interleaved in the same loop. Prints one JSON line per model and writes them to
`--out`.

Run: `nice python benchmarks/structured_shrink.py` (TensorFlow backend).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kprune  # noqa: E402

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1] / "examples")
)
from fashion_mnist import load_data  # noqa: E402

BATCH = 128


def build_model():
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, padding="same", name="conv1"),
            layers.BatchNormalization(name="bn1"),
            layers.ReLU(),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu", name="dense1"),
            layers.Dense(10, name="dense2"),
        ]
    )


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def file_size(model):
    """Bytes of the `.keras` file of the model's weights and architecture
    (a compiled model would also save its optimizer state)."""
    plain = model.__class__.from_config(model.get_config())
    plain.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        plain.save(path)
        return os.path.getsize(path)


def latencies(models, batch, repeats):
    """Median seconds per forward pass of each model, interleaved."""
    x = tf.random.uniform((batch, 28, 28, 1))
    calls = [tf.function(lambda t, m=m: m(t, training=False)) for m in models]
    for call in calls:
        for _ in range(5):
            call(x).numpy()
    times = [[] for _ in models]
    for _ in range(repeats):
        for call, record in zip(calls, times):
            start = time.perf_counter()
            call(x).numpy()
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/structured_shrink.jsonl")
    args = parser.parse_args()
    source, ((x_train, y_train), (x_test, y_test)) = load_data("fashion_mnist")
    x_train = (x_train.astype("float32") / 255.0)[..., None]
    x_test = (x_test.astype("float32") / 255.0)[..., None]
    keras.utils.set_random_seed(args.seed)
    dense = compile_model(build_model())
    dense.fit(x_train, y_train, epochs=2, batch_size=BATCH, verbose=0)
    steps = int(np.ceil(len(x_train) / BATCH))
    rows = [("dense", 0.0, dense, None)]
    for target in args.targets:
        schedule = kprune.structured.StructuredSparsity(
            kprune.PolynomialDecay(0.0, target, 0, steps, frequency=50)
        )
        pruned = compile_model(kprune.prune_low_magnitude(dense, schedule))
        pruned.fit(
            x_train,
            y_train,
            epochs=2,
            batch_size=BATCH,
            verbose=0,
            callbacks=[kprune.UpdatePruningStep()],
        )
        small = kprune.structured.shrink_model(pruned)
        gap = float(
            np.max(
                np.abs(
                    small.predict(x_test, verbose=0)
                    - pruned.predict(x_test, verbose=0)
                )
            )
        )
        rows.append((f"shrunk {target:g}", target, small, gap))
    models = [row[2] for row in rows]
    batch_1 = latencies(models, 1, 300)
    batch_64 = latencies(models, 64, 100)
    with open(args.out, "w") as f:
        for (name, target, model, gap), t1, t64 in zip(rows, batch_1, batch_64):
            accuracy = compile_model(model).evaluate(x_test, y_test, verbose=0)
            row = {
                "model": name,
                "units_removed": target,
                "accuracy": round(float(accuracy[1]), 4),
                "parameters": model.count_params(),
                "keras_file_bytes": file_size(model),
                "max_prediction_gap_vs_masked": gap,
                "latency_ms_batch_1": round(t1 * 1e3, 3),
                "latency_ms_batch_64": round(t64 * 1e3, 3),
                "units": {
                    layer.name: getattr(layer, "filters", None)
                    or getattr(layer, "units", None)
                    for layer in model.layers
                    if hasattr(layer, "kernel")
                },
                "data": source,
            }
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
