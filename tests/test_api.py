"""The public surface: where each name lives, its registration, its docs."""

import importlib
import inspect
import pathlib
import re
import subprocess
import sys
import types

import keras
import pytest

import kprune
from kprune import api_export
from kprune.api_export import kprune_export
from testing import mlp

ROOT = pathlib.Path(__file__).resolve().parents[1]

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

# Where the names beyond tfmot live (docs/api.md, "Where names live").
MODULE_NAMES = {
    "kprune.allocation": {
        "GlobalSparsity",
        "erk_sparsities",
        "per_layer_schedules",
        "prunable_layer_names",
    },
    "kprune.structured": {
        "StructuredSparsity",
        "fold_batchnorm",
        "shrink_model",
        "structured_plan",
    },
    "kprune.sensitivity": {"SensitivityResult", "sensitivity_analysis"},
    "kprune.export": {
        "export_litert",
        "semi_structured_to_dense",
        "semi_structured_weights",
        "xnnpack_sparse_problems",
    },
    "kprune.compression": {"load_compact", "save_compact"},
    "kprune.report": {"sparsity_report", "summary"},
    "kprune.plots": {"plot_mask", "plot_schedule", "plot_sparsity"},
    "kprune.registry": {"register_prunable_layer"},
    "kprune.engine": {"MaskGroup"},
    "kprune.pruning_policy": {"make_xnnpack_compatible"},
    "kprune.oneshot": {"oneshot", "quantize_gptq"},
}


def public_symbols():
    """(module, name, object) for every name `@kprune_export` declared."""
    for module in api_export.public_modules():
        for name in api_export.public_names(module):
            yield module, name, getattr(importlib.import_module(module), name)


def test_top_level_holds_the_tfmot_names_and_the_wrapper():
    assert set(kprune.__all__) == TFMOT_NAMES | {"PruneLowMagnitude"}
    for name in kprune.__all__:
        assert hasattr(kprune, name), name


def test_the_other_names_live_in_their_modules():
    assert api_export.public_modules() == ["kprune", *sorted(MODULE_NAMES)]
    for module, names in MODULE_NAMES.items():
        assert set(importlib.import_module(module).__all__) == names, module


def test_every_module_all_is_the_list_the_decorator_fills():
    for module in api_export.public_modules():
        all_ = importlib.import_module(module).__all__
        assert all_ is api_export.public_names(module), module
        assert len(set(all_)) == len(all_), module


# Names added after 0.1 live only in their module.
NEW_NAMES = {
    "MaskGroup",
    "fold_batchnorm",
    "make_xnnpack_compatible",
    "oneshot",
    "quantize_gptq",
    "semi_structured_to_dense",
    "semi_structured_weights",
    "xnnpack_sparse_problems",
}


def test_names_that_were_at_the_top_level_still_work():
    for module, names in MODULE_NAMES.items():
        for name in names - NEW_NAMES:
            home = getattr(importlib.import_module(module), name)
            assert getattr(kprune, name) is home, name
            assert name not in kprune.__all__, name
    from kprune import GlobalSparsity  # noqa: F401


def test_summary_is_a_function_and_report_its_module():
    assert inspect.isfunction(kprune.summary)
    assert kprune.summary is kprune.report.summary
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kprune.summary")


def test_every_public_name_has_a_docstring_with_a_summary_line():
    for module, name, symbol in public_symbols():
        doc = inspect.getdoc(symbol)
        assert doc and len(doc.splitlines()[0]) > 10, f"{module}.{name}"


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = re.findall(r"^::: (\S+)$", api, re.MULTILINE)
    assert len(documented) == len(set(documented))
    declared = {f"{module}.{name}" for module, name, _ in public_symbols()}
    assert set(documented) == declared
    # "Where names live" has a row per module.
    for module in api_export.public_modules():
        assert f"| [`{module}`](#" in api, module
    # The page is built: it is in the navigation of mkdocs.yml.
    assert re.search(
        r"^\s+- .*: api\.md$", (ROOT / "mkdocs.yml").read_text(), re.M
    )


def _serializable_classes():
    """Every public class that Keras can rebuild from its config."""
    return {
        name: symbol
        for _, name, symbol in public_symbols()
        if inspect.isclass(symbol)
        and callable(getattr(symbol, "get_config", None))
        and not inspect.isabstract(symbol)
    }


