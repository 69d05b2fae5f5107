"""Every public name of tfmot 0.8.1's `tfmot.sparsity.keras` is in kprune."""

import pytest

import kprune

# tfmot.sparsity.keras's public API (tensorflow_model_optimization 0.8.1).
TFMOT_SPARSITY_KERAS = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PrunableLayer",
    "PruneForLatencyOnXNNPack",
    "PruningPolicy",
    "PruningSchedule",
    "PruningSummaries",
    "UpdatePruningStep",
    "prune_low_magnitude",
    "prune_scope",
    "strip_pruning",
]


@pytest.mark.parametrize("name", TFMOT_SPARSITY_KERAS)
def test_tfmot_name_is_public_in_kprune(name):
    assert name in kprune.__all__
    assert getattr(kprune, name) is not None


def test_prune_for_latency_on_xnnpack_is_a_pruning_policy():
    assert issubclass(kprune.PruneForLatencyOnXNNPack, kprune.PruningPolicy)
