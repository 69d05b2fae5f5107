"""Trains a pruned model with BackupAndRestore; run by test_resume.py.

Usage: python resume_child.py BACKUP_DIR OUT.npz SEED [KILL_AT_BATCH]

With KILL_AT_BATCH, the process kills itself (SIGKILL, no cleanup) at that
batch of the second epoch, as a preempted job would die.
"""

import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402
from kprune.wrapper import collect_pruned_layers  # noqa: E402

EPOCHS, BATCHES, BATCH_SIZE = 3, 8, 4
# Masks are recomputed every 2 steps up to step 6, then kept: a run that
# resumes from a backup taken later must end with the backup's masks.
SCHEDULE = kprune.ConstantSparsity(0.7, 0, end_step=6, frequency=2)


class KillAt(keras.callbacks.Callback):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def main(backup_dir, out, seed, kill_at=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    pruned = kprune.prune_low_magnitude(model, SCHEDULE)
    pruned.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)  # the same data in every run
    x = rng.normal(size=(BATCHES * BATCH_SIZE, 8)).astype("float32")
    y = rng.integers(0, 3, size=(BATCHES * BATCH_SIZE,))
    callbacks = [
        kprune.UpdatePruningStep(),
        keras.callbacks.BackupAndRestore(backup_dir, save_freq=3),
    ]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    pruned.fit(
        x,
        y,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    layers = collect_pruned_layers(pruned)
    np.savez(
        out,
        step=np.array(
            [int(keras.ops.convert_to_numpy(w.pruning_step)) for w in layers]
        ),
        **{
            f"mask{i}": keras.ops.convert_to_numpy(mask)
            for i, (_, mask, _) in enumerate(
                v for w in layers for v in w.pruning_vars
            )
        },
        **{
            f"weight{i}": keras.ops.convert_to_numpy(weight)
            for i, (weight, _, _) in enumerate(
                v for w in layers for v in w.pruning_vars
            )
        },
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0],
        args[1],
        int(args[2]),
        int(args[3]) if len(args) > 3 else None,
    )
