import importlib.util
import json
import pathlib

import pytest

SCRIPT = (
    pathlib.Path(__file__).parents[1] / "benchmarks" / "equal_size_accuracy.py"
)


@pytest.fixture(scope="module")
def equal_size():
    spec = importlib.util.spec_from_file_location("equal_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_equal_size_benchmark_matches_parameter_counts(equal_size, tmp_path):
    out = tmp_path / "equal_size.jsonl"
    equal_size.main(["--quick", "--out", str(out)])
    rows = {r["arm"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"structured", "unstructured", "small dense"}
    assert "layer_sparsity" in rows["unstructured"]
    structured = rows["structured"]
    target = structured["parameters"]
    assert target < structured["parameters_dense"]
    assert structured["nonzero_parameters"] == target
    # Same size as the shrunk model, counted in nonzeros.
    unstructured = rows["unstructured"]
    assert unstructured["parameters"] == structured["parameters_dense"]
    assert abs(unstructured["nonzero_parameters"] - target) <= 2
    # The narrower dense model is the alpha closest to the shrunk size.
    small = rows["small dense"]
    assert small["alpha"] < structured["alpha_dense"]
    for neighbour in (small["alpha"] - 0.01, small["alpha"] + 0.01):
        count = equal_size.build_model(round(neighbour, 2)).count_params()
        assert abs(count - target) >= abs(small["parameters"] - target)
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["epochs"] == 2 and row["test_samples"] == 1000
    table = equal_size.summary(str(out), quick=True)
    assert "| structured 50%, shrunk | " in table
    assert f"alpha {small['alpha']}" in table
    assert "No full run" in equal_size.summary(str(out), quick=False)


def test_uniform_sparsity_matches_kprune_kept_counts(equal_size):
    from kprune import masking

    sizes = [432, 288, 64, 1536, 12800, 143360, 7]
    for sparsity in (0.0, 0.3, 0.7624, 0.999):
        for size in sizes:
            assert equal_size.kept_count(size, sparsity) == int(
                masking.kept_count(size, sparsity)
            )
    for kept in (len(sizes), 1000, 40000, sum(sizes) - 3, sum(sizes)):
        sparsity, total = equal_size.uniform_sparsity(sizes, kept)
        assert total == sum(equal_size.kept_count(n, sparsity) for n in sizes)
        # Every layer moves by at most one weight per step of `s`.
        assert abs(total - kept) <= len(sizes)


@pytest.mark.slow
def test_equal_size_benchmark_uniform_arm(equal_size, tmp_path):
    out = tmp_path / "equal_size.jsonl"
    target = 200_000
    equal_size.main(
        [
            "--quick",
            "--arms",
            "unstructured",
            "unstructured-uniform",
            "--target-parameters",
            str(target),
            "--out",
            str(out),
        ]
    )
    rows = {r["arm"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"unstructured", "unstructured-uniform"}
    for row in rows.values():
        assert abs(row["nonzero_parameters"] - target) <= 2
        layers = row["layer_sparsity"]
        assert layers["min"][1] <= layers["max"][1]
        by_type = layers["by_type"]
        assert sum(t["layers"] for t in by_type.values()) == 53
    uniform = rows["unstructured-uniform"]["layer_sparsity"]
    # The same target in every layer: rounding apart, one sparsity.
    assert uniform["max"][1] - uniform["min"][1] < 0.01
    table = equal_size.summary(str(out), quick=True)
    assert "same sparsity per layer" in table
