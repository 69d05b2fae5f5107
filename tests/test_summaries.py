import os
import pathlib

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import kprune
from kprune.callbacks import pruning_stats
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import requires_tensorflow


def read_scalars(run_dir):
    acc = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        if events[0].tensor_proto.dtype != 1:  # DT_FLOAT only: no graphs
            continue
        out[tag] = [
            (event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in events
        ]
    return out


def test_pruning_summaries_logs_sparsity_and_threshold_per_weight(tmp_path):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(), kprune.PolynomialDecay(0.3, 0.8, 0, 16, frequency=2)
        )
    )
    x, y = classification_data()
    fit_pruned(
        pruned,
        x,
        y,
        epochs=2,
        callbacks=[kprune.PruningSummaries(log_dir=str(tmp_path))],
    )
    scalars = read_scalars(os.path.join(tmp_path, "train"))
    stats = pruning_stats(pruned)
    for row in stats["weights"]:
        sparsity = scalars[f"{row['path']}/sparsity"]
        threshold = scalars[f"{row['path']}/threshold"]
        assert [step for step, _ in sparsity] == [8, 16]
        assert sparsity[-1][1] == pytest.approx(row["sparsity"])
        assert threshold[-1][1] == pytest.approx(row["threshold"])
        assert threshold[-1][1] > 0
    assert scalars["model_sparsity"][-1][1] == pytest.approx(stats["sparsity"])
    assert scalars["model_sparsity"][0][1] < scalars["model_sparsity"][1][1]
    # The regular TensorBoard metrics are still written.
    assert "epoch_loss" in scalars


def test_pruning_summaries_with_integer_update_freq(tmp_path):
    pruned = compile_classifier(kprune.prune_low_magnitude(mlp()))
    x, y = classification_data()
    fit_pruned(
        pruned,
        x,
        y,
        epochs=1,
        callbacks=[
            kprune.PruningSummaries(log_dir=str(tmp_path), update_freq=2)
        ],
    )
    scalars = read_scalars(os.path.join(tmp_path, "train"))
    steps = [step for step, _ in scalars["model_sparsity"]]
    # Step 8 is logged once, not again at the end of the epoch.
    assert steps == [2, 4, 6, 8]


@requires_tensorflow
def test_tfmot_guide_custom_training_loop_logs_sparsity(tmp_path):
    # The loop of tfmot's comprehensive guide, with only the import changed.
    import tensorflow as tf

    model_for_pruning = kprune.prune_low_magnitude(
        mlp(), kprune.ConstantSparsity(0.5, begin_step=0, frequency=1)
    )
    x_train, y_train = classification_data(n=4)
    y_train = keras.utils.to_categorical(y_train, 3)
    loss = keras.losses.categorical_crossentropy
    optimizer = keras.optimizers.Adam()
    log_dir = str(tmp_path)
    unused_arg = -1
    epochs = 2
    batches = 1

    model_for_pruning.optimizer = optimizer
    step_callback = kprune.UpdatePruningStep()
    step_callback.set_model(model_for_pruning)
    log_callback = kprune.PruningSummaries(log_dir=log_dir)
    log_callback.set_model(model_for_pruning)

    step_callback.on_train_begin()
    for _ in range(epochs):
        log_callback.on_epoch_begin(epoch=unused_arg)
        for _ in range(batches):
            step_callback.on_train_batch_begin(batch=unused_arg)
            with tf.GradientTape() as tape:
                logits = model_for_pruning(x_train, training=True)
                loss_value = loss(y_train, logits, from_logits=True)
                grads = tape.gradient(
                    loss_value, model_for_pruning.trainable_variables
                )
                optimizer.apply_gradients(
                    zip(grads, model_for_pruning.trainable_variables)
                )
        step_callback.on_epoch_end(batch=unused_arg)

    scalars = read_scalars(os.path.join(tmp_path, "train"))
    # Logged as each epoch begins: before training, then after one step.
    assert [step for step, _ in scalars["model_sparsity"]] == [0, 1]
    assert scalars["model_sparsity"][0][1] == 0.0
    assert scalars["model_sparsity"][1][1] == pytest.approx(0.5, abs=0.02)
    for row in pruning_stats(model_for_pruning)["weights"]:
        assert [s for s, _ in scalars[f"{row['path']}/sparsity"]] == [0, 1]


def test_callbacks_accept_tfmot_argument_names(tmp_path):
    pruned = kprune.prune_low_magnitude(mlp())
    pruned.build((None, 8))
    step_callback = kprune.UpdatePruningStep()
    log_callback = kprune.PruningSummaries(log_dir=tmp_path)
    for callback in (step_callback, log_callback):
        callback.set_model(pruned)
        callback.on_train_batch_begin(batch=-1)
        callback.on_train_batch_begin(-1)
        callback.on_epoch_begin(epoch=-1)
        callback.on_epoch_begin(-1)
        callback.on_epoch_end(batch=-1)
        callback.on_epoch_end(-1)
        callback.on_epoch_end(epoch=0, logs={})
    step_callback.on_train_begin()
    logs = {}
    step_callback.on_epoch_end(batch=-1, logs=logs)
    assert logs == {"sparsity": 0.0}
    scalars = read_scalars(os.path.join(tmp_path, "train"))
    # Called by hand, outside `fit`, it logs once per step.
    assert scalars["model_sparsity"] == [(0, 0.0)]


@pytest.mark.parametrize("log_dir", ["", None, 3, b"logs", ["logs"]])
def test_pruning_summaries_refuses_a_log_dir_that_is_not_a_path(log_dir):
    with pytest.raises(ValueError, match="`log_dir`.*Received: log_dir="):
        kprune.PruningSummaries(log_dir=log_dir)


def test_pruning_summaries_accepts_a_pathlike_log_dir(tmp_path):
    pruned = compile_classifier(kprune.prune_low_magnitude(mlp()))
    x, y = classification_data(n=8)
    fit_pruned(
        pruned,
        x,
        y,
        callbacks=[kprune.PruningSummaries(log_dir=pathlib.Path(tmp_path))],
    )
    scalars = read_scalars(os.path.join(tmp_path, "train"))
    assert [step for step, _ in scalars["model_sparsity"]] == [2]
    assert np.isfinite(scalars["model_sparsity"][0][1])
