"""Dense vs structured-pruned CPU latency: Keras and LiteRT (issue 13).

For each model (random weights, nothing downloaded): prunes it with
`kprune.structured.StructuredSparsity(ConstantSparsity(target))` through
one `fit` step on random data (learning rate 0, so the weights stay the
random initialization and only the masks are set), shrinks it with
`kprune.structured.shrink_model`, then times the dense (stripped, same
shapes as the original) and the shrunk model in interleaved rounds, the
order swapped every round: Keras `predict_on_batch` and the LiteRT
interpreter (`tf.lite.Interpreter`, or `ai_edge_litert` when installed) on
the `kprune.export.export_litert` file, at batch 1 and 32. A timing is the
median over the rounds of the mean of a few calls. Also records
parameters, `.keras` and `.tflite` file sizes, the largest output gap
between the shrunk and the masked model, and what `structured_plan` left
whole.

Keras also times both models with their BatchNormalization folded into
the convolution before it (`kprune.structured.fold_batchnorm`), the same
treatment for both, so each Keras row has the pruning speedup of plain
models (`speedup`), of folded models (`speedup_folded`, on which the
issue's bar is judged when present), the folded shrunk model against the
user's unmodified dense model (`speedup_folded_vs_dense`) and what
folding alone gives the dense model (`folding_gain_dense`). Models
without a BatchNormalization to fold skip the folded pair. LiteRT needs
no such pair: its converter folds them into both files already.

At the default target (50%) Keras also times, in the same rounds, the
architecture built narrow by its own library (`build_narrow`:
MobileNetV2 with `alpha=0.5`, BERT with half the heads and FFN units;
folded when the pair is): `speedup_narrow` is the dense model's time
(on the bar's basis) over its time, what half the width buys on this
runtime without any pruning. `--no-narrow` skips it.

Models: keras.applications ResNet50 and MobileNetV2 (96x96x3, 1000
classes) at 50% of channels, a keras-hub `BertBackbone` (4 layers, hidden
256, 4 heads, FFN 1024, sequence 128, vocabulary 1000) at 50% of its
attention heads and feed-forward units (`shrink_model` inlines each
`TransformerEncoder` as a plain functional graph), `gpt2` (the same
sizes in a keras-hub `GPT2Backbone`, not part of the default run: its
`TransformerDecoder` blocks keep their own call with smaller sublayers)
and `tiny`
(a small residual CNN, for smoke tests). Prints one JSON line per model,
runtime and batch, and appends them to `--out`.

Run: `nice python benchmarks/latency.py` (TensorFlow backend; about 6
minutes on 2 cores), `--quick` for a smoke run (32x32 inputs, sequence
32, fewer rounds), `--no-fold` to skip the folded pair, `--tf-threads 1`
to run TensorFlow's ops on one thread, `--jit-compile` to compile every
timed Keras model with XLA (each lever applies to all models alike),
`--summary` to print the markdown table of the latest full run in
`--out`.
"""

import argparse
import collections
import datetime
import json
import os
import platform
import re
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402

# The thresholds: dense / shrunk latency the pruned model must reach.
THRESHOLDS = {"resnet50": 1.8, "mobilenetv2": 1.5, "bert": 1.6}
TARGET = 0.5
BATCHES = (1, 32)
RUNTIMES = ("keras", "litert")


def _image_inputs(side):
    def make(batch, rng):
        return rng.uniform(0, 1, (batch, side, side, 3)).astype("float32")

    return make


def _text_inputs(length, vocabulary):
    def make(batch, rng):
        return {
            "token_ids": rng.integers(0, vocabulary, (batch, length)).astype(
                "int32"
            ),
            "segment_ids": np.zeros((batch, length), "int32"),
            "padding_mask": np.ones((batch, length), "int32"),
        }

    return make


def _causal_inputs(length, vocabulary):
    text = _text_inputs(length, vocabulary)

    def make(batch, rng):
        x = text(batch, rng)
        del x["segment_ids"]
        return x

    return make


# The keras-hub text models' sizes, but for their sequence length.
TEXT_SIZES = dict(
    vocabulary_size=1000,
    num_layers=4,
    num_heads=4,
    hidden_dim=256,
    intermediate_dim=1024,
)


def _image_side(quick, image_size):
    return image_size or (32 if quick else 96)


def _sequence_length(quick, sequence_length):
    return sequence_length or (32 if quick else 128)


