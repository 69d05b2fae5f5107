"""Training step time: plain vs pruned `fit`, kprune or tfmot, one process.

Builds the model three times with the same initial weights: plain, pruned
with `PolynomialDecay(0.5, 0.9)` at `frequency=100`, and at `frequency=1`
(tfmot's default `begin_step=0`; `end_step` beyond the run, so every timed
step lies inside the pruning window). Each is compiled with Adam and warmed
up; then rounds alternate between the three, each round timing `--steps`
(100) consecutive batches of 256 (so exactly one mask update at frequency
100), or `--f1-steps` at frequency 1, from the end of a first untimed batch
to the end of the last, so the `fit` setup is outside the timing. Prints one
JSON line per configuration with the median over rounds of the wall time per
step (and of the process CPU time, a cross-check on a shared machine). Run
it through `benchmarks/bench.sh`.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--library", choices=["kprune", "tfmot"], required=True)
parser.add_argument(
    "--model", choices=["mlp_512", "mlp_2048", "cnn"], required=True
)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--f1-steps", type=int, default=20)
parser.add_argument("--jit", action="store_true")
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

BATCH = 256


def build(name):
    layers = keras.layers
    if name == "cnn":
        stack = [
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10),
        ]
    else:
        width, depth = (512, 2) if name == "mlp_512" else (2048, 3)
        stack = [keras.Input((784,))]
        stack += [layers.Dense(width, activation="relu") for _ in range(depth)]
        stack.append(layers.Dense(10))
    return keras.Sequential(stack)


class StepClock(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.start = time.perf_counter(), time.process_time()
        self.end = time.perf_counter(), time.process_time()


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.jit,
    )
    return model


rng = np.random.default_rng(0)
shape = (28, 28, 1) if args.model == "cnn" else (784,)
most = max(args.steps, args.f1_steps) + 1
x = rng.normal(size=(BATCH * most, *shape)).astype("float32")
y = rng.integers(0, 10, size=len(x))

keras.utils.set_random_seed(0)
plain = build(args.model)
initial = plain.get_weights()
models = {"plain": compile_model(plain)}
for frequency in (100, 1):
    model = build(args.model)
    model.set_weights(initial)
    schedule = sparsity.PolynomialDecay(
        0.5, 0.9, begin_step=0, end_step=10**6, frequency=frequency
    )
    models[f"pruned_f{frequency}"] = compile_model(
        sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    )


def run(name, steps):
    clock = StepClock()
    callbacks = [clock]
    if name != "plain":
        callbacks.append(sparsity.UpdatePruningStep())
    models[name].fit(
        x[: BATCH * (steps + 1)],
        y[: BATCH * (steps + 1)],
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    wall = (clock.end[0] - clock.start[0]) / steps * 1e3
    cpu = (clock.end[1] - clock.start[1]) / steps * 1e3
    return wall, cpu


for name in models:
    run(name, 3)  # trace, warm up
times = {name: [] for name in models}
cpu_times = {name: [] for name in models}
for _ in range(args.rounds):
    for name in models:
        steps = args.f1_steps if name == "pruned_f1" else args.steps
        wall, cpu = run(name, steps)
        times[name].append(wall)
        cpu_times[name].append(cpu)
params = int(sum(np.prod(w.shape) for w in initial))
for name, values in times.items():
    print(
        json.dumps(
            {
                "bench": "step_time",
                "library": "keras" if name == "plain" else args.library,
                "flavour": "tf_keras" if args.library == "tfmot" else "keras3",
                "model": args.model,
                "params": params,
                "config": name,
                "jit": args.jit,
                "median_ms": round(statistics.median(values), 3),
                "times_ms": [round(t, 3) for t in values],
                "cpu_median_ms": round(statistics.median(cpu_times[name]), 3),
            }
        ),
        flush=True,
    )
