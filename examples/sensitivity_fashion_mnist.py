"""Sensitivity analysis of a small Fashion-MNIST CNN, then pruning with it.

Trains the CNN of `benchmarks/allocation_accuracy.py` dense for 2 epochs,
prunes each of its 4 layers alone (one shot) to 50-99% sparsity and
evaluates on 5,000 held-out training images, prints the table, saves the
plot (if matplotlib is installed), then prunes the model to the suggested
per-layer targets for 1 epoch and reports test accuracy and sparsity.

Run: `python examples/sensitivity_fashion_mnist.py` (a few minutes on 2
cores). Data as in `examples/prune_fashion_mnist.py`.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from fashion_mnist import load_data  # noqa: E402

import kprune  # noqa: E402


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="auto", choices=["auto", "fashion_mnist", "digits"]
    )
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--out", default="out/sensitivity")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    os.makedirs(args.out, exist_ok=True)
    source, ((x_train, y_train), (x_test, y_test)) = load_data(args.dataset)
    x_train = x_train.astype("float32") / 255.0
    x_test = x_test.astype("float32") / 255.0
    held = min(5000, len(x_train) // 5)
    x_val, y_val = x_train[-held:], y_train[-held:]
    x_train, y_train = x_train[:-held], y_train[:-held]
    print(f"Data: {source}")

    model = compile_model(build_model())
    model.fit(x_train, y_train, epochs=2, batch_size=128, verbose=0)
    result = kprune.sensitivity.sensitivity_analysis(
        model, x_val, y_val, sparsities=(0.5, 0.75, 0.9, 0.95, 0.99)
    )
    print(result.to_markdown())
    try:
        result.plot(os.path.join(args.out, "sensitivity.png"))
        print(f"Plot: {os.path.join(args.out, 'sensitivity.png')}")
    except ImportError as error:
        print(error)
    targets = result.suggest_sparsities(tolerance=args.tolerance)
    print(f"Suggested targets (tolerance {args.tolerance}): {targets}")

    steps = int(np.ceil(len(x_train) / 128))
    schedules = kprune.allocation.per_layer_schedules(
        targets, kprune.PolynomialDecay(0.0, 0.9, 0, steps // 2, frequency=50)
    )
    pruned = compile_model(kprune.prune_low_magnitude(model, schedules))
    pruned.fit(
        x_train,
        y_train,
        epochs=1,
        batch_size=128,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    dense_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    pruned_accuracy = pruned.evaluate(x_test, y_test, verbose=0)[1]
    stripped = kprune.strip_pruning(pruned)
    kernels = [
        keras.ops.convert_to_numpy(layer.kernel)
        for layer in stripped.layers
        if hasattr(layer, "kernel")
    ]
    sparsity = sum(int(np.sum(k == 0)) for k in kernels) / sum(
        k.size for k in kernels
    )
    print(f"Test accuracy, dense: {dense_accuracy:.4f}")
    print(
        f"Test accuracy, pruned to the suggested targets: "
        f"{pruned_accuracy:.4f} at {sparsity:.1%} overall kernel sparsity"
    )
    return result, targets, pruned_accuracy


if __name__ == "__main__":
    main()