def build(name, quick, image_size=None, sequence_length=None):
    """Returns (model, inputs(batch, rng)) for a model name."""
    side = _image_side(quick, image_size)
    if name == "resnet50":
        model = keras.applications.ResNet50(
            weights=None, input_shape=(side, side, 3)
        )
        return model, _image_inputs(side)
    if name == "mobilenetv2":
        model = keras.applications.MobileNetV2(
            weights=None, input_shape=(side, side, 3)
        )
        return model, _image_inputs(side)
    if name in ("bert", "gpt2"):
        import keras_hub

        length = _sequence_length(quick, sequence_length)
        backbone, inputs = {
            "bert": (keras_hub.models.BertBackbone, _text_inputs),
            "gpt2": (keras_hub.models.GPT2Backbone, _causal_inputs),
        }[name]
        model = backbone(**TEXT_SIZES, max_sequence_length=length)
        return model, inputs(length, TEXT_SIZES["vocabulary_size"])
    if name == "tiny":
        layers = keras.layers
        inputs = keras.Input((16, 16, 3))
        x = layers.Conv2D(16, 3, padding="same", name="c1")(inputs)
        x = layers.ReLU()(x)
        y = layers.Conv2D(16, 3, padding="same", name="c2")(x)
        y = layers.BatchNormalization(name="bn")(y)
        x = layers.Add()([x, y])
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(32, activation="relu", name="d1")(x)
        outputs = layers.Dense(10, name="out")(x)
        return keras.Model(inputs, outputs), _image_inputs(16)
    raise ValueError(
        "Argument `models` must name models in "
        f"{list(THRESHOLDS) + ['gpt2', 'tiny']}"
        f". Received: {name!r}"
    )


def build_narrow(name, quick, image_size=None, sequence_length=None):
    """The same architecture built narrow by its own library, or None.

    The reference for what half the width buys at all on this runtime,
    without pruning: keras.applications MobileNetV2 with `alpha=0.5`
    (Keras rounds its channels to multiples of 8 and keeps the last
    convolution at 1280 filters, so it has more parameters than the
    shrunk model) and a keras-hub `BertBackbone` with 2 heads and 512 FFN
    units (its heads keep `hidden_dim / num_heads` = 128 dimensions, twice
    the shrunk model's). ResNet50 has no width option.
    """
    if name == "mobilenetv2":
        side = _image_side(quick, image_size)
        return keras.applications.MobileNetV2(
            weights=None, input_shape=(side, side, 3), alpha=0.5
        )
    if name == "bert":
        import keras_hub

        sizes = dict(
            TEXT_SIZES,
            num_heads=TEXT_SIZES["num_heads"] // 2,
            intermediate_dim=TEXT_SIZES["intermediate_dim"] // 2,
        )
        return keras_hub.models.BertBackbone(
            **sizes,
            max_sequence_length=_sequence_length(quick, sequence_length),
        )
    return None


