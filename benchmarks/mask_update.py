"""Time of one mask update per tensor size, kprune or tfmot, one process.

For each size n (a float32 weight tensor of n entries, normal values) it
times, inside a `tf.function` (no XLA unless `--jit`), at sparsity 0.7:

- `kprune`: `kprune.masking.magnitude_mask` (radix select, exact count),
  the mask assigned to its bool variable;
- `floor`: one read of the weights, `ops.max(ops.abs(w))`, the least any
  exact update can cost;
- `tfmot`: tfmot 0.8.1's `Pruning._update_mask` (full `top_k` sort), the
  mask assigned to its float32 variable, as tfmot stores it.

Prints one JSON line per (library, size) with the median and all repeats in
milliseconds. Run it through `benchmarks/bench.sh`.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--library", choices=["kprune", "tfmot"], required=True)
parser.add_argument("--sizes", type=float, nargs="+", required=True)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--jit", action="store_true")
args = parser.parse_args()

if args.library == "tfmot":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def median_ms(function, repeats):
    np.asarray(function())  # trace, compile, warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(function())  # the result reaches the host: work is done
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def updates(weights):
    """(name, function) pairs timed at this size; each returns a scalar."""
    if args.library == "tfmot":
        from tensorflow_model_optimization.python.core.sparsity.keras import (
            pruning_impl,
        )
        from tensorflow_model_optimization.sparsity import keras as sparsity

        pruning = pruning_impl.Pruning(
            training_step_fn=lambda: tf.constant(1, tf.int64),
            pruning_vars=[],
            pruning_schedule=sparsity.ConstantSparsity(0.7, 0),
            block_size=(1, 1),
            block_pooling_type="AVG",
        )
        mask = tf.Variable(tf.ones_like(weights))

        def tfmot_update():
            threshold, new_mask = pruning._update_mask(weights)
            mask.assign(new_mask)
            return threshold

        return [("tfmot", tfmot_update)]
    from keras import ops

    from kprune import masking

    mask = tf.Variable(tf.ones(weights.shape, tf.bool))

    def kprune_update():
        new_mask, threshold = masking.magnitude_mask(weights, 0.7)
        mask.assign(new_mask)
        return threshold

    return [
        ("kprune", kprune_update),
        ("floor", lambda: ops.max(ops.abs(weights))),
    ]


rng = np.random.default_rng(0)
for size in args.sizes:
    n = int(size)
    weights = tf.Variable(rng.normal(size=n).astype("float32"))
    for name, function in updates(weights):
        compiled = tf.function(function, jit_compile=args.jit)
        median, times = median_ms(compiled, args.repeats)
        print(
            json.dumps(
                {
                    "bench": "mask_update",
                    "library": name,
                    "size": n,
                    "jit": args.jit,
                    "median_ms": round(median, 3),
                    "times_ms": [round(t, 3) for t in times],
                }
            ),
            flush=True,
        )
    del weights
