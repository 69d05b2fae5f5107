"""The `kprune` command line: sparsity summaries, compression and export.

```sh
kprune summary model.keras            # per-weight sparsity table
kprune summary model.keras --json     # the same data as JSON
kprune compress model.keras out.h5    # compact sparse file (--int8)
kprune export-litert model.keras out.tflite [--quantize dynamic_range]
kprune plot model.keras plots/        # sparsity bars and mask images
```

Models are read with `keras.saving.load_model` (`.keras`, or `.h5` saved
by Keras) or, for files written by `kprune.save_compact`, with
`kprune.load_compact`.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _is_compact(path):
    import h5py

    if not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        return "kprune_format" in f.attrs


def _load(path):
    import keras

    from kprune.compression import load_compact

    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: {path!r}")
    if _is_compact(path):
        return load_compact(path)
    return keras.saving.load_model(path, compile=False)


def _summary(args):
    from kprune.summary import sparsity_report
    from kprune.summary import summary

    model = _load(args.model)
    if args.json:
        print(json.dumps(sparsity_report(model), indent=2))
    else:
        summary(model)


def _megabytes(size):
    return f"{size / 1e6:.3f} MB"


def _compress(args):
    from kprune.compression import save_compact

    model = _load(args.model)
    save_compact(model, args.output, quantize="int8" if args.int8 else None)
    before = os.path.getsize(args.model)
    after = os.path.getsize(args.output)
    print(
        f"{args.model}: {_megabytes(before)} -> {args.output}: "
        f"{_megabytes(after)} ({before / after:.1f}x smaller)"
    )


def _export_litert(args):
    from kprune.export import export_litert

    export_litert(_load(args.model), args.output, quantize=args.quantize)
    print(f"{args.output}: {_megabytes(os.path.getsize(args.output))}")


def _plot(args):
    from kprune.plots import plot_mask
    from kprune.plots import plot_sparsity
    from kprune.summary import sparsity_report

    model = _load(args.model)
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


def _parser():
    parser = argparse.ArgumentParser(
        prog="kprune",
        description="Inspect, compress and export pruned Keras models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser(
        "summary", help="print the per-weight sparsity table"
    )
    command.add_argument("model", help=".keras, Keras .h5 or compact .h5")
    command.add_argument(
        "--json", action="store_true", help="print the data as JSON"
    )
    command.set_defaults(run=_summary)

    command = commands.add_parser(
        "compress", help="write kprune's compact sparse .h5 file"
    )
    command.add_argument("model", help=".keras or Keras .h5 model")
    command.add_argument("output", help="the compact .h5 file to write")
    command.add_argument(
        "--int8",
        action="store_true",
        help="store kernels as per-channel int8 (error <= scale / 2)",
    )
    command.set_defaults(run=_compress)

    command = commands.add_parser(
        "export-litert", help="write a sparse LiteRT .tflite file"
    )
    command.add_argument("model", help=".keras, Keras .h5 or compact .h5")
    command.add_argument("output", help="the .tflite file to write")
    command.add_argument("--quantize", choices=["dynamic_range"], default=None)
    command.set_defaults(run=_export_litert)

    command = commands.add_parser(
        "plot", help="write sparsity bars and mask images (matplotlib)"
    )
    command.add_argument("model", help=".keras, Keras .h5 or compact .h5")
    command.add_argument("output_dir", help="directory for the .png files")
    command.set_defaults(run=_plot)
    return parser


def main(argv=None) -> int:
    """Runs the `kprune` command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        print(f"kprune {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
