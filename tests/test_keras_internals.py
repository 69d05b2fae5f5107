"""Private Keras API is used in `kprune._keras_internals` only."""

import ast
import pathlib
import warnings

import keras

import kprune

SOURCES = pathlib.Path(kprune.__file__).parent
INTERNALS = "_keras_internals.py"


def keras_private_names():
    """The private attributes of Keras's classes and of live Keras objects
    (the model, layer, variable and optimizer kprune works with)."""
    inputs = keras.Input((2,))
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(inputs))
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns about `input_shape`
        legacy = keras.layers.Dense(2, input_shape=(2,))
    sequential = keras.Sequential([legacy])
    objects = [
        keras.layers.Layer,
        keras.layers.Wrapper,
        keras.layers.InputLayer,
        keras.Model,
        keras.Sequential,
        keras.Function,
        keras.Operation,
        keras.Variable,
        keras.KerasTensor,
        keras.optimizers.Optimizer,
        keras.callbacks.Callback,
        model,
        sequential,
        dense,
        legacy,
        dense.kernel,
        model.optimizer,
        inputs,
    ]
    names = {name for obj in objects for name in dir(obj)}
    names = {n for n in names if n.startswith("_") and not n.endswith("__")}
    # Set by `Layer.__init__`, undocumented, and public only by its name.
    return names | {"call_signature_parameters"}


PRIVATE = keras_private_names()


def private_uses(source):
    """`(line, what)` for each use of private Keras API in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            found.append((node.lineno, f".{node.attr}"))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "hasattr", "setattr"):
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and name.value in PRIVATE:
                    found.append((node.lineno, f"{node.func.id} {name.value}"))
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "__setattr__"
            and isinstance(node.value, ast.Name)
            and node.value.id == "object"
        ):
            found.append((node.lineno, "object.__setattr__"))
    return sorted(found)


def keras_src_imports(source):
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        found += [
            (node.lineno, m)
            for m in modules
            if m == "keras.src" or m.startswith("keras.src.")
        ]
    return sorted(found)


def test_the_scan_finds_private_keras_api():
    source = (
        "from keras.src.models import Functional\n"
        "layers = model._flatten_layers()\n"
        "hasattr(model, '_nodes_by_depth')\n"
        "object.__setattr__(layer, 'x', 1)\n"
        "layer.call_signature_parameters = []\n"
        "model.layers\n"
        "self._step_driven = True\n"
    )
    assert private_uses(source) == [
        (2, "._flatten_layers"),
        (3, "hasattr _nodes_by_depth"),
        (4, "object.__setattr__"),
        (5, ".call_signature_parameters"),
    ]
    assert keras_src_imports(source) == [(1, "keras.src.models")]


def modules():
    return {p.name: p.read_text() for p in sorted(SOURCES.glob("*.py"))}


def test_private_keras_api_is_used_only_in_the_internals_module():
    found = {
        name: private_uses(source)
        for name, source in modules().items()
        if name != INTERNALS and private_uses(source)
    }
    assert found == {}, (
        f"Private Keras API used outside kprune/{INTERNALS}; move it there, "
        "saying why no public API serves."
    )


def test_no_module_imports_keras_src():
    found = {
        name: keras_src_imports(source)
        for name, source in modules().items()
        if keras_src_imports(source)
    }
    assert found == {}


def test_the_internals_module_uses_only_what_keras_has():
    # Fails when Keras renames or drops one of the private attributes the
    # internals module relies on: that module is then the one to fix.
    used = {
        node.attr
        for node in ast.walk(ast.parse((SOURCES / INTERNALS).read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_")
    } | {
        node.value
        for node in ast.walk(ast.parse((SOURCES / INTERNALS).read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("_")
    }
    used -= {"__setattr__", "__setitem__"}
    assert used, "the scan found nothing: it is broken"
    assert sorted(used - PRIVATE) == []