def prune_and_shrink(model, inputs, target, rng):
    """Prunes `model` as a user would and returns (pruned, shrunk)."""
    schedule = kprune.StructuredSparsity(
        kprune.ConstantSparsity(target, begin_step=0, frequency=1)
    )
    pruned = kprune.prune_low_magnitude(model, schedule)
    x = inputs(2, rng)
    outputs = pruned(x, training=False)
    if isinstance(outputs, dict):
        y = {k: np.zeros(v.shape, "float32") for k, v in outputs.items()}
        loss = {k: "mse" for k in outputs}
    else:
        y = np.zeros(outputs.shape, "float32")
        loss = "mse"
    # Learning rate 0: the step only sets the masks from the random weights.
    pruned.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    pruned.fit(
        x,
        y,
        batch_size=2,
        epochs=1,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    return pruned, kprune.structured.shrink_model(pruned)


def left_whole(pruned):
    """`structured_plan`, and the layers it leaves whole with its reasons."""
    plan = kprune.structured.structured_plan(pruned)
    whole = {name: why for name, why in plan.items() if why is not None}
    return plan, whole


def outputs_gap(a, b, x):
    """Largest absolute difference of two models' outputs on `x`."""

    def flat(outputs):
        if isinstance(outputs, dict):
            return [np.asarray(outputs[k]) for k in sorted(outputs)]
        return [np.asarray(outputs)]

    pairs = zip(flat(a.predict_on_batch(x)), flat(b.predict_on_batch(x)))
    return float(max(np.max(np.abs(p - q)) for p, q in pairs))


def keras_file_bytes(model):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        return os.path.getsize(path)


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter, "tf.lite.Interpreter"


class LiteRTRunner:
    """Calls a `.tflite` file at one batch size with named inputs."""

    def __init__(self, path, x, threads):
        interpreter_class, _ = _interpreter_class()
        self.interpreter = interpreter_class(
            model_path=path, num_threads=threads
        )
        details = self.interpreter.get_input_details()
        arrays = x if isinstance(x, dict) else {None: x}
        self.feeds = []
        for detail in details:
            key = self._match(detail["name"], arrays)
            self.interpreter.resize_tensor_input(
                detail["index"], arrays[key].shape
            )
            self.feeds.append((detail["index"], arrays[key]))
        self.interpreter.allocate_tensors()
        self.outputs = [
            d["index"] for d in self.interpreter.get_output_details()
        ]

    @staticmethod
    def _match(name, arrays):
        if len(arrays) == 1:
            return next(iter(arrays))
        for key in arrays:
            if key in name:
                return key
        raise ValueError(
            f"No input array for LiteRT input {name!r}; have {list(arrays)}"
        )

    def __call__(self):
        for index, array in self.feeds:
            self.interpreter.set_tensor(index, array)
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(i) for i in self.outputs]


def interleaved(calls, rounds, repeats, warmup=2):
    """Median over `rounds` of the mean seconds of `repeats` calls of each
    of `calls`, the order reversed every other round."""
    for call in calls:
        for _ in range(warmup):
            call()
    times = [[] for _ in calls]
    for r in range(rounds):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            start = time.perf_counter()
            for _ in range(repeats):
                calls[i]()
            times[i].append((time.perf_counter() - start) / repeats)
    return [statistics.median(t) for t in times]


