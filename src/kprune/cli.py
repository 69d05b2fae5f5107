"""The commands of the `kprune` command line.

Arguments are parsed (and `--help` answered) by the top-level module
`kprune_cli`, which imports this module only to run a command: see its
docstring for the commands.

Models are read with `keras.saving.load_model` (`.keras`, or `.h5` saved
by Keras) or, for files written by `kprune.compression.save_compact`, with
`kprune.compression.load_compact`, after importing the modules given with
`--import` and inside a `keras.saving.custom_object_scope` of the objects
given with `--custom-objects`.
"""

import importlib
import importlib.util
import json
import os
import sys
import tempfile

from kprune_cli import main  # noqa: F401  (`python -m kprune.cli`)


def _import_module(spec):
    """Imports a dotted module name or a `.py` file; returns the module."""
    try:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            if not os.path.isfile(spec):
                raise FileNotFoundError(f"No such file: {spec!r}")
            name = os.path.splitext(os.path.basename(spec))[0]
            known = sys.modules.get(name)
            if known is not None and os.path.samefile(
                getattr(known, "__file__", None) or os.devnull, spec
            ):
                return known
            loader_spec = importlib.util.spec_from_file_location(name, spec)
            module = importlib.util.module_from_spec(loader_spec)
            if known is None:
                # As `import` does, so that the module can import itself
                # by name (never hiding a module of that name).
                sys.modules[name] = module
            loader_spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:
            # Like `python -m`: modules next to the user are found.
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(spec)
    except Exception as error:
        raise ImportError(
            f"Could not import {spec!r}: {type(error).__name__}: {error}. "
            "Give a module importable from the current directory (my_layers, "
            "package.layers) or the path of a .py file."
        ) from error


def _custom_objects(specs):
    objects = {}
    for spec in specs:
        module_name, _, name = spec.rpartition(":")
        if not module_name or not name:
            raise ValueError(
                "Argument `--custom-objects` must be MODULE:NAME. "
                f"Received: {spec!r}"
            )
        module = _import_module(module_name)
        if not hasattr(module, name):
            raise ValueError(
                f"Module {module_name!r} has no attribute {name!r} "
                f"(given with --custom-objects {spec})."
            )
        objects[name] = getattr(module, name)
    return objects


def _is_compact(path):
    import h5py

    if not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        return "kprune_format" in f.attrs


def _load(args):
    import keras

    from kprune.compression import load_compact

    path = args.model
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: {path!r}")
    for spec in args.imports:
        _import_module(spec)
    with keras.saving.custom_object_scope(_custom_objects(args.custom_objects)):
        if _is_compact(path):
            return load_compact(path)
        return keras.saving.load_model(path, compile=False)


def _summary(args):
    from kprune.report import sparsity_report
    from kprune.report import summary

    model = _load(args)
    if args.json:
        print(json.dumps(sparsity_report(model), indent=2))
    else:
        summary(model)


def _megabytes(size):
    return f"{size / 1e6:.3f} MB"


def _keras_file_size(model):
    """Bytes of `model` saved by Keras as `.keras`: weights and config."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        return os.path.getsize(path)


def _compress(args):
    from kprune.compression import _plain_model
    from kprune.compression import save_compact

    # Loaded without compiling: no optimizer state to save.
    model = _plain_model(_load(args))
    save_compact(model, args.output, quantize="int8" if args.int8 else None)
    reference = _keras_file_size(model)
    after = os.path.getsize(args.output)
    print(
        f"{args.output}: {_megabytes(after)}, {reference / after:.1f}x "
        f"smaller than the same model saved by Keras without optimizer "
        f"state ({_megabytes(reference)} as .keras; {args.model} as given: "
        f"{_megabytes(os.path.getsize(args.model))})"
    )


def _export_litert(args):
    from kprune.export import export_litert

    export_litert(
        _load(args),
        args.output,
        quantize=args.quantize,
        sparse_format=args.sparse_format,
    )
    print(f"{args.output}: {_megabytes(os.path.getsize(args.output))}")


def _plot(args):
    from kprune.plots import plot_mask
    from kprune.plots import plot_sparsity
    from kprune.report import sparsity_report

    model = _load(args)
    os.makedirs(args.output_dir, exist_ok=True)
    written = [os.path.join(args.output_dir, "sparsity.png")]
    plot_sparsity(model, written[0])
    report = sparsity_report(model)
    pruned = {r["weight"] for r in report["weights"] if r["pruned"]}
    for weight in model.weights:
        if weight.path in pruned:
            name = weight.path.replace("/", "_") + "_mask.png"
            written.append(os.path.join(args.output_dir, name))
            plot_mask(weight, written[-1])
    print("\n".join(written))


_COMMANDS = {
    "summary": _summary,
    "compress": _compress,
    "export-litert": _export_litert,
    "plot": _plot,
}


def run(args):
    """Runs the command `args.command` with the parsed `args`."""
    _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
