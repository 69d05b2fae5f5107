import inspect
import pathlib
import re

import kprune

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

TFMOT_NAMES = {
    "prune_low_magnitude",
    "strip_pruning",
    "prune_scope",
    "UpdatePruningStep",
    "PruningSummaries",
    "PruningSchedule",
    "ConstantSparsity",
    "PolynomialDecay",
    "PrunableLayer",
    "PruningPolicy",
    "PruneForLatencyOnXNNPack",
}

# Export, compression and reporting (issue 6).
EXPORT_NAMES = {
    "export_litert",
    "load_compact",
    "plot_mask",
    "plot_schedule",
    "plot_sparsity",
    "save_compact",
    "sparsity_report",
    "summary",
}

# Beyond tfmot: allocation, structured pruning, sensitivity.
BEYOND_TFMOT_NAMES = {
    "GlobalSparsity",
    "erk_sparsities",
    "per_layer_schedules",
    "prunable_layer_names",
    "StructuredSparsity",
    "shrink_model",
    "structured_plan",
    "sensitivity_analysis",
    "SensitivityResult",
}


def test_all_lists_the_tfmot_names_and_only_public_names():
    assert TFMOT_NAMES <= set(kprune.__all__)
    assert set(kprune.__all__) == (
        TFMOT_NAMES
        | {"PruneLowMagnitude", "register_prunable_layer"}
        | EXPORT_NAMES
        | BEYOND_TFMOT_NAMES
    )
    for name in kprune.__all__:
        assert hasattr(kprune, name)


def test_every_public_name_has_a_docstring_with_an_example_or_args():
    for name in kprune.__all__:
        doc = inspect.getdoc(getattr(kprune, name))
        assert doc and len(doc.splitlines()[0]) > 10, name


def test_every_public_name_is_documented_on_the_api_page():
    api = (DOCS / "api.md").read_text()
    headings = set(re.findall(r"^## `kprune\.(\w+)`", api, re.MULTILINE))
    assert headings == set(kprune.__all__)


def test_prune_low_magnitude_keeps_the_tfmot_signature():
    params = list(inspect.signature(kprune.prune_low_magnitude).parameters)
    assert params == [
        "to_prune",
        "pruning_schedule",
        "block_size",
        "block_pooling_type",
        "sparsity_m_by_n",
        "pruning_policy",
        "layers",
        "kwargs",
    ]
