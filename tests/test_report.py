"""`kprune.report.summary` and `kprune.report.sparsity_report`."""

import keras
import numpy as np
import pytest

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import small_cnn


def trained(model, **kwargs):
    pruned = compile_classifier(kprune.prune_low_magnitude(model, **kwargs))
    x, y = classification_data(shape=model.input_shape[1:])
    fit_pruned(pruned, x, y)
    return pruned


def every_step(sparsity):
    return kprune.ConstantSparsity(sparsity, 0, frequency=1)


def test_report_counts_the_zeros_of_every_weight():
    pruned = trained(small_cnn(), pruning_schedule=every_step(0.75))
    stripped = kprune.strip_pruning(pruned)
    report = kprune.report.sparsity_report(stripped)
    weights = stripped.get_weights()
    assert [r["shape"] for r in report["weights"]] == [
        list(w.shape) for w in weights
    ]
    for row, values in zip(report["weights"], weights):
        assert row["parameters"] == values.size
        assert row["nonzeros"] == np.count_nonzero(values)
        assert row["sparsity"] == pytest.approx(
            1 - row["nonzeros"] / values.size
        )
    assert [r["pruned"] for r in report["weights"]] == [
        True,
        False,
        True,
        False,
    ]
    assert report["total"]["parameters"] == sum(w.size for w in weights)
    kernels = [w for w in weights if w.ndim > 1]
    assert report["pruned_total"]["nonzeros"] == sum(
        np.count_nonzero(k) for k in kernels
    )


def test_pruned_and_stripped_models_report_the_same_sparsity():
    pruned = trained(small_cnn(), pruning_schedule=every_step(0.75))
    keys = ("shape", "parameters", "nonzeros", "sparsity", "pruned")
    rows = [
        [
            {k: r[k] for k in keys}
            for r in kprune.report.sparsity_report(m)["weights"]
        ]
        for m in (pruned, kprune.strip_pruning(pruned))
    ]
    assert rows[0] == rows[1]


def test_report_on_a_pruned_model_follows_the_masks_before_training():
    pruned = kprune.prune_low_magnitude(mlp(), pruning_schedule=every_step(0.5))
    layer = pruned.layers[0]
    _, mask, _ = layer.pruning_vars[0]
    mask.assign(np.zeros(mask.shape, bool))
    row = kprune.report.sparsity_report(pruned)["weights"][0]
    assert row["nonzeros"] == 0 and row["sparsity"] == 1.0


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"sparsity_m_by_n": (2, 4)}, "2:4"),
        ({"block_size": (4, 1)}, "block 4x1"),
        ({}, None),
    ],
)
def test_report_names_the_pruning_pattern(kwargs, pattern):
    pruned = trained(mlp(outputs=8), pruning_schedule=every_step(0.5), **kwargs)
    for model in (pruned, kprune.strip_pruning(pruned)):
        kernels = [r for r in kprune.report.sparsity_report(model)["weights"]]
        assert [r["pattern"] for r in kernels] == [pattern, None] * 2


def test_unpruned_model_reports_its_zero_biases_and_dense_kernels():
    report = kprune.report.sparsity_report(mlp())
    assert report["pruned_total"]["sparsity"] == 0
    # Keras initializes biases to zero.
    assert report["total"]["parameters"] == 8 * 16 + 16 + 16 * 3 + 3
    assert report["total"]["nonzeros"] == 8 * 16 + 16 * 3


def test_summary_prints_a_row_per_weight_and_totals():
    pruned = trained(mlp(), pruning_schedule=every_step(0.5))
    lines = []
    kprune.report.summary(kprune.strip_pruning(pruned), print_fn=lines.append)
    text = "\n".join(lines)
    assert lines[0].split() == [
        "Weight",
        "Shape",
        "Params",
        "Nonzeros",
        "Sparsity",
        "Pattern",
    ]
    assert "dense/kernel" in text and "8x16" in text
    assert "dense/bias (dense)" in text
    total = next(line for line in lines if line.startswith("Total pruned"))
    assert total.split()[2:] == ["176", "88", "50.00%"]


def test_summary_prints_with_print_by_default(capsys):
    kprune.report.summary(mlp())
    assert "Total" in capsys.readouterr().out


def test_report_rejects_non_models():
    with pytest.raises(ValueError, match="Keras model or layer"):
        kprune.report.sparsity_report("model.keras")


def test_report_on_a_nested_model_lists_inner_weights():
    inner = mlp()
    outer = keras.Sequential([keras.Input((8,)), inner, keras.layers.Dense(3)])
    pruned = trained(outer, pruning_schedule=every_step(0.5))
    report = kprune.report.sparsity_report(pruned)
    assert len(report["weights"]) == 6
    assert [r["pruned"] for r in report["weights"]] == [True, False] * 3
    assert report["pruned_total"]["sparsity"] == pytest.approx(0.5, abs=0.01)
