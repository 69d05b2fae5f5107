import importlib.util
import json
import pathlib

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "latency.py"


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_latency_benchmark_shrinks_times_and_summarizes(latency, tmp_path):
    out = tmp_path / "latency.jsonl"
    latency.main(
        [
            "--quick",
            "--models",
            "tiny",
            "--runtimes",
            "keras",
            "--batches",
            "1",
            "--rounds",
            "1",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["parameters_shrunk"] < row["parameters_dense"]
    assert row["max_gap_shrunk_vs_masked"] < 1e-4
    assert row["ms_dense"] > 0 and row["ms_shrunk"] > 0
    # Its one BatchNormalization folds, in both timed models alike.
    assert row["batch_norms_folded"] == 1
    assert row["max_gap_folded_vs_shrunk"] < 1e-4
    assert row["ms_dense_folded"] > 0 and row["ms_shrunk_folded"] > 0
    # The output layer keeps its units, and the row says why.
    assert row["layers_left_whole"] == {"out": "its output is a model output"}
    table = latency.summary(str(out), quick=True)
    assert "| tiny | keras | 1 |" in table
    assert "No full run" in latency.summary(str(out), quick=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2", "bert"])
def test_narrow_reference_is_the_same_architecture_at_half_width(latency, name):
    pytest.importorskip("keras_hub")
    dense, inputs = latency.build(name, quick=True)
    narrow = latency.build_narrow(name, quick=True)
    assert type(narrow) is type(dense)
    assert narrow.count_params() < 0.75 * dense.count_params()
    x = inputs(2, np.random.default_rng(0))
    dense_out, narrow_out = (
        dense.predict_on_batch(x),
        narrow.predict_on_batch(x),
    )
    if isinstance(dense_out, dict):
        assert sorted(narrow_out) == sorted(dense_out)
        dense_out, narrow_out = (
            dense_out["sequence_output"],
            narrow_out["sequence_output"],
        )
    assert narrow_out.shape == dense_out.shape


def test_resnet50_has_no_narrow_reference(latency):
    assert latency.build_narrow("resnet50", quick=True) is None
