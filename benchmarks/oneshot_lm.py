"""One-shot pruning of a small GPT-2 language model: held-out perplexity.

For each seed: trains a byte-level keras-hub `GPT2CausalLM` (2 blocks,
hidden 128, 4 heads, FFN 512, context 128; built from a config, no
download) on the Python standard library's top-level modules (the text
every machine with Python has; every tenth file is held out), then prunes
every Dense and EinsumDense kernel of its blocks with
`kprune.oneshot.oneshot` by magnitude, Wanda and SparseGPT at 50%
unstructured and 2:4, calibrated on 64 training sequences, with no
training afterwards. The tied embedding and output projection stay dense.
Prints one JSON line per run (held-out perplexity per byte, one-shot
seconds, and how many times the one-shot call ran the model from its
input and ran a transformer block, per calibration batch, a run stopped
early counted as one) and appends it to `--out`.

Run: `OPENBLAS_NUM_THREADS=1 nice python benchmarks/oneshot_lm.py`
(about 8 minutes per seed on 2 cores); `benchmarks/README.md` has the
table. `--layers 8 --steps 100` times a deeper model (its perplexity is
not comparable).
"""

import argparse
import glob
import json
import math
import os
import pathlib
import sysconfig
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from oneshot_quality import pruned_copies  # noqa: E402

CONTEXT = 128
# Calls since the model was built (not those building it): of the
# backbone (a forward pass from the model's input) and of any transformer
# block.
CALLS = {"model": 0, "block": 0}


def corpus():
    """(train bytes, held-out bytes) of the standard library's modules."""
    files = sorted(
        glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))
    )
    train, held_out = [], []
    for index, path in enumerate(files):
        with open(path, "rb") as f:
            (held_out if index % 10 == 0 else train).append(f.read())
    return b"".join(train), b"".join(held_out)


def windows(data, count, rng):
    """`count` random windows of `CONTEXT + 1` bytes."""
    tokens = np.frombuffer(data, np.uint8).astype("int32")
    starts = rng.integers(0, len(tokens) - CONTEXT - 1, size=count)
    return np.stack([tokens[s : s + CONTEXT + 1] for s in starts])


def inputs(sequences):
    return {
        "token_ids": sequences[:, :-1],
        "padding_mask": np.ones_like(sequences[:, :-1]),
    }


def counted(layer, key):
    """Counts the calls of `layer` in `CALLS[key]`."""
    original = layer.call

    def call(*args, **kwargs):
        CALLS[key] += 1
        return original(*args, **kwargs)

    layer.call = call


def build_model(layers=2):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=256,
        num_layers=layers,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=512,
        max_sequence_length=CONTEXT,
        dropout=0.0,
    )
    counted(backbone, "model")
    for block in backbone.transformer_layers:
        counted(block, "block")
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    CALLS.update(model=0, block=0)
    return model


def perplexity(model, sequences):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    logits = model.predict(inputs(sequences), batch_size=64, verbose=0)
    return math.exp(float(loss(sequences[:, 1:], logits)))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--out",
        default=str(pathlib.Path(__file__).with_name("oneshot_lm.jsonl")),
    )
    args = parser.parse_args()
    train_text, held_out_text = corpus()
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        train = windows(train_text, args.steps * args.batch, rng)
        test = windows(held_out_text, args.held_out, np.random.default_rng(99))
        calibration = inputs(windows(train_text, args.calibration, rng))
        dense = build_model(args.layers)
        dense.compile(
            optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        start = time.perf_counter()
        dense.fit(inputs(train), train[:, 1:], batch_size=args.batch, verbose=0)
        train_seconds = time.perf_counter() - start
        weights = dense.get_weights()
        pruned_size = sum(
            int(np.prod(w.shape))
            for w in dense.backbone.weights
            if w.name == "kernel"
        )
        runs = [("dense", "0")] + [
            (m, t)
            for t in ("0.5", "2:4")
            for m in ("magnitude", "wanda", "sparsegpt")
        ]
        # Batches of `oneshot`'s default `batch_size`, 32.
        batches = math.ceil(args.calibration / 32)
        for method, target, model, seconds in pruned_copies(
            lambda: build_model(args.layers), weights, calibration, runs
        ):
            # Counted before `perplexity` traces the model.
            passes = {
                "model_passes_per_batch": CALLS["model"] / batches,
                "block_runs_per_batch": CALLS["block"] / batches,
            }
            record = {
                "backend": keras.backend.backend(),
                "seed": seed,
                "method": method,
                "target": target,
                "perplexity": round(perplexity(model, test), 4),
                "oneshot_seconds": round(seconds, 3),
                "seconds_per_million_weights": round(
                    seconds / pruned_size * 1e6, 3
                ),
                "pruned_weights": pruned_size,
                "layers": args.layers,
                **passes,
                "train_steps": args.steps,
                "train_seconds": round(train_seconds, 1),
            }
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
