"""Memory of pruning a large model, kprune or tfmot or plain, one process.

Builds an MLP 784-4096-4096-4096-10 (36.8M parameters), prunes every Dense
kernel (or not, for `--plain`), and trains 3 batches of 256 with Adam and
`PolynomialDecay(0.5, 0.9, frequency=1)`, so each batch updates every mask.
Prints one JSON line: the bytes of the masks per pruned weight (from the
mask variables' dtypes and sizes), the peak resident memory of the process
(`ru_maxrss`), the resident memory after training and the peak of
TensorFlow's CPU allocator (tensors in use; both libraries run on
TensorFlow). Peak memory counts only
within one process, so each configuration runs in its own: compare a pruned
run with the plain run of the same Keras. Plain runs import the pruning
library too, so its import is not counted as pruning memory. Run it through
`benchmarks/bench.sh`. `--collect` runs Python's full garbage collection
before training (in both arms): the input model that
`model = prune_low_magnitude(model)` drops is held by Keras's reference
cycles until the next full collection, which in the runs measured came
during `fit` on TensorFlow and not on JAX (benchmarks/README.md).
"""

import argparse
import gc
import json
import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--library", choices=["kprune", "tfmot"], required=True)
parser.add_argument("--plain", action="store_true")
parser.add_argument("--width", type=int, default=4096)
parser.add_argument("--collect", action="store_true")
args = parser.parse_args()

if args.library == "tfmot":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    sparsity = tfmot.sparsity.keras
else:
    import keras

    import kprune as sparsity
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BATCH = 256


def allocator_mib(key):
    """TensorFlow's CPU allocator: bytes of tensors in use, `"current"` or
    `"peak"`, in MiB. Unlike the process's resident memory, it leaves out
    the allocator's free blocks and the interpreter's own memory."""
    return round(
        tf.config.experimental.get_memory_info("CPU:0")[key] / 2**20, 1
    )


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((784,))]
    + [keras.layers.Dense(args.width, activation="relu") for _ in range(3)]
    + [keras.layers.Dense(10)]
)
params = model.count_params()
callbacks = []
if not args.plain:
    schedule = sparsity.PolynomialDecay(
        0.5, 0.9, begin_step=0, end_step=10**6, frequency=1
    )
    model = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    callbacks.append(sparsity.UpdatePruningStep())
if args.collect:
    gc.collect()
model.compile(
    optimizer="adam",
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
rng = np.random.default_rng(0)
x = rng.normal(size=(BATCH * 3, 784)).astype("float32")
y = rng.integers(0, 10, size=len(x))
model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)

mask_bytes = pruned = 0
for variable in model.variables:
    name = variable.name.split("/")[-1].split(":")[0]
    if name.endswith("mask"):
        dtype = np.dtype(getattr(variable.dtype, "name", variable.dtype))
        mask_bytes += int(np.prod(variable.shape)) * dtype.itemsize
        pruned += int(np.prod(variable.shape))
print(
    json.dumps(
        {
            "bench": "memory",
            "library": "keras" if args.plain else args.library,
            "collect": args.collect,
            "flavour": "tf_keras" if args.library == "tfmot" else "keras3",
            "params": params,
            "pruned_weights": pruned,
            "mask_bytes_per_pruned_weight": (
                round(mask_bytes / pruned, 3) if pruned else 0
            ),
            "peak_rss_mib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
            "rss_after_mib": round(rss_mib(), 1),
            "tensor_peak_mib": allocator_mib("peak"),
        }
    ),
    flush=True,
)
