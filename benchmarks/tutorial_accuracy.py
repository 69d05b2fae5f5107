"""The tfmot tutorial pipeline with kprune or with tfmot, one seed.

Same data, model, training and schedule as `examples/prune_fashion_mnist.py`
(4 dense epochs, then `PolynomialDecay(0.5, 0.8)` for 2 epochs of batch 128,
frequency 100). Prints one JSON line: dense and pruned test accuracy and the
sparsity of each kernel after `strip_pruning`.

Run it through `benchmarks/tutorial_accuracy.sh`, which runs both libraries
(tfmot 0.8.1 on tf-keras, in its own virtual environment) over 3 seeds.
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--library", choices=["kprune", "tfmot"], required=True)
parser.add_argument("--seed", type=int, default=0)
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

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1] / "examples")
)
from fashion_mnist import load_data  # noqa: E402

source, ((x_train, y_train), (x_test, y_test)) = load_data("fashion_mnist")
x_train, x_test = x_train / 255.0, x_test / 255.0

keras.utils.set_random_seed(args.seed)
model = keras.Sequential(
    [
        first_layer,
        keras.layers.Reshape((28, 28, 1)),
        keras.layers.Conv2D(12, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ]
)
compile_args = {
    "optimizer": "adam",
    "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    "metrics": ["accuracy"],
}
model.compile(**compile_args)
model.fit(x_train, y_train, epochs=4, validation_split=0.1, verbose=0)
dense_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]

end_step = int(np.ceil(len(x_train) * 0.9 / 128)) * 2
pruned = sparsity.prune_low_magnitude(
    model,
    pruning_schedule=sparsity.PolynomialDecay(0.50, 0.80, 0, end_step),
)
pruned.compile(**compile_args)
pruned.fit(
    x_train,
    y_train,
    batch_size=128,
    epochs=2,
    validation_split=0.1,
    verbose=0,
    callbacks=[sparsity.UpdatePruningStep()],
)
pruned_accuracy = pruned.evaluate(x_test, y_test, verbose=0)[1]
stripped = sparsity.strip_pruning(pruned)
print(
    json.dumps(
        {
            "library": args.library,
            "seed": args.seed,
            "dense_accuracy": round(float(dense_accuracy), 4),
            "pruned_accuracy": round(float(pruned_accuracy), 4),
            "kernel_sparsity": [
                round(float(np.mean(w == 0)), 4)
                for w in stripped.get_weights()
                if w.ndim > 1
            ],
        }
    )
)
