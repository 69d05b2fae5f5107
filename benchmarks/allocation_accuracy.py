"""Accuracy of uniform vs global vs ERK sparsity allocation, Fashion-MNIST.

For each seed: trains a small CNN dense (2 epochs, batch 128), then from those
weights prunes it 3 ways (uniform: tfmot's per-layer target; global:
`kprune.allocation.GlobalSparsity`; ERK: `kprune.allocation.erk_sparsities`) to
90% and 95% overall sparsity of the pruned kernels: `PolynomialDecay(0.5 ->
target)` over the first pruning epoch (frequency 50), then one more epoch at the
target. Prints one JSON line per run (test accuracy, overall and per-layer
sparsity after `strip_pruning`) and appends it to `--out`.

Run: `nice python benchmarks/allocation_accuracy.py` (about 20 minutes on 2
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

BATCH = 128


def build_model():
    return keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Reshape((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="dense1"),
            keras.layers.Dense(10, name="dense2"),
        ]
    )


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def pruned_model(dense, allocation, target, end_step):
    ramp = kprune.PolynomialDecay(0.5, target, 0, end_step, frequency=50)
    if allocation == "uniform":
        schedule = ramp
    elif allocation == "global":
        schedule = kprune.allocation.GlobalSparsity(ramp)
    else:
        schedule = kprune.allocation.per_layer_schedules(
            kprune.allocation.erk_sparsities(dense, target), ramp
        )
    return compile_model(kprune.prune_low_magnitude(dense, schedule))


def summarize(path):
    """Prints the Markdown table of means over seeds from the JSON lines."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    targets = sorted({r["target"] for r in rows})
    allocations = ["uniform", "global", "erk"]
    seeds = sorted({r["seed"] for r in rows})
    dense = {r["seed"]: r["dense_accuracy"] for r in rows}
    print(
        f"Dense accuracy (2 epochs), mean of {len(seeds)} seeds: "
        f"{np.mean(list(dense.values())):.4f}\n"
    )
    print(
        "| target | allocation | accuracy (mean) | per seed | conv1 / conv2 "
        "/ dense1 / dense2 sparsity (seed 0) |"
    )
    print("|---|---|---|---|---|")
    for target in targets:
        for allocation in allocations:
            mine = [
                r
                for r in rows
                if r["target"] == target and r["allocation"] == allocation
            ]
            if not mine:
                continue
            layers = " / ".join(
                f"{v:.3f}" for v in mine[0]["layer_sparsity"].values()
            )
            print(
                f"| {target:.0%} | {allocation} | "
                f"{np.mean([r['accuracy'] for r in mine]):.4f} | "
                + ", ".join(f"{r['accuracy']:.4f}" for r in mine)
                + f" | {layers} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--summary",
        action="store_true",
        help="only print the table of the rows already in --out",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--out", default="benchmarks/allocation_accuracy.jsonl")
    args = parser.parse_args()
    if args.summary:
        summarize(args.out)
        return
    source, ((x_train, y_train), (x_test, y_test)) = load_data("fashion_mnist")
    x_train = x_train.astype("float32") / 255.0
    x_test = x_test.astype("float32") / 255.0
    steps_per_epoch = int(np.ceil(len(x_train) / BATCH))
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        dense = compile_model(build_model())
        dense.fit(x_train, y_train, epochs=2, batch_size=BATCH, verbose=0)
        dense_accuracy = dense.evaluate(x_test, y_test, verbose=0)[1]
        for target in args.targets:
            for allocation in ("uniform", "global", "erk"):
                keras.utils.set_random_seed(seed)
                start = time.time()
                pruned = pruned_model(
                    dense, allocation, target, steps_per_epoch
                )
                pruned.fit(
                    x_train,
                    y_train,
                    epochs=2,
                    batch_size=BATCH,
                    verbose=0,
                    callbacks=[kprune.UpdatePruningStep()],
                )
                stripped = compile_model(kprune.strip_pruning(pruned))
                accuracy = stripped.evaluate(x_test, y_test, verbose=0)[1]
                kernels = {
                    layer.name: keras.ops.convert_to_numpy(layer.kernel)
                    for layer in stripped.layers
                    if hasattr(layer, "kernel")
                }
                zeros = sum(int(np.sum(k == 0)) for k in kernels.values())
                size = sum(k.size for k in kernels.values())
                row = {
                    "seed": seed,
                    "target": target,
                    "allocation": allocation,
                    "accuracy": round(float(accuracy), 4),
                    "dense_accuracy": round(float(dense_accuracy), 4),
                    "sparsity": round(zeros / size, 4),
                    "layer_sparsity": {
                        n: round(float(np.mean(k == 0)), 4)
                        for n, k in kernels.items()
                    },
                    "seconds": round(time.time() - start, 1),
                    "data": source,
                }
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
