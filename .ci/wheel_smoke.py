"""Prune a tiny model with the installed kprune wheel (run by .ci/run).

Run from outside the source tree, so that `import kprune` finds the wheel
installed in the environment and not `src/`. Trains a small Dense model for
one epoch on random data at constant 50% sparsity, strips it, checks that
the stripped kernels are exactly half zeros, and saves the pruned model to
the path given as the only argument (for `kprune summary`).
"""

import os
import sys

import keras
import numpy as np

import kprune

here = os.path.dirname(os.path.abspath(__file__))
source_tree = os.path.dirname(here)
if os.path.abspath(kprune.__file__).startswith(source_tree + os.sep):
    sys.exit(
        f"kprune was imported from the source tree ({kprune.__file__}), "
        "not from the installed wheel: run this script from another "
        "directory, without PYTHONPATH."
    )

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 8)).astype("float32")
y = rng.normal(size=(64, 1)).astype("float32")

model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)]
)
pruned = kprune.prune_low_magnitude(
    model,
    pruning_schedule=kprune.ConstantSparsity(0.5, begin_step=0, frequency=1),
)
pruned.compile(optimizer="adam", loss="mse")
pruned.fit(
    x,
    y,
    epochs=1,
    batch_size=16,
    callbacks=[kprune.UpdatePruningStep()],
    verbose=0,
)
pruned.save(sys.argv[1])

stripped = kprune.strip_pruning(pruned)
for layer in stripped.layers:
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    zeros = int(np.sum(kernel == 0))
    if zeros != kernel.size // 2:
        sys.exit(
            f"Layer {layer.name}: expected {kernel.size // 2} of "
            f"{kernel.size} kernel weights pruned to zero, got {zeros}."
        )
print(f"kprune {kprune.__version__} from {os.path.dirname(kprune.__file__)}")
print(f"pruned and stripped {len(stripped.layers)} layers to 50% sparsity")
