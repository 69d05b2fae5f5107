"""The `kprune` command line: sparsity summaries, compression and export.

```sh
kprune summary model.keras            # per-weight sparsity table
kprune summary model.keras --json     # the same data as JSON
kprune compress model.keras out.h5    # compact sparse file (--int8)
kprune export-litert model.keras out.tflite [--quantize dynamic_range]
kprune plot model.keras plots/        # sparsity bars and mask images
kprune summary model.keras --import my_layers.py   # custom layers
```

This module parses the arguments and reports errors; it lives outside the
`kprune` package because importing `kprune` imports Keras (and through it
TensorFlow), which takes seconds: `kprune --help` and argument errors
import neither. The commands themselves are in `kprune.cli`.
"""

import argparse
import os
import re
import sys

# Keras and TensorFlow are imported after this, by the commands only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Longer error messages (Keras's can hold a whole model config) are cut.
_MAX_MESSAGE = 400


def _parser():
    parser = argparse.ArgumentParser(
        prog="kprune",
        description="Inspect, compress and export pruned Keras models.",
    )
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help=(
            "import MODULE (a dotted name, found from the current "
            "directory, or a .py file) before loading the model, so that "
            "the custom classes it registers with "
            "@keras.saving.register_keras_serializable are known; "
            "repeatable"
        ),
    )
    loading.add_argument(
        "--custom-objects",
        dest="custom_objects",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help=(
            "pass NAME from MODULE to Keras as a custom object while "
            "loading (for classes and functions that are not registered); "
            "repeatable"
        ),
    )
    loading.add_argument(
        "--traceback",
        action="store_true",
        help="on errors, print the full Python traceback",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser(
        "summary", parents=[loading], help="print the per-weight sparsity table"
    )
    command.add_argument("model", help=".keras, Keras .h5 or compact .h5")
    command.add_argument(
        "--json", action="store_true", help="print the data as JSON"
    )

    command = commands.add_parser(
        "compress",
        parents=[loading],
        help="write kprune's compact sparse .h5 file",
    )
    command.add_argument("model", help=".keras or Keras .h5 model")
    command.add_argument("output", help="the compact .h5 file to write")
    command.add_argument(
        "--int8",
        action="store_true",
        help="store kernels as per-channel int8 (error <= scale / 2)",
    )

    command = commands.add_parser(
        "export-litert",
        parents=[loading],
        help="write a LiteRT .tflite file",
    )
    command.add_argument("model", help=".keras, Keras .h5 or compact .h5")
    command.add_argument("output", help="the .tflite file to write")
    command.add_argument("--quantize", choices=["dynamic_range"], default=None)
    command.add_argument(
        "--sparse-format",
        action="store_true",
        help=(
            "store sparse weights in TFLite's sparse tensor format (smaller "
            "unzipped, larger zipped)"
        ),
    )

    command = commands.add_parser(
        "plot",
        parents=[loading],
        help="write sparsity bars and mask images (matplotlib)",
    )
    command.add_argument("model", help=".keras, Keras .h5 or compact .h5")
    command.add_argument("output_dir", help="directory for the .png files")
    return parser


def _unknown_object(error):
    """`(kind, name, module)` if Keras could not find a custom object."""
    while error is not None:
        text = " ".join(str(error).split())
        found = re.search(r"Could not locate (class|function) '([^']+)'", text)
        if found:
            module = re.search(
                r"Full object config: \{'module': '([^']+)'",
                text[found.end() :],
            )
            return (*found.groups(), module and module.group(1))
        error = error.__cause__ or error.__context__
    return None


def _one_line(error):
    """What the user reads: one line, with advice for errors we know."""
    unknown = _unknown_object(error)
    if unknown:
        kind, name, module = unknown
        module = module or "MODULE"
        return (
            f"the model uses the {kind} {name!r}, which is not known here. "
            f"Import the module that defines it: --import {module} (a "
            "dotted name or a .py file; it must register the "
            f"{kind} with @keras.saving.register_keras_serializable), or "
            f"--custom-objects {module}:{name}"
        )
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (OSError, ValueError, ImportError, RuntimeError)):
        message = text
    else:
        message = f"{type(error).__name__}: {text}"
    if len(message) > _MAX_MESSAGE:
        message = (
            message[: _MAX_MESSAGE - 3].rstrip()
            + "... (add --traceback for the whole error)"
        )
    return message


def main(argv=None) -> int:
    """Runs the `kprune` command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        from kprune.cli import run

        run(args)
    except Exception as error:
        if args.traceback:
            raise
        print(
            f"kprune {args.command}: error: {_one_line(error)}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
