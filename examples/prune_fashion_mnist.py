"""The tfmot pruning tutorial, on Keras 3 with kprune.

Trains the tutorial's small convolutional classifier on Fashion-MNIST,
prunes it from 50% to 80% sparsity for 2 epochs with `PolynomialDecay`
(logging to TensorBoard), strips the pruning wrappers and reports test
accuracy before and after, per-layer sparsity (`kprune.report.summary`), and the
file sizes of every export: dense and pruned Keras weights (raw and
zipped), kprune's compact format (float32 and int8) and LiteRT (sparse,
and sparse with dynamic-range quantization). With matplotlib installed it
also writes plots: sparsity per layer, the schedule, and the mask of the
Dense kernel.

Data: the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist), else `keras.datasets.fashion_mnist`
(cached or downloaded). When neither is available it says so and uses
scikit-learn's digits (8x8 images, upscaled to 28x28) instead.

Run: `make demo`, or `python examples/prune_fashion_mnist.py --help`.
"""

import argparse
import json
import os
import tempfile
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from fashion_mnist import load_data  # noqa: E402

import kprune  # noqa: E402


def build_model():
    """The tutorial's classifier: 12 3x3 filters, max-pool, dense 10."""
    return keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Reshape((28, 28, 1)),
            keras.layers.Conv2D(12, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def zipped_size(path):
    """Size in bytes of `path` compressed in a zip with DEFLATE."""
    with tempfile.NamedTemporaryFile(suffix=".zip", delete=False) as f:
        zip_path = f.name
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(path, arcname=os.path.basename(path))
    size = os.path.getsize(zip_path)
    os.remove(zip_path)
    return size


def save_plain_weights(model, path):
    """Saves only the model's weights: a compiled model's weights file also
    holds the optimizer state, which would hide the effect of pruning."""
    plain = model.__class__.from_config(model.get_config())
    plain.set_weights(model.get_weights())
    plain.save_weights(path)


def layer_sparsity(model):
    rows = []
    for layer in model.layers:
        for weight in layer.weights:
            if "kernel" in weight.name:
                values = keras.ops.convert_to_numpy(weight)
                rows.append(
                    (weight.path, values.size, float(np.mean(values == 0)))
                )
    return rows


SIZE_ROWS = [
    ("Keras weights, dense", "dense_bytes"),
    ("Keras weights, pruned", "pruned_bytes"),
    ("kprune compact, float32 (bit-exact)", "compact_bytes"),
    ("kprune compact, int8", "compact_int8_bytes"),
    ("LiteRT", "litert_bytes"),
    ("LiteRT, dynamic range int8", "litert_dynamic_range_bytes"),
]


def write_exports(stripped, out):
    """Writes the compact and LiteRT files; returns their sizes."""
    sizes = {}
    for key, quantize in [("compact", None), ("compact_int8", "int8")]:
        path = os.path.join(out, f"pruned_{key}.h5")
        kprune.compression.save_compact(stripped, path, quantize=quantize)
        sizes[f"{key}_bytes"] = os.path.getsize(path)
    if keras.backend.backend() == "tensorflow":
        for key, quantize in [
            ("litert", None),
            ("litert_dynamic_range", "dynamic_range"),
        ]:
            path = os.path.join(out, f"pruned_{key}.tflite")
            kprune.export.export_litert(stripped, path, quantize=quantize)
            sizes[f"{key}_bytes"] = os.path.getsize(path)
            sizes[f"{key}_zipped_bytes"] = zipped_size(path)
    return sizes


def write_plots(stripped, schedule, end_step, out):
    """Writes the sparsity, schedule and mask plots if matplotlib is there."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    directory = os.path.join(out, "plots")
    os.makedirs(directory, exist_ok=True)
    paths = [
        os.path.join(directory, name)
        for name in ("sparsity.png", "schedule.png", "dense_kernel_mask.png")
    ]
    kprune.plots.plot_sparsity(stripped, paths[0])
    kprune.plots.plot_schedule(
        schedule, end_step + end_step // 10 + 1, paths[1]
    )
    kprune.plots.plot_mask(stripped.layers[-1].kernel, paths[2])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="auto", choices=["auto", "fashion_mnist", "digits"]
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="dense training epochs (tutorial: 4)",
    )
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only this many training images",
    )
    parser.add_argument(
        "--out",
        default="out/demo",
        help="directory for models, logs and results.json",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    source, ((x_train, y_train), (x_test, y_test)) = load_data(args.dataset)
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    x_train = x_train.astype("float32") / 255.0
    x_test = x_test.astype("float32") / 255.0
    print(f"Data: {source}: {len(x_train)} train, {len(x_test)} test images")

    model = compile_model(build_model())
    model.fit(
        x_train, y_train, epochs=args.epochs, validation_split=0.1, verbose=2
    )
    _, dense_accuracy = model.evaluate(x_test, y_test, verbose=0)
    dense_path = os.path.join(args.out, "dense.weights.h5")
    save_plain_weights(model, dense_path)

    batch_size = 128
    validation_split = 0.1
    train_images = int(len(x_train) * (1 - validation_split))
    end_step = int(np.ceil(train_images / batch_size)) * args.prune_epochs
    # The tutorial's schedule; small data sets (digits) have fewer than
    # 100 steps, so prune more often there.
    schedule = kprune.PolynomialDecay(
        initial_sparsity=0.50,
        final_sparsity=0.80,
        begin_step=0,
        end_step=end_step,
        frequency=min(100, max(1, end_step // 10)),
    )
    pruned = compile_model(
        kprune.prune_low_magnitude(model, pruning_schedule=schedule)
    )
    log_dir = os.path.join(args.out, "logs")
    pruned.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=args.prune_epochs,
        validation_split=validation_split,
        verbose=2,
        callbacks=[
            kprune.UpdatePruningStep(),
            kprune.PruningSummaries(log_dir=log_dir),
        ],
    )
    _, pruned_accuracy = pruned.evaluate(x_test, y_test, verbose=0)

    stripped = kprune.strip_pruning(pruned)
    pruned_path = os.path.join(args.out, "pruned.weights.h5")
    save_plain_weights(stripped, pruned_path)
    stripped.save(os.path.join(args.out, "pruned.keras"))
    exports = write_exports(stripped, args.out)
    plots = write_plots(stripped, schedule, end_step, args.out)

    results = {
        "data": source,
        "dense_accuracy": float(dense_accuracy),
        "pruned_accuracy": float(pruned_accuracy),
        "dense_bytes": os.path.getsize(dense_path),
        "dense_zipped_bytes": zipped_size(dense_path),
        "pruned_bytes": os.path.getsize(pruned_path),
        "pruned_zipped_bytes": zipped_size(pruned_path),
        "layers": [
            {"weight": path, "parameters": size, "sparsity": sparsity}
            for path, size, sparsity in layer_sparsity(stripped)
        ],
        **exports,
        "plots": plots,
        "tensorboard_logs": log_dir,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    print()
    print(f"Test accuracy, dense:  {dense_accuracy:.4f}")
    print(f"Test accuracy, pruned: {pruned_accuracy:.4f}")
    print("Sparsity of the stripped model (kprune.report.summary):")
    kprune.report.summary(stripped, print_fn=lambda line: print("  " + line))
    print("File sizes (bytes):")
    for label, key in SIZE_ROWS:
        if key in results:
            zipped = results.get(key.replace("_bytes", "_zipped_bytes"))
            print(
                f"  {label:<40} {results[key]:>9}"
                + (f"   zipped {zipped:>9}" if zipped else "")
            )
    for path in plots:
        print(f"Plot: {path}")
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    return results


if __name__ == "__main__":
    main()