def measure(name, args, run_id, machine):
    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    model, inputs = build(
        name, args.quick, args.image_size, args.sequence_length
    )
    pruned, shrunk = prune_and_shrink(model, inputs, args.target, rng)
    dense = kprune.strip_pruning(pruned)
    narrow = None
    if args.narrow and args.target == TARGET:
        narrow = build_narrow(
            name, args.quick, args.image_size, args.sequence_length
        )
        # As built, like the dense and shrunk counts (before any folding).
        narrow_parameters = narrow and narrow.count_params()
    folded = {}
    if args.fold:
        folded = {
            "dense": kprune.structured.fold_batchnorm(dense),
            "shrunk": kprune.structured.fold_batchnorm(shrunk),
        }
        count = _batch_norms(dense) - _batch_norms(folded["dense"])
        if not count:
            folded = {}
        elif narrow is not None:
            # Timed on the same basis as the bar: folded like the pair.
            narrow = kprune.structured.fold_batchnorm(narrow)
    prune_seconds = time.perf_counter() - start
    plan, whole = left_whole(pruned)
    sample = inputs(4, rng)
    common = {
        "run": run_id,
        **machine,
        "model": name,
        "target": args.target,
        "quick": args.quick,
        "image_size": args.image_size,
        "sequence_length": args.sequence_length,
        "threshold": THRESHOLDS.get(name),
        "parameters_dense": dense.count_params(),
        "parameters_shrunk": shrunk.count_params(),
        "parameters_ratio": round(
            shrunk.count_params() / dense.count_params(), 4
        ),
        "keras_bytes_dense": keras_file_bytes(dense),
        "keras_bytes_shrunk": keras_file_bytes(shrunk),
        "max_gap_shrunk_vs_masked": outputs_gap(shrunk, pruned, sample),
        "layers_shrunk": sum(why is None for why in plan.values()),
        "layers_left_whole": whole,
        "prune_and_shrink_seconds": round(prune_seconds, 1),
    }
    if narrow is not None:
        common["parameters_narrow"] = narrow_parameters
    if folded:
        common["batch_norms_folded"] = count
        common["max_gap_folded_vs_shrunk"] = outputs_gap(
            folded["shrunk"], shrunk, sample
        )
    tflite = {}
    directory = tempfile.mkdtemp(prefix="kprune_latency_")
    if "litert" in args.runtimes:
        for label, m in (("dense", dense), ("shrunk", shrunk)):
            path = os.path.join(directory, f"{name}_{label}.tflite")
            try:
                kprune.export.export_litert(m, path)
                tflite[label] = path
                common[f"tflite_bytes_{label}"] = os.path.getsize(path)
            except Exception as error:  # reported, not hidden
                common[f"litert_error_{label}"] = (
                    f"{type(error).__name__}: {str(error)[:300]}"
                )
    rows = []
    for runtime in args.runtimes:
        for batch in args.batches:
            x = inputs(batch, rng)
            rounds = args.rounds if batch == 1 else max(3, args.rounds // 2)
            repeats = args.repeats if batch == 1 else 1
            row = dict(common, runtime=runtime, batch=batch, rounds=rounds)
            row["repeats"] = repeats
            if runtime == "keras":
                timed = [dense, shrunk, *folded.values()]
                if narrow is not None:
                    timed.append(narrow)
                if args.jit_compile:
                    for m in timed:
                        m.compile(jit_compile=True)
                    row["jit_compile"] = True
                calls = [lambda m=m, x=x: m.predict_on_batch(x) for m in timed]
            elif len(tflite) == 2:
                try:
                    calls = [
                        LiteRTRunner(tflite[k], x, args.threads)
                        for k in ("dense", "shrunk")
                    ]
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
                    calls = None
                row["interpreter"] = _interpreter_class()[1]
                row["threads"] = args.threads
            else:
                row["error"] = "no LiteRT file (see litert_error_*)"
                calls = None
            if calls is not None:
                t_dense, t_shrunk, *t_folded = interleaved(
                    calls, rounds, repeats
                )
                t_narrow = None
                if runtime == "keras" and narrow is not None:
                    t_narrow = t_folded.pop()
                row["ms_dense"] = round(t_dense * 1e3, 3)
                row["ms_shrunk"] = round(t_shrunk * 1e3, 3)
                row["speedup"] = round(t_dense / t_shrunk, 3)
                bar_on = "speedup"
                if t_folded:
                    f_dense, f_shrunk = t_folded
                    row["ms_dense_folded"] = round(f_dense * 1e3, 3)
                    row["ms_shrunk_folded"] = round(f_shrunk * 1e3, 3)
                    row["speedup_folded"] = round(f_dense / f_shrunk, 3)
                    row["speedup_folded_vs_dense"] = round(
                        t_dense / f_shrunk, 3
                    )
                    row["folding_gain_dense"] = round(t_dense / f_dense, 3)
                    bar_on = "speedup_folded"
                if t_narrow is not None:
                    # Against the dense model of the bar's basis.
                    basis = t_folded[0] if t_folded else t_dense
                    row["ms_narrow"] = round(t_narrow * 1e3, 3)
                    row["speedup_narrow"] = round(basis / t_narrow, 3)
                if row["threshold"] is not None:
                    row["bar_on"] = bar_on
                    row["met"] = row[bar_on] >= row["threshold"]
            row["load_1min_now"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for path in tflite.values():
        os.remove(path)
    os.rmdir(directory)
    return rows


def _batch_norms(model):
    return sum(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in model.layers
    )


def _levers(row):
    """What a run changed for every model alike, as a label."""
    levers = []
    if row.get("tf_threads") is not None:
        levers.append(f"TF threads {row['tf_threads']}")
    if row.get("onednn") is False:
        levers.append("oneDNN off")
    if row.get("jit_compile"):
        levers.append("XLA")
    return f" ({', '.join(levers)})" if levers else ""


def _mb(n):
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _reasons(whole):
    """`layers_left_whole` grouped by sentence, layer names elided."""
    counts = collections.Counter(
        re.sub(r"'[^']*'", "…", why) for why in whole.values()
    )
    return "; ".join(f"{n}x: {why}" for why, n in counts.most_common())


def summary(path, quick=False):
    """The markdown tables of the latest run of each model in `path`."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["quick"] == quick]
    if not rows:
        return f"No {'quick' if quick else 'full'} run in {path}."
    latest, history = {}, {}
    for row in rows:
        latest[row["model"]] = row["run"]
        if "speedup" in row:
            key = (row["model"], row["runtime"], row["batch"])
            history.setdefault(key, []).append(f"{row['speedup']:.2f}x")
    rows = [r for r in rows if latest[r["model"]] == r["run"]]
    lines = [
        "| model | runtime | batch | dense ms | shrunk ms | speedup "
        "| both folded: dense ms | shrunk ms | speedup "
        "| folded shrunk vs unmodified dense "
        "| built narrow: speedup "
        "| issue's bar | plain speedup, every run, oldest first |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "speedup" in r:
            bar = "-"
            if r.get("threshold") is not None:
                verdict = "met" if r["met"] else "**not met**"
                on = " folded" if r.get("bar_on") == "speedup_folded" else ""
                bar = f">= {r['threshold']}x{on}: {verdict}"
            folded = "| - | - | - | - "
            if "speedup_folded" in r:
                folded = (
                    f"| {r['ms_dense_folded']:.2f} "
                    f"| {r['ms_shrunk_folded']:.2f} "
                    f"| {r['speedup_folded']:.2f}x "
                    f"| {r['speedup_folded_vs_dense']:.2f}x "
                )
            narrow = "-"
            if "speedup_narrow" in r:
                narrow = f"{r['speedup_narrow']:.2f}x"
            runs = history[r["model"], r["runtime"], r["batch"]]
            lines.append(
                f"| {r['model']}{_levers(r)} | {r['runtime']} | {r['batch']} "
                f"| {r['ms_dense']:.2f} | {r['ms_shrunk']:.2f} "
                f"| {r['speedup']:.2f}x {folded}| {narrow} | {bar} "
                f"| {', '.join(runs)} |"
            )
        else:
            lines.append(
                f"| {r['model']} | {r['runtime']} | {r['batch']} | - | - "
                f"| failed: {r.get('error', '?')} | - | - | - | - | - | - "
                "| - |"
            )
    lines += [
        "",
        "| model | parameters dense -> shrunk | `.keras` | `.tflite` "
        "| max gap vs masked | layers shrunk | pruned layers left whole |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        lines.append(
            f"| {r['model']} | {r['parameters_dense']:,} -> "
            f"{r['parameters_shrunk']:,} ({r['parameters_ratio']:.3f}x) "
            f"| {_mb(r['keras_bytes_dense'])} -> "
            f"{_mb(r['keras_bytes_shrunk'])} "
            f"| {_mb(r.get('tflite_bytes_dense'))} -> "
            f"{_mb(r.get('tflite_bytes_shrunk'))} "
            f"| {r['max_gap_shrunk_vs_masked']:.1e} | {r['layers_shrunk']} "
            f"| {len(r['layers_left_whole'])}: "
            f"{_reasons(r['layers_left_whole'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet50", "mobilenetv2", "bert"]
    )
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES))
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--target", type=float, default=TARGET)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="LiteRT threads"
    )
    parser.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="do not also time both models with BatchNormalization folded",
    )
    parser.add_argument(
        "--tf-threads",
        type=int,
        default=None,
        help="TensorFlow intra- and inter-op threads (default: TF's own)",
    )
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile the Keras models with XLA (`jit_compile=True`)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the applications models' images (default 96)",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=None,
        help="tokens per sequence of the text models (default 128)",
    )
    parser.add_argument(
        "--no-narrow",
        dest="narrow",
        action="store_false",
        help="do not also time the architecture built narrow by its own "
        "library (MobileNetV2 alpha=0.5, BERT with half the heads and FFN "
        "units), the reference for what half the width buys",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/latency.jsonl")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print the markdown table of the latest run in --out",
    )
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.out, args.quick))
        return
    if args.rounds is None:
        args.rounds = 5 if args.quick else 15
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if keras.backend.backend() != "tensorflow" and "litert" in args.runtimes:
        print("LiteRT needs the TensorFlow backend: timing Keras only.")
        args.runtimes = [r for r in args.runtimes if r != "litert"]
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    machine = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_1min_at_start": round(os.getloadavg()[0], 2),
        "date": run_id[:10],
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        machine["tensorflow"] = tf.__version__
        # Set before TensorFlow starts, it picks Eigen's kernels over oneDNN's.
        if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
            machine["onednn"] = os.environ["TF_ENABLE_ONEDNN_OPTS"] != "0"
        if args.tf_threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(
                args.tf_threads
            )
            tf.config.threading.set_inter_op_parallelism_threads(
                args.tf_threads
            )
            machine["tf_threads"] = args.tf_threads
    with open(args.out, "a") as f:
        for name in args.models:
            for row in measure(name, args, run_id, machine):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
