import os

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import kprune
from kprune.callbacks import pruning_stats
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp


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
    assert steps == [2, 4, 6, 8, 8]
