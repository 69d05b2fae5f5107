"""Accuracy at equal size: structured vs unstructured vs a narrower dense
MobileNetV2, Fashion-MNIST at 32x32x3 (issue 13).

Model: `keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
classes=10, alpha=--alpha)` with every BatchNormalization momentum set to
0.9. The applications default, 0.999, is for long ImageNet runs: after
the few hundred steps of this budget the moving statistics lag the
weights so far that the model predicts one class in inference mode (with
0.99 already: test accuracy 0.10 after 2 epochs on 10,000 images, where
the same model scores 0.68 on those test images in training mode); 0.9
follows the weights (0.66 in inference mode) and leaves training itself
unchanged. Images: the 28x28 Fashion-MNIST images resized (bilinear) to
32x32, repeated on 3 channels, scaled to [-1, 1]; a fixed random subset
of `--train-samples` training images (the same for every seed) and the
full 10,000-image test set. Adam (learning rate 1e-3, a fresh optimizer
per phase), batch 128.

For each seed, every arm gets `--dense-epochs + --finetune-epochs` epochs:

- structured: the dense model trained `--dense-epochs`, then
  `kprune.structured.StructuredSparsity(PolynomialDecay(0 -> --target))`
  for `--finetune-epochs` (ramp over the first half) with
  `kprune.UpdatePruningStep()`, then `kprune.structured.shrink_model`. Its
  `count_params()` is P, whichever layers shrink_model shrinks.
- unstructured: from the same dense weights, `kprune.allocation.
  GlobalSparsity(PolynomialDecay(0 -> s))` over every weight
  `prune_low_magnitude` prunes (Conv2D, DepthwiseConv2D and Dense kernels;
  biases and BatchNorm stay dense), `s` chosen so the nonzero parameters
  (all parameters minus the zeros of the pruned kernels after
  `strip_pruning`) equal P; same fine-tuning.
- small dense: MobileNetV2 at the `alpha` (a grid of 0.01 steps) whose
  `count_params()` is closest to P, trained from scratch for all the
  epochs.
- unstructured-uniform (only with `--arms`): as unstructured, but
  `prune_low_magnitude(dense, PolynomialDecay(0 -> s))`, the same
  sparsity for every kernel, `s` solved by bisection on kprune's per-layer
  kept counts (`max(round(n * (1 - s)), 1)` in float32) so that they sum
  to the same nonzero count P (exactly for MobileNetV2 alpha 0.35).

The unstructured arms also record, in `layer_sparsity`, the sparsity
their stripped kernels end with: min and max over layers, the layers
above 95%, and per layer type (stem `Conv1`, expand 1x1, depthwise,
project 1x1, `Conv_1`, the `Dense`).

`--arms` picks arms (default: structured unstructured small-dense);
without structured, `--target-parameters` gives P (121978 for the
defaults). Parameters count everything `count_params()` counts (BatchNorm moving
statistics included). Prints one JSON line per arm and seed (test
accuracy, parameters, seconds) and appends it to `--out`.

Run: `nice python benchmarks/equal_size_accuracy.py` (20 to 36 minutes on 2
cores shared with other jobs, load average 5-10), `--quick` for a smoke
run (512 training and 1,000 test images, 1 + 1 epochs, one seed; a few
minutes, nearly all compiling), `--summary` to print the markdown table
of the latest full run in `--out`; `benchmarks/README.md` has the table.
"""

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1] / "examples")
)
from fashion_mnist import load_data  # noqa: E402

BATCH = 128
ARMS = ("structured", "unstructured", "small dense", "unstructured-uniform")
DEFAULT_ARMS = ARMS[:3]
LAYER_TYPES = (
    ("stem Conv", "Conv1"),
    ("expand 1x1", "_expand"),
    ("depthwise", "_depthwise"),
    ("project 1x1", "_project"),
    ("Conv_1", "Conv_1"),
    ("Dense", "predictions"),
)


