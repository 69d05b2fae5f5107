"""Callbacks that drive pruning in `fit` and log it to TensorBoard."""

import os

import keras
import numpy as np
from keras import ops

from kprune import engine
from kprune.api_export import kprune_export
from kprune.wrapper import collect_pruned_layers


def pruning_stats(model) -> dict:
    """Reads the masks and thresholds of every pruned weight of `model`.

    Args:
        model: A model (or layer) containing `PruneLowMagnitude` layers.

    Returns:
        A dict with `"weights"`: a list of dicts (`path`, `size`, `zeros`,
        `sparsity`, `threshold`) per pruned weight, and `"sparsity"`: the
        fraction of zeros over all pruned weights together (0.0 if none).
    """
    rows = []
    for layer in collect_pruned_layers(model):
        for weight, mask, threshold in layer.pruning_vars:
            # Counted by the backend: a NumPy copy of every mask at each
            # epoch's end would grow the process outside the backend's
            # memory pool, which training leaves with free space.
            kept = int(ops.convert_to_numpy(ops.sum(ops.cast(mask, "int32"))))
            size = int(np.prod(weight.shape))
            rows.append(
                {
                    "path": weight.path,
                    "size": size,
                    "zeros": size - kept,
                    "sparsity": (size - kept) / size,
                    "threshold": float(ops.convert_to_numpy(threshold)),
                }
            )
    total = sum(r["size"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return {"weights": rows, "sparsity": zeros / total if total else 0.0}


@kprune_export("kprune")
class UpdatePruningStep(keras.callbacks.Callback):
    """Drives the pruning schedule; required when training a pruned model.

    At the start of training it connects every pruned layer to the pruning
    engine (`kprune.engine`), which groups layers whose masks are computed
    together. The step then advances inside the compiled training step,
    once per training batch, in the layer's training-mode call (also when a
    `LossScaleOptimizer` skips the update): a new layer's step goes from -1
    (never trained) to 1 at the first batch, and a loaded one continues
    from its saved step. At the end
    of each epoch it adds the model's current sparsity to the logs as
    `"sparsity"` (shown by the progress bar and kept in `History`).

    Training a pruned model without it fails at the first step with an
    error that says to add it.

    In a custom training loop, call `set_model(model)` and
    `on_train_begin()` once before the first step, and call the model with
    `training=True`: that call advances the step and updates masks, and
    the optimizer's `apply`/`apply_gradients` zeroes the pruned weights.
    The other hooks may be called as in `tfmot` code, with its argument
    names (`on_train_batch_begin(batch=...)`, `on_epoch_end(batch=...)`).

    Example:

    ```python
    model.fit(x, y, epochs=2, callbacks=[kprune.UpdatePruningStep()])
    ```
    """

    def __init__(self):
        super().__init__()
        self.prunable_layers = []

    def on_train_begin(self, logs=None):
        self.prunable_layers = collect_pruned_layers(self.model)
        retrace = engine.connect(self.model, self.prunable_layers)
        if retrace and getattr(self.model, "compiled", False):
            # The last `fit` failed while tracing its training step, which
            # TensorFlow cannot trace again: start from a new one, so that
            # `fit` with this callback works without compiling again.
            self.model.make_train_function(force=True)

    def on_train_batch_begin(self, batch=None, logs=None):
        engine.new_batch(self.prunable_layers)

    def on_train_end(self, logs=None):
        engine.disconnect(self.prunable_layers)

    def on_epoch_end(self, epoch=None, logs=None, batch=None):
        # `batch` is the name `tfmot` gives the epoch here; its guides call
        # `on_epoch_end(batch=...)`.
        if logs is not None and self.prunable_layers:
            logs["sparsity"] = pruning_stats(self.model)["sparsity"]


@kprune_export("kprune")
class PruningSummaries(keras.callbacks.TensorBoard):
    """TensorBoard callback that also logs pruning progress.

    Besides everything `keras.callbacks.TensorBoard` writes, it logs to the
    `train` run, as scalars at the current pruning step:
    `<weight path>/sparsity` and `<weight path>/threshold` for each pruned
    weight, and `model_sparsity` for all pruned weights together. In `fit`
    it logs at the end of each epoch and, when `update_freq` is an
    integer, every `update_freq` batches. Outside `fit` (a custom training
    loop that calls its hooks by hand, as `tfmot`'s guide does), it also
    logs when `on_epoch_begin` is called. It never logs the same step
    twice. Needs TensorFlow (for `tf.summary`).

    Args:
        log_dir: Directory for the event files: a non-empty string or
            `os.PathLike`.
        update_freq: `"epoch"`, or log every this many batches.
        **kwargs: Passed to `keras.callbacks.TensorBoard`.

    Raises:
        ValueError: If `log_dir` is not a non-empty path.

    Example:

    ```python
    model.fit(
        x, y, callbacks=[
            kprune.UpdatePruningStep(),
            kprune.PruningSummaries(log_dir="logs"),
        ],
    )
    ```
    """

    def __init__(self, log_dir, update_freq="epoch", **kwargs):
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(
            log_dir
        ):
            raise ValueError(
                "Argument `log_dir` must be a non-empty string or "
                "`os.PathLike`: the directory for the event files, such as "
                f'"logs". Received: log_dir={log_dir!r}'
            )
        super().__init__(log_dir=log_dir, update_freq=update_freq, **kwargs)
        self._pruning_writer = None
        self._in_fit = False
        self._last_logged_step = None

    def set_model(self, model):
        super().set_model(model)
        self._last_logged_step = None

    def _write_pruning_summaries(self):
        import tensorflow as tf

        layers = collect_pruned_layers(self.model)
        if not layers:
            return
        # -1 means never trained: that is step 0 of the logs.
        step = max(int(ops.convert_to_numpy(layers[0].pruning_step)), 0)
        if step == self._last_logged_step:
            return
        self._last_logged_step = step
        if self._pruning_writer is None:
            self._pruning_writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "train")
            )
        stats = pruning_stats(self.model)
        with self._pruning_writer.as_default(step=step):
            for row in stats["weights"]:
                tf.summary.scalar(f"{row['path']}/sparsity", row["sparsity"])
                tf.summary.scalar(f"{row['path']}/threshold", row["threshold"])
            tf.summary.scalar("model_sparsity", stats["sparsity"])
        self._pruning_writer.flush()

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._in_fit = True

    def on_epoch_begin(self, epoch=None, logs=None):
        super().on_epoch_begin(epoch, logs)
        # `tfmot` logs here, and its guide's custom loop calls only this
        # hook; in `fit` the epoch's end logs the same state.
        if not self._in_fit:
            self._write_pruning_summaries()

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if isinstance(self.update_freq, int) and (
            (batch + 1) % self.update_freq == 0
        ):
            self._write_pruning_summaries()

    def on_epoch_end(self, epoch=None, logs=None, batch=None):
        # `batch` is the name `tfmot` gives the epoch here.
        super().on_epoch_end(batch if epoch is None else epoch, logs)
        self._write_pruning_summaries()

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self._in_fit = False
        if self._pruning_writer is not None:
            self._pruning_writer.close()
            self._pruning_writer = None
