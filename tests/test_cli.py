"""The `kprune` command line."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import pytest
import tomllib

import kprune
from kprune.cli import main
from testing import classification_data
from testing import compile_classifier
from testing import mlp
from testing import requires_tensorflow

ROOT = pathlib.Path(__file__).resolve().parents[1]

CUSTOM_LAYERS = """
import keras


@keras.saving.register_keras_serializable(package="{module}")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {{**super().get_config(), "factor": self.factor}}


class Shift(keras.layers.Layer):
    def call(self, x):
        return x + 1.0
"""


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
    sparse = tmp_path / "sparse.tflite"
    argv = ["export-litert", str(model_file), str(sparse), "--sparse-format"]
    assert main(argv) == 0
    assert 0 < sparse.stat().st_size < out.stat().st_size


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


@pytest.mark.slow
def test_console_script_module_runs(model_file):
    result = subprocess.run(
        [sys.executable, "-m", "kprune.cli", "summary", str(model_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Total pruned" in result.stdout


def kprune_command(*args, cwd=None):
    """Runs the `kprune` console script's function in a fresh process."""
    module, function = entry_point().split(":")
    code = f"import sys, {module}; sys.exit({module}.{function}(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


def entry_point():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]["kprune"]


def error_lines(stderr):
    """The lines kprune wrote (TensorFlow logs its own start-up lines)."""
    return [line for line in stderr.splitlines() if line.startswith("kprune")]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["summary", "--help"], ["summary"], ["compres", "m.keras"]],
)
def test_help_and_argument_errors_import_neither_keras_nor_kprune(argv):
    module, function = entry_point().split(":")
    code = textwrap.dedent(
        f"""
        import sys
        import {module}
        try:
            {module}.{function}({argv!r})
        except SystemExit:
            pass
        heavy = ("keras", "tensorflow", "jax", "torch", "kprune")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert "usage: kprune" in result.stdout + result.stderr


def write_custom_layers(tmp_path):
    """A module file in `tmp_path` with a registered layer `Scale` and an
    unregistered one `Shift`, and a model file using each."""
    name = f"custom_layers_{tmp_path.name}"
    path = tmp_path / f"{name}.py"
    path.write_text(CUSTOM_LAYERS.format(module=name))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = {}
    for layer in (module.Scale(), module.Shift()):
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(8), layer]
        )
        files[type(layer).__name__] = tmp_path / f"{type(layer).__name__}.keras"
        model.save(files[type(layer).__name__])
    return path, files


@pytest.mark.slow
def test_custom_layer_error_is_one_line_and_import_loads_it(tmp_path):
    module_path, files = write_custom_layers(tmp_path)
    # A fresh process: the layer's module is not imported there.
    result = kprune_command("summary", files["Scale"], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith("kprune summary: error: the model uses the class")
    assert f"--import {module_path.stem}" in line
    for module in (module_path.stem, module_path):  # dotted name or file
        result = kprune_command(
            "summary", files["Scale"], "--import", module, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert "Total pruned" in result.stdout


def test_custom_objects_load_unregistered_layers(tmp_path, capsys):
    module_path, files = write_custom_layers(tmp_path)
    assert main(["summary", str(files["Shift"])]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert (
        "'Shift'" in line
        and f"--custom-objects {module_path.stem}:Shift" in (line)
    )
    argv = ["summary", str(files["Shift"]), "--custom-objects"]
    assert main([*argv, f"{module_path}:Shift"]) == 0
    assert "Total pruned" in capsys.readouterr().out
    assert main([*argv, f"{module_path}:Nope"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "has no attribute 'Nope'" in line


def test_a_module_that_cannot_be_imported_is_named(model_file, capsys):
    argv = ["summary", str(model_file), "--import", "no_such_module_here"]
    assert main(argv) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "Could not import 'no_such_module_here'" in line


def test_compress_compares_with_the_model_saved_without_optimizer(
    tmp_path, capsys
):
    x, y = classification_data(n=16, shape=(32,))
    model = compile_classifier(mlp(inputs=32, hidden=64))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    given = tmp_path / "trained.keras"
    model.save(given)  # with the Adam moments: about 3x the weights
    out = tmp_path / "model.h5"
    assert main(["compress", str(given), str(out)]) == 0
    printed = capsys.readouterr().out
    reference = tmp_path / "reference.keras"
    keras.saving.load_model(given, compile=False).save(reference)
    assert os.path.getsize(reference) < 0.6 * os.path.getsize(given)
    ratio = os.path.getsize(reference) / os.path.getsize(out)
    assert (
        f"{ratio:.1f}x smaller than the same model saved by Keras "
        "without optimizer state" in printed
    )
    assert f"{os.path.getsize(reference) / 1e6:.3f} MB as .keras" in printed
