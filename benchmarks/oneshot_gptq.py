"""SparseGPT 50% + GPTQ 4-bit (the SparseGPT paper's joint result) on the
Fashion-MNIST MLP of `oneshot_quality.py`, no fine-tuning.

For each seed: trains the MLP (784-512-256-10) dense for 3 epochs, then
from those weights evaluates on the 10,000 test images: dense; dense
quantized by `kprune.oneshot.quantize_gptq` (4 bits, groups of 128); 50%
SparseGPT; 50% SparseGPT then 4-bit GPTQ. Calibration: 512 training images
drawn with the seed, for both steps. Also records the fraction of the
pruned weights still exactly zero after quantizing (dequantized kernel).
Prints one JSON line per run and appends it to `--out`.

Run: `nice python benchmarks/oneshot_gptq.py`; `benchmarks/README.md` has
the table.
"""

import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from oneshot_quality import accuracy  # noqa: E402
from oneshot_quality import arguments_and_data  # noqa: E402
from oneshot_quality import build_model  # noqa: E402
from oneshot_quality import trained_model  # noqa: E402


def dequantized_kernels(model):
    """The `(out, in)` kernels the 4-bit GPTQ layers compute with, from
    their levels, scales, zero points and group indices."""
    kernels = []
    for layer in model.layers:
        levels = keras.quantizers.unpack_int4(
            layer.quantized_kernel, orig_len=layer.units, axis=0, dtype="uint8"
        )
        groups = keras.ops.convert_to_numpy(layer.g_idx).astype(int)
        scale = keras.ops.convert_to_numpy(layer.kernel_scale)[:, groups]
        zero = keras.ops.convert_to_numpy(layer.kernel_zero)[:, groups]
        levels = keras.ops.convert_to_numpy(levels).astype(np.float32)
        kernels.append(((levels - zero) * scale).T)
    return kernels


def main():
    args, name, (x_train, y_train), (x_test, y_test) = arguments_and_data(
        __doc__, "oneshot_gptq.jsonl"
    )
    config = keras.quantizers.GPTQConfig(
        None, None, weight_bits=4, group_size=128
    )
    for seed in args.seeds:
        dense = trained_model(seed, x_train, y_train, args.epochs)
        weights = dense.get_weights()
        rng = np.random.default_rng(seed)
        calibration = x_train[
            rng.choice(len(x_train), args.calibration, replace=False)
        ]
        for run in ("dense", "gptq4", "sparsegpt50", "sparsegpt50+gptq4"):
            model = build_model()
            model.set_weights(weights)
            start = time.perf_counter()
            zeros = None
            if run.startswith("sparsegpt50"):
                kprune.oneshot.oneshot(model, calibration, verbose=0)
                zeros = [
                    keras.ops.convert_to_numpy(layer.kernel) == 0
                    for layer in model.layers
                ]
            if run.endswith("gptq4"):
                kprune.oneshot.quantize_gptq(
                    model, calibration, config, verbose=0
                )
            seconds = time.perf_counter() - start
            record = {
                "dataset": name,
                "backend": keras.backend.backend(),
                "seed": seed,
                "run": run,
                "test_accuracy": round(accuracy(model, x_test, y_test), 4),
                "seconds": round(seconds, 3),
            }
            if zeros is not None and run.endswith("gptq4"):
                kept = [
                    float(np.mean(kernel[zero] == 0))
                    for kernel, zero in zip(dequantized_kernels(model), zeros)
                ]
                record["pruned_still_zero"] = min(kept)
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
