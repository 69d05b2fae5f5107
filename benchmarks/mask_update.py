"""Time of one mask update per tensor size, kprune or tfmot, one process.

For each size n (a float32 weight tensor of n entries, normal values) it
times, inside a `tf.function` (no XLA unless `--jit`), at sparsity 0.7:

- `kprune`: `kprune.masking.magnitude_mask` (radix select, exact count),
  the mask assigned to its bool variable;
- `floor`: one read of the weights, `ops.max(ops.abs(w))`, the least any
  exact update can cost;
- `tfmot`: tfmot 0.8.1's `Pruning._update_mask` (full `top_k` sort), the
  mask assigned to its float32 variable, as tfmot stores it.

With `--baseline PATH` (kprune only) it also times `magnitude_mask` from
another copy of `masking.py` (such as the output of `git show
BASE:src/kprune/masking.py`), as `kprune_baseline`. The functions of one size
are called in turn, one call each per repeat, so a change in the machine's
load falls on all of them alike.

Prints one JSON line per (library, size) with the median and all repeats in
milliseconds. Run it through `benchmarks/bench.sh`.
"""

import argparse
import importlib.util
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
parser.add_argument("--baseline", help="another masking.py to time too")
args = parser.parse_args()

if args.library == "tfmot":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def times_ms(functions, repeats):
    """Milliseconds per call of each function, called in turn."""
    for function in functions.values():
        np.asarray(function())  # trace, compile, warm up
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            np.asarray(function())  # the result reaches the host: work done
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


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

    def update_with(module):
        def update():
            new_mask, threshold = module.magnitude_mask(weights, 0.7)
            mask.assign(new_mask)
            return threshold

        return update

    pairs = [
        ("kprune", update_with(masking)),
        ("floor", lambda: ops.max(ops.abs(weights))),
    ]
    if args.baseline:
        spec = importlib.util.spec_from_file_location(
            "baseline_masking", args.baseline
        )
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        pairs.append(("kprune_baseline", update_with(baseline)))
    return pairs


rng = np.random.default_rng(0)
for size in args.sizes:
    n = int(size)
    weights = tf.Variable(rng.normal(size=n).astype("float32"))
    functions = {
        name: tf.function(function, jit_compile=args.jit)
        for name, function in updates(weights)
    }
    for name, times in times_ms(functions, args.repeats).items():
        print(
            json.dumps(
                {
                    "bench": "mask_update",
                    "library": name,
                    "size": n,
                    "jit": args.jit,
                    "median_ms": round(statistics.median(times), 3),
                    "times_ms": [round(t, 3) for t in times],
                }
            ),
            flush=True,
        )
    del weights
