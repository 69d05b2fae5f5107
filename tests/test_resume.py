"""Nothing lost: every way Keras saves a pruned model mid-schedule."""

import pathlib
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import pruned_weights
from testing import requires_tensorflow
from testing import steps

CHILD = pathlib.Path(__file__).with_name("resume_child.py")
SCHEDULE = kprune.PolynomialDecay(0.2, 0.8, 0, 40, frequency=3)


def trained_mid_schedule(**mlp_args):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(mlp(**mlp_args), SCHEDULE)
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y)
    assert steps(pruned) == [8, 8]  # mid-schedule: masks still changing
    return pruned, x, y


def fresh_pruned(**mlp_args):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(mlp(**mlp_args), SCHEDULE)
    )
    pruned.optimizer.build(pruned.trainable_variables)
    return pruned


def assert_same_state(a, b):
    assert steps(a) == steps(b)
    for (w1, m1), (w2, m2) in zip(pruned_weights(a), pruned_weights(b)):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(m1, m2)
    for v1, v2 in zip(a.weights, b.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(v1), keras.ops.convert_to_numpy(v2)
        )


def test_weights_file_round_trips_state_and_training_continues_alike(
    tmp_path,
):
    pruned, x, y = trained_mid_schedule()
    pruned.save_weights(tmp_path / "p.weights.h5")
    restored = fresh_pruned()
    restored.load_weights(tmp_path / "p.weights.h5")
    assert_same_state(pruned, restored)
    # Optimizer state comes along: both continue identically.
    fit_pruned(pruned, x, y, epochs=2)
    fit_pruned(restored, x, y, epochs=2)
    assert steps(restored) == [24, 24]
    assert_same_state(pruned, restored)


def test_keras_file_round_trip_continues_like_the_original(tmp_path):
    pruned, x, y = trained_mid_schedule()
    pruned.save(tmp_path / "p.keras")
    loaded = keras.saving.load_model(tmp_path / "p.keras")
    assert_same_state(pruned, loaded)
    fit_pruned(pruned, x, y, epochs=2)
    fit_pruned(loaded, x, y, epochs=2)
    assert_same_state(pruned, loaded)


def test_backup_and_restore_round_trips_weights_masks_and_step(tmp_path):
    pruned, x, y = trained_mid_schedule()
    backup = keras.callbacks.BackupAndRestore(
        tmp_path / "backup", save_freq="epoch", delete_checkpoint=False
    )
    fit_pruned(pruned, x, y, epochs=2, callbacks=[backup])
    assert steps(pruned) == [24, 24]
    restored = fresh_pruned()
    # The backup says both epochs are done: `fit` only restores.
    fit_pruned(
        restored,
        x,
        y,
        epochs=2,
        callbacks=[
            keras.callbacks.BackupAndRestore(
                tmp_path / "backup", delete_checkpoint=False
            )
        ],
    )
    assert_same_state(pruned, restored)


@requires_tensorflow
def test_saved_model_export_keeps_weights_masks_and_step(tmp_path):
    import tensorflow as tf

    pruned, x, _ = trained_mid_schedule()
    pruned.export(tmp_path / "saved", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(
        reloaded.serve(x).numpy(), pruned.predict(x, verbose=0), atol=1e-6
    )
    exported = sorted(
        (v.numpy().tobytes(), v.dtype.name) for v in reloaded.variables
    )
    expected = sorted(
        (
            keras.ops.convert_to_numpy(v).tobytes(),
            keras.backend.standardize_dtype(v.dtype),
        )
        for v in pruned.weights
    )
    assert exported == expected  # masks (bool), thresholds, step (int64)


def test_loading_a_plain_file_into_a_pruned_model_fails_and_changes_nothing(
    tmp_path,
):
    mlp().save_weights(tmp_path / "plain.weights.h5")
    pruned, _, _ = trained_mid_schedule()
    before = [np.array(w) for w in pruned.get_weights()]
    with pytest.raises(ValueError, match="not pruned.*prune_low_magnitude"):
        pruned.load_weights(tmp_path / "plain.weights.h5")
    for a, b in zip(before, pruned.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_loading_another_architecture_fails_and_changes_nothing(
    tmp_path, suffix
):
    other, _, _ = trained_mid_schedule(hidden=12)
    path = tmp_path / f"other{suffix}"
    if suffix == ".keras":
        other.save(path)
    else:
        other.save_weights(path)
    target, _, _ = trained_mid_schedule()
    before = [np.array(w) for w in target.get_weights()]
    with pytest.raises(ValueError, match="another architecture"):
        target.load_weights(path)
    for a, b in zip(before, target.get_weights()):
        np.testing.assert_array_equal(a, b)


def run_child(*args):
    return subprocess.run(
        [sys.executable, str(CHILD), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_masks(tmp_path):
    whole = run_child(tmp_path / "backup_whole", tmp_path / "whole.npz", 1)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = run_child(tmp_path / "backup", tmp_path / "killed.npz", 1, 5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed.npz").exists()
    assert (tmp_path / "backup").exists()

    # Another seed: had the backup not been restored, the masks would
    # differ.
    resumed = run_child(tmp_path / "backup", tmp_path / "resumed.npz", 7)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    whole, resumed = (
        np.load(tmp_path / "whole.npz"),
        np.load(tmp_path / "resumed.npz"),
    )
    masks = sorted(k for k in whole.files if k.startswith("mask"))
    assert masks == ["mask0", "mask1"]
    for key in masks:
        np.testing.assert_array_equal(resumed[key], whole[key])
        assert resumed[key].mean() == pytest.approx(0.3, abs=0.01)
    for i in range(2):
        weight = resumed[f"weight{i}"]
        assert np.count_nonzero(weight[~resumed[f"mask{i}"]]) == 0
    # 3 epochs of 8 steps; resumed from the backup at step 12 (epoch 2,
    # batch 4), Keras reruns epoch 2 from its start: 12 + 16 steps.
    assert list(whole["step"]) == [24, 24]
    assert list(resumed["step"]) == [28, 28]
