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