def test_every_serializable_class_is_registered_and_in_prune_scope():
    classes = _serializable_classes()
    assert {
        "PruneLowMagnitude",
        "ConstantSparsity",
        "PolynomialDecay",
        "GlobalSparsity",
        "StructuredSparsity",
    } <= set(classes)
    assert api_export.custom_objects() == classes
    for name, cls in classes.items():
        registered = f"kprune>{name}"
        assert keras.saving.get_registered_name(cls) == registered
        assert keras.saving.get_registered_object(registered) is cls
    with kprune.prune_scope():
        for name, cls in classes.items():
            assert keras.saving.get_registered_object(name) is cls


def test_a_model_with_every_public_class_loads_with_only_kprune_imported(
    tmp_path,
):
    ramp = kprune.PolynomialDecay(0.2, 0.8, 0, 10, frequency=1)
    schedules = {
        "ConstantSparsity": kprune.ConstantSparsity(0.5, 0),
        "PolynomialDecay": ramp,
        "GlobalSparsity": kprune.allocation.GlobalSparsity(ramp),
        "StructuredSparsity": kprune.structured.StructuredSparsity(ramp),
    }
    # A new serializable schedule needs a line above.
    assert set(schedules) | {"PruneLowMagnitude"} == set(
        _serializable_classes()
    )
    for name, schedule in schedules.items():
        pruned = kprune.prune_low_magnitude(mlp(), schedule)
        pruned.save(tmp_path / f"{name}.keras")
    script = (
        "import sys, keras, kprune\n"
        "from kprune.wrapper import collect_pruned_layers\n"
        "for name in sys.argv[2:]:\n"
        "    m = keras.saving.load_model(f'{sys.argv[1]}/{name}.keras')\n"
        "    kinds = {type(w.pruning_schedule).__name__\n"
        "             for w in collect_pruned_layers(m)}\n"
        "    print(name, *sorted(kinds))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), *schedules],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:-1] == [
        f"{name} {name}" for name in schedules
    ]


@pytest.fixture
def empty_registry(monkeypatch):
    """A fresh export table and an importable module `kprune_fake`."""
    monkeypatch.setattr(api_export, "_PUBLIC_NAMES", {})
    monkeypatch.setattr(api_export, "_SERIALIZABLE", {})
    module = types.ModuleType("kprune_fake")
    monkeypatch.setitem(sys.modules, "kprune_fake", module)
    return module


def _function_in(module):
    def helper():
        """Does nothing."""

    helper.__module__ = module.__name__
    return helper


def test_kprune_export_fills_the_module_all(empty_registry):
    kprune_export("kprune_fake")(_function_in(empty_registry))
    assert empty_registry.__all__ == ["helper"]
    assert api_export.custom_objects() == {}


def test_kprune_export_refuses_a_module_that_does_not_define_the_name(
    empty_registry,
):
    with pytest.raises(ValueError, match="defined in `kprune_fake`"):
        kprune_export("kprune.allocation")(_function_in(empty_registry))


def test_kprune_export_refuses_a_name_exported_twice(empty_registry):
    helper = _function_in(empty_registry)
    kprune_export("kprune_fake")(helper)
    with pytest.raises(ValueError, match="exported twice"):
        kprune_export("kprune_fake")(helper)


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


@pytest.mark.parametrize(
    "call",
    [
        lambda m, path: kprune.strip_pruning(m),
        lambda m, path: kprune.structured.shrink_model(m),
        lambda m, path: kprune.structured.fold_batchnorm(m),
        lambda m, path: kprune.oneshot.oneshot(m, None),
        lambda m, path: kprune.oneshot.quantize_gptq(m, None),
        lambda m, path: kprune.export.semi_structured_weights(m),
        lambda m, path: kprune.compression.save_compact(m, path / "m.h5"),
    ],
    ids=[
        "strip_pruning",
        "shrink_model",
        "fold_batchnorm",
        "oneshot",
        "quantize_gptq",
        "semi_structured_weights",
        "save_compact",
    ],
)
def test_functions_of_a_model_refuse_a_layer_naming_the_argument(
    call, tmp_path
):
    layer = keras.layers.Dense(2)
    with pytest.raises(
        ValueError,
        match=r"must be a Keras model\. Received: model=<Dense",
    ):
        call(layer, tmp_path)
    # Nothing written: the check comes before any work.
    assert not list(tmp_path.iterdir())
