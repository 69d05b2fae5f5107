"""One-shot pruning without fine-tuning: test accuracy per method,
Fashion-MNIST MLP.

For each seed: trains an MLP (784-512-256-10, ReLU) dense for 3 epochs
(Adam, batch 128), then from those weights prunes every Dense layer with
`kprune.oneshot.oneshot` by magnitude, Wanda and SparseGPT at 50%, 70% and
90% unstructured and at 2:4, calibrated on 512 training images drawn with
the seed, and evaluates on the 10,000 test images with no training.
Prints one JSON line per run (test accuracy, one-shot seconds, seconds per
million pruned weights) and appends it to `--out`.

Run: `nice python benchmarks/oneshot_quality.py` (about 3 minutes on 2
cores); `benchmarks/README.md` has the table.
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1] / "examples")
)
from fashion_mnist import load_data  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
TARGETS = ("0.5", "0.7", "0.9", "2:4")


def pruned_copies(build_model, weights, calibration, runs):
    """For each `(method, target)` of `runs` ("dense" or a `oneshot`
    method; a sparsity or "2:4"), a fresh model with `weights`, pruned in
    one shot from `calibration`: yields `(method, target, model,
    seconds)`, the seconds of the `oneshot` call (0 for "dense")."""
    for method, target in runs:
        model = build_model()
        model.set_weights(weights)
        seconds = 0.0
        if method != "dense":
            kwargs = (
                {"sparsity_m_by_n": (2, 4)}
                if target == "2:4"
                else {"sparsity": float(target)}
            )
            start = time.perf_counter()
            kprune.oneshot.oneshot(
                model, calibration, method=method, verbose=0, **kwargs
            )
            seconds = time.perf_counter() - start
        yield method, target, model, seconds


def build_model():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu", name="dense1"),
            keras.layers.Dense(256, activation="relu", name="dense2"),
            keras.layers.Dense(10, name="dense3"),
        ]
    )


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def arguments_and_data(description, out):
    """The command line of the Fashion-MNIST one-shot benchmarks, and their
    data: `(args, dataset name, (x_train, y_train), (x_test, y_test))`,
    images flattened and scaled to [0, 1]; results go to `out` beside this
    file unless `--out` says otherwise."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--dataset", default="auto")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).with_name(out))
    )
    args = parser.parse_args()
    name, ((x_train, y_train), (x_test, y_test)) = load_data(args.dataset)
    x_train = x_train.reshape(len(x_train), -1).astype("float32") / 255.0
    x_test = x_test.reshape(len(x_test), -1).astype("float32") / 255.0
    return args, name, (x_train, y_train), (x_test, y_test)


def trained_model(seed, x_train, y_train, epochs):
    """The MLP trained from seed `seed` (Adam, batch 128)."""
    keras.utils.set_random_seed(seed)
    model = build_model()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=128, verbose=0)
    return model


def main():
    args, name, (x_train, y_train), (x_test, y_test) = arguments_and_data(
        __doc__, "oneshot_quality.jsonl"
    )
    for seed in args.seeds:
        dense = trained_model(seed, x_train, y_train, args.epochs)
        weights = dense.get_weights()
        pruned_size = sum(
            int(np.prod(layer.kernel.shape)) for layer in dense.layers
        )
        rng = np.random.default_rng(seed)
        calibration = x_train[
            rng.choice(len(x_train), args.calibration, replace=False)
        ]
        runs = [("dense", "0")] + [(m, t) for t in TARGETS for m in METHODS]
        for method, target, model, seconds in pruned_copies(
            build_model, weights, calibration, runs
        ):
            record = {
                "dataset": name,
                "backend": keras.backend.backend(),
                "seed": seed,
                "method": method,
                "target": target,
                "test_accuracy": round(accuracy(model, x_test, y_test), 4),
                "oneshot_seconds": round(seconds, 3),
                "seconds_per_million_weights": round(
                    seconds / pruned_size * 1e6, 3
                ),
                "calibration_samples": args.calibration,
            }
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