def build_model(alpha):
    """MobileNetV2 for 32x32x3 inputs and 10 classes, BatchNorm momentum
    0.9."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = keras.applications.MobileNetV2(
            weights=None, input_shape=(32, 32, 3), classes=10, alpha=alpha
        )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def compile_model(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def to_32x32x3(images):
    """uint8 28x28 images -> float32 32x32x3 in [-1, 1]."""
    out = []
    for start in range(0, len(images), 5000):
        chunk = images[start : start + 5000].astype("float32")[..., None]
        chunk = keras.ops.image.resize(chunk, (32, 32))
        out.append(keras.ops.convert_to_numpy(chunk))
    x = np.concatenate(out) / 127.5 - 1.0
    return np.repeat(x, 3, axis=-1).astype("float32")


@functools.cache
def closest_alpha(parameters):
    """The alpha in 0.05, 0.06, ... whose MobileNetV2 has the parameter
    count closest to `parameters` (the smaller alpha on a tie): `(alpha,
    count)`. The count grows with alpha, so the search stops past it."""
    best = None
    for alpha in np.round(np.arange(0.05, 1.401, 0.01), 2):
        count = build_model(float(alpha)).count_params()
        if best is None or abs(count - parameters) < abs(best[1] - parameters):
            best = (float(alpha), count)
        if count > parameters:
            break
    return best


def pruning_schedule(target, steps):
    """PolynomialDecay(0 -> target) over the first half of `steps`, its
    end on a pruning step so the target is reached."""
    frequency = max(1, steps // 40)
    end = max(1, steps // 2 // frequency) * frequency
    return kprune.PolynomialDecay(0.0, target, 0, end, frequency=frequency)


def fine_tune(dense, schedule, x, y, epochs, seed):
    keras.utils.set_random_seed(seed)
    pruned = compile_model(kprune.prune_low_magnitude(dense, schedule))
    pruned.fit(
        x,
        y,
        epochs=epochs,
        batch_size=BATCH,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    return pruned


def nonzero_parameters(stripped):
    """All parameters minus the zeros of the weights kprune prunes."""
    report = kprune.report.sparsity_report(stripped)
    pruned = report["pruned_total"]
    return report["total"]["parameters"] - (
        pruned["parameters"] - pruned["nonzeros"]
    )


def layer_sparsity(stripped):
    """Per-layer sparsity of the pruned kernels of a stripped
    MobileNetV2: min and max over layers, the layers above 95%, and the
    sparsity of each layer type (zeros over weights of all its layers)."""
    layers = {}
    for row in kprune.report.sparsity_report(stripped)["weights"]:
        if row["pruned"]:
            name = row["weight"].split("/")[0]
            layers[name] = (row["parameters"], row["nonzeros"])
    by_type = {}
    for label, key in LAYER_TYPES:
        mine = [
            v
            for name, v in layers.items()
            if (name == key if key[0] != "_" else name.endswith(key))
        ]
        total = sum(p for p, _ in mine)
        zeros = sum(p - n for p, n in mine)
        by_type[label] = {
            "layers": len(mine),
            "parameters": total,
            "sparsity": round(zeros / total, 4),
        }
    sparsity = {n: 1 - nz / p for n, (p, nz) in layers.items()}
    low = min(sparsity, key=sparsity.get)
    high = max(sparsity, key=sparsity.get)
    return {
        "min": [low, round(sparsity[low], 4)],
        "max": [high, round(sparsity[high], 4)],
        "above_95": {n: round(v, 4) for n, v in sparsity.items() if v > 0.95},
        "by_type": by_type,
    }


def kept_count(size, sparsity):
    """`kprune`'s per-layer kept count, `max(round(size * (1 -
    sparsity)), 1)` in float32, round half to even, in NumPy."""
    dense = np.float32(size) * (np.float32(1.0) - np.float32(sparsity))
    return max(int(np.round(dense)), 1)


def uniform_sparsity(sizes, kept):
    """The sparsity `s` at which layers of `sizes` weights, each pruned to
    `kept_count(size, s)`, keep together the count closest to `kept`
    (the higher `s` on a tie): bisection on `s` (the total falls as `s`
    rises, in steps of one per layer at most), then `(s, total)`."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(kept_count(n, middle) for n in sizes) > kept:
            low = middle
        else:
            high = middle
    # `high` keeps <= kept, `low` keeps > kept: take the closer.
    totals = {s: sum(kept_count(n, s) for n in sizes) for s in (low, high)}
    best = min((low, high), key=lambda s: (abs(totals[s] - kept), -s))
    return best, totals[best]


def accuracy(model, x, y):
    probabilities = model.predict(x, batch_size=500, verbose=0)
    return round(float(np.mean(np.argmax(probabilities, axis=-1) == y)), 4)


def run_seed(seed, args, data, record):
    (x_train, y_train), (x_test, y_test) = data
    steps = int(np.ceil(len(x_train) / BATCH)) * args.finetune_epochs
    epochs = args.dense_epochs + args.finetune_epochs

    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    dense = compile_model(build_model(args.alpha))
    dense.fit(
        x_train, y_train, epochs=args.dense_epochs, batch_size=BATCH, verbose=0
    )
    dense_seconds = time.perf_counter() - start
    dense_parameters = dense.count_params()
    common = {
        "seed": seed,
        "alpha_dense": args.alpha,
        "parameters_dense": dense_parameters,
        "accuracy_dense_after_first_phase": accuracy(dense, x_test, y_test),
        "epochs": epochs,
        "seconds_shared_dense_phase": round(dense_seconds, 1),
    }

    if "structured" not in args.arms:
        target_parameters = args.target_parameters
    else:
        target_parameters = structured_arm(
            dense, common, dense_seconds, args, steps, data, seed, record
        )
    # The weights kprune would prune in the dense model are those
    # `GlobalSparsity` ranks; everything else stays nonzero.
    report = kprune.report.sparsity_report(dense)
    prunable = report["pruned_total"]["parameters"]
    kept = target_parameters - (dense_parameters - prunable)

    def unstructured_arm(arm, schedule, sparsity, start, digits, **extra):
        pruned = fine_tune(
            dense, schedule, x_train, y_train, args.finetune_epochs, seed
        )
        stripped = kprune.strip_pruning(pruned)
        record(
            {
                **common,
                "arm": arm,
                "sparsity_of_pruned_kernels": round(sparsity, digits),
                **extra,
                "parameters": stripped.count_params(),
                "nonzero_parameters": nonzero_parameters(stripped),
                "accuracy": accuracy(stripped, x_test, y_test),
                "seconds": round(
                    time.perf_counter() - start + dense_seconds, 1
                ),
                "layer_sparsity": layer_sparsity(stripped),
            }
        )

    if "unstructured" in args.arms:
        start = time.perf_counter()
        sparsity = 1.0 - kept / prunable
        schedule = kprune.allocation.GlobalSparsity(
            pruning_schedule(sparsity, steps)
        )
        unstructured_arm("unstructured", schedule, sparsity, start, 4)
    if "unstructured-uniform" in args.arms:
        # Every pruned kernel at the same sparsity s; kprune rounds the
        # kept count per layer, so s is solved on those rounded counts.
        start = time.perf_counter()
        sizes = [r["parameters"] for r in report["weights"] if r["pruned"]]
        sparsity, _ = uniform_sparsity(sizes, kept)
        unstructured_arm(
            "unstructured-uniform",
            pruning_schedule(sparsity, steps),
            sparsity,
            start,
            6,
            target_parameters=target_parameters,
        )
    if "small dense" in args.arms:
        small_dense_arm(target_parameters, common, args, data, seed, record)


def structured_arm(
    dense, common, dense_seconds, args, steps, data, seed, record
):
    (x_train, y_train), (x_test, y_test) = data
    start = time.perf_counter()
    pruned = fine_tune(
        dense,
        kprune.structured.StructuredSparsity(
            pruning_schedule(args.target, steps)
        ),
        x_train,
        y_train,
        args.finetune_epochs,
        seed,
    )
    small = kprune.structured.shrink_model(pruned)
    target_parameters = small.count_params()
    record(
        {
            **common,
            "arm": "structured",
            "units_removed": args.target,
            "parameters": target_parameters,
            "nonzero_parameters": nonzero_parameters(small),
            "accuracy": accuracy(small, x_test, y_test),
            "seconds": round(time.perf_counter() - start + dense_seconds, 1),
        }
    )

    return target_parameters


def small_dense_arm(target_parameters, common, args, data, seed, record):
    (x_train, y_train), (x_test, y_test) = data
    epochs = args.dense_epochs + args.finetune_epochs
    start = time.perf_counter()
    alpha, parameters = closest_alpha(target_parameters)
    keras.utils.set_random_seed(seed)
    narrow = compile_model(build_model(alpha))
    narrow.fit(x_train, y_train, epochs=epochs, batch_size=BATCH, verbose=0)
    record(
        {
            **common,
            "arm": "small dense",
            "alpha": alpha,
            "parameters": parameters,
            "nonzero_parameters": nonzero_parameters(narrow),
            "accuracy": accuracy(narrow, x_test, y_test),
            "seconds": round(time.perf_counter() - start, 1),
        }
    )


def summary(path, quick=False):
    """The markdown table of the latest run in `path` (means over seeds)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["quick"] == quick]
    if not rows:
        return f"No {'quick' if quick else 'full'} run in {path}."
    latest = rows[-1]["run"]
    rows = [r for r in rows if r["run"] == latest]
    first = rows[0]
    dense = [r["accuracy_dense_after_first_phase"] for r in rows]
    lines = [
        f"Run {latest}: {first['train_samples']:,} training images, "
        f"{first['test_samples']:,} test images, {first['epochs']} epochs "
        f"per arm; MobileNetV2 alpha {first['alpha_dense']} has "
        f"{first['parameters_dense']:,} parameters (test accuracy "
        f"{np.mean(dense):.4f} after the shared first phase).",
        "",
        "| arm | parameters (nonzero) | of dense | test accuracy, mean "
        "(std) | per seed | seconds per seed |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        nonzero = sorted({r["nonzero_parameters"] for r in mine})
        if arm == "structured":
            label = f"structured {mine[0]['units_removed']:.0%}, shrunk"
        elif arm == "unstructured":
            label = (
                "unstructured (global magnitude), "
                f"{mine[0]['sparsity_of_pruned_kernels']:.1%} of kernels"
            )
        elif arm == "unstructured-uniform":
            label = (
                "unstructured (same sparsity per layer), "
                f"{mine[0]['sparsity_of_pruned_kernels']:.1%} of each kernel"
            )
        else:
            label = f"dense from scratch, alpha {mine[0]['alpha']}"
        accuracies = [r["accuracy"] for r in mine]
        lines.append(
            f"| {label} | {', '.join(f'{n:,}' for n in nonzero)} "
            f"| {nonzero[0] / first['parameters_dense']:.3f}x "
            f"| {np.mean(accuracies):.4f} ({np.std(accuracies):.4f}) "
            f"| {', '.join(f'{a:.4f}' for a in accuracies)} "
            f"| {np.mean([r['seconds'] for r in mine]):.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=[a.replace(" ", "-") for a in ARMS],
        default=[a.replace(" ", "-") for a in DEFAULT_ARMS],
        help="arms to run (default: structured unstructured small-dense); "
        "unstructured-uniform: the same PolynomialDecay for every kernel",
    )
    parser.add_argument(
        "--target-parameters",
        type=int,
        help="P, the nonzero parameters to match, when the structured arm "
        "(which measures it) is not run",
    )
    parser.add_argument(
        "--out",
        default=str(
            pathlib.Path(__file__).with_name("equal_size_accuracy.jsonl")
        ),
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print the markdown table of the latest run in --out",
    )
    args = parser.parse_args(argv)
    args.arms = [a.replace("small-dense", "small dense") for a in args.arms]
    if "structured" not in args.arms and args.target_parameters is None:
        parser.error("--target-parameters is needed without the structured arm")
    if args.summary:
        print(summary(args.out, args.quick))
        return
    if args.quick:
        args.seeds = args.seeds[:1]
        args.train_samples, args.test_samples = 512, 1000
        args.dense_epochs = args.finetune_epochs = 1
    source, ((x_train, y_train), (x_test, y_test)) = load_data("fashion_mnist")
    subset = np.random.default_rng(0).permutation(len(x_train))
    subset = subset[: args.train_samples]
    data = (
        (to_32x32x3(x_train[subset]), y_train[subset]),
        (to_32x32x3(x_test[: args.test_samples]), y_test[: args.test_samples]),
    )
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    machine = {
        "run": run_id,
        "quick": args.quick,
        "data": source,
        "train_samples": len(subset),
        "test_samples": len(data[1][1]),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }

    def record(row):
        row = {
            **machine,
            **row,
            "load_1min": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    for seed in args.seeds:
        run_seed(seed, args, data, record)
    print(summary(args.out, args.quick))


if __name__ == "__main__":
    main()
