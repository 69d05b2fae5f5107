"""The `kprune` command line."""

import json
import subprocess
import sys

import keras
import pytest

import kprune
from kprune.cli import main
from testing import mlp
from testing import requires_tensorflow


@pytest.fixture
def model_file(tmp_path):
    model = mlp(inputs=32, hidden=64)
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    kernel[:, ::2] = 0.0
    model.layers[0].kernel.assign(kernel)
    path = tmp_path / "model.keras"
    model.save(path)
    return path


def test_summary_prints_the_table(model_file, capsys):
    assert main(["summary", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "dense/kernel" in out and "50.00%" in out


def test_summary_json_is_the_report(model_file, capsys):
    assert main(["summary", str(model_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = kprune.sparsity_report(keras.saving.load_model(model_file))
    assert report == json.loads(json.dumps(expected))


def test_compress_writes_a_compact_file_that_loads(model_file, tmp_path):
    out = tmp_path / "model.h5"
    assert main(["compress", str(model_file), str(out), "--int8"]) == 0
    original = keras.saving.load_model(model_file)
    loaded = kprune.load_compact(out)
    assert len(loaded.weights) == len(original.weights)
    assert main(["summary", str(out)]) == 0


def test_plot_writes_pngs(model_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plot", str(model_file), str(tmp_path / "plots")]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 3  # sparsity bars and two kernel masks
    assert all((tmp_path / "plots").joinpath(p).exists() for p in written)


@requires_tensorflow
def test_export_litert_writes_a_tflite_file(model_file, tmp_path):
    out = tmp_path / "model.tflite"
    assert main(["export-litert", str(model_file), str(out)]) == 0
    assert out.stat().st_size > 0


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    missing = tmp_path / "missing.keras"
    assert main(["summary", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kprune summary: error: No such file")
    text = tmp_path / "notes.h5"
    text.write_text("not a model")
    assert main(["compress", str(text), str(tmp_path / "out.h5")]) == 1
    assert "kprune compress: error:" in capsys.readouterr().err
    assert not (tmp_path / "out.h5").exists()


def test_console_script_module_runs(model_file):
    result = subprocess.run(
        [sys.executable, "-m", "kprune.cli", "summary", str(model_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Total pruned" in result.stdout
