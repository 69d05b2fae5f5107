"""File sizes of a model pruned to 90%, with kprune or with tfmot, one run.

The 2019 tfmot pruning tutorial's CNN (Conv2D 32 5x5, max-pool, Conv2D 64
5x5, max-pool, Dense 1024, Dense 10: 3,274,634 parameters) on
Fashion-MNIST: `--epochs` dense epochs, then `--prune-epochs` epochs of
`PolynomialDecay(0.50 -> 0.90, frequency=100)` ending at 2/3 of them, batch
128. Writes every export the library offers and prints one JSON line with
sizes in bytes (raw and zipped with DEFLATE level 9), test accuracies and
the kernel sparsity.

Run it through `benchmarks/export_sizes.sh`, which runs both libraries.
"""

import argparse
import json
import os
import pathlib
import sys
import warnings
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--library", choices=["kprune", "tfmot"], required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--prune-epochs", type=int, default=2)
parser.add_argument("--out", default="out/export_sizes")
parser.add_argument(
    "--reuse",
    action="store_true",
    help="reuse the models a previous run saved in --out (no training)",
)
args = parser.parse_args()

if args.library == "tfmot":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    sparsity = tfmot.sparsity.keras
    first_layer = keras.layers.InputLayer(input_shape=(28, 28))
else:
    import keras

    import kprune as sparsity

    first_layer = keras.Input((28, 28))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1] / "examples")
)
from fashion_mnist import load_data  # noqa: E402

out = os.path.join(args.out, args.library)
os.makedirs(out, exist_ok=True)
source, ((x_train, y_train), (x_test, y_test)) = load_data("fashion_mnist")
x_train = (x_train / 255.0).astype("float32")
x_test = (x_test / 255.0).astype("float32")

keras.utils.set_random_seed(args.seed)
layers = keras.layers
model = keras.Sequential(
    [
        first_layer,
        layers.Reshape((28, 28, 1)),
        layers.Conv2D(32, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(1024, activation="relu"),
        layers.Dense(10),
    ]
)
assert model.count_params() == 3_274_634, model.count_params()


def compile_model(m):
    m.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return m


def train():
    batch_size = 128
    compile_model(model).fit(
        x_train, y_train, batch_size=batch_size, epochs=args.epochs, verbose=2
    )
    # Saved now: tfmot's `prune_low_magnitude` wraps the model's own layers,
    # so pruning changes `model`'s weights too.
    save_h5(model, dense_path)
    steps = int(np.ceil(len(x_train) / batch_size)) * args.prune_epochs
    schedule = sparsity.PolynomialDecay(
        initial_sparsity=0.50,
        final_sparsity=0.90,
        begin_step=0,
        end_step=steps * 2 // 3,
        frequency=100,
    )
    pruned = compile_model(
        sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    )
    pruned.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=args.prune_epochs,
        verbose=2,
        callbacks=[sparsity.UpdatePruningStep()],
    )
    return sparsity.strip_pruning(pruned)


def save_h5(m, path):
    """Weights and architecture in legacy HDF5, without optimizer state."""
    plain = m.__class__.from_config(m.get_config())
    plain.set_weights(m.get_weights())
    plain.save(path)


dense_path = os.path.join(out, "dense.h5")
stripped_path = os.path.join(out, "stripped.h5")
if args.reuse and os.path.exists(stripped_path):
    stripped = keras.models.load_model(stripped_path, compile=False)
else:
    stripped = train()
    save_h5(stripped, stripped_path)
model = keras.models.load_model(dense_path, compile=False)
dense_accuracy = compile_model(model).evaluate(x_test, y_test, verbose=0)[1]
stripped = compile_model(stripped)
pruned_accuracy = stripped.evaluate(x_test, y_test, verbose=0)[1]
kernels = [w for w in stripped.get_weights() if w.ndim >= 2]
kernel_sparsity = float(
    sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
)


def zipped(path):
    zip_path = path + ".zip"
    with zipfile.ZipFile(
        zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9
    ) as z:
        z.write(path, arcname=os.path.basename(path))
    return os.path.getsize(zip_path)


def record(name, path):
    sizes[name] = os.path.getsize(path)
    sizes[name + "_zipped"] = zipped(path)


def litert_accuracy(path, n=2000):
    # TF 2.21's XNNPACK delegate fails to prepare sparse dynamic-range
    # models ("failed to delegate FULLY_CONNECTED"); the builtin kernels
    # run them.
    interpreter = tf.lite.Interpreter(
        model_path=path,
        experimental_op_resolver_type=(
            tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        ),
    )
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], [n, 28, 28])
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry["index"], x_test[:n])
    interpreter.invoke()
    logits = interpreter.get_tensor(
        interpreter.get_output_details()[0]["index"]
    )
    return float(np.mean(np.argmax(logits, axis=1) == y_test[:n]))


sizes = {}
accuracies = {"dense": float(dense_accuracy), "pruned": float(pruned_accuracy)}
record("dense_h5", dense_path)
record("stripped_h5", stripped_path)

litert_paths = {}
if args.library == "tfmot":
    for name, optimizations in [
        ("litert_sparse", [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]),
        (
            "litert_sparse_dynamic_range",
            [tf.lite.Optimize.EXPERIMENTAL_SPARSITY, tf.lite.Optimize.DEFAULT],
        ),
    ]:
        converter = tf.lite.TFLiteConverter.from_keras_model(stripped)
        converter.optimizations = optimizations
        litert_paths[name] = os.path.join(out, name + ".tflite")
        with open(litert_paths[name], "wb") as f:
            f.write(converter.convert())
else:
    import kprune

    path = os.path.join(out, "stripped.keras")
    stripped.save(path)
    record("stripped_keras", path)
    for name, quantize in [("compact", None), ("compact_int8", "int8")]:
        path = os.path.join(out, name + ".h5")
        kprune.compression.save_compact(stripped, path, quantize=quantize)
        record(name, path)
        loaded = compile_model(kprune.compression.load_compact(path))
        accuracies[name] = float(loaded.evaluate(x_test, y_test, verbose=0)[1])
    for name, quantize in [
        ("litert_sparse", None),
        ("litert_sparse_dynamic_range", "dynamic_range"),
    ]:
        litert_paths[name] = os.path.join(out, name + ".tflite")
        # TFLite's sparse format, as tfmot's files above.
        kprune.export.export_litert(
            stripped, litert_paths[name], quantize=quantize, sparse_format=True
        )
for name, path in litert_paths.items():
    record(name, path)
    accuracies[name + "_first_2000"] = litert_accuracy(path)
accuracies["pruned_first_2000"] = float(
    stripped.evaluate(x_test[:2000], y_test[:2000], verbose=0)[1]
)

print(
    json.dumps(
        {
            "library": args.library,
            "seed": args.seed,
            "epochs": args.epochs,
            "prune_epochs": args.prune_epochs,
            "data": source,
            "parameters": int(model.count_params()),
            "kernel_sparsity": round(kernel_sparsity, 4),
            "accuracy": accuracies,
            "bytes": sizes,
        }
    ),
    flush=True,
)
