"""LiteRT (TensorFlow Lite) export of pruned models."""

import os

import keras

from kprune.api_export import kprune_export
from kprune.compression import _plain_model

LITERT_QUANTIZE_OPTIONS = (None, "dynamic_range")


@kprune_export("kprune.export")
def export_litert(
    model,
    filepath,
    quantize: str | None = None,
    sparse_format: bool = False,
    **kwargs,
) -> None:
    """Exports a pruned model to a LiteRT (`.tflite`) file.

    Runs `model.export(filepath, format="litert")`, as the tfmot tutorials
    run `tf.lite.TFLiteConverter`: pruned weights are stored as zeros in
    dense arrays, which zipping (as apps and downloads ship files) shrinks
    to about the nonzero values plus their positions, and which the default
    XNNPACK delegate runs. Pruned models (with `PruneLowMagnitude`
    wrappers) are stripped first.

    With `sparse_format=True`, the converter's
    `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` optimization stores sparse
    constant weights in TFLite's sparse tensor format instead (nonzero
    values plus 8- or 16-bit column indices): a float file is about 3x
    smaller unzipped at 80% sparsity and 6x at 90%, but the indices zip
    worse than zeros, so zipped it is up to 35% larger with dynamic
    range quantization and within 10% either way in float32; and the
    runtime densifies the weights when it loads the model (a `DENSIFY`
    op), so inference is no faster. With TensorFlow 2.21, a file both
    sparse and dynamic-range quantized fails to prepare under the default
    XNNPACK delegate; run it with `experimental_op_resolver_type=
    tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`
    (see docs/export.md).

    Needs the TensorFlow backend. The file runs in the LiteRT interpreter
    (`ai_edge_litert.interpreter.Interpreter`, or `tf.lite.Interpreter`).

    Args:
        model: A Keras model, pruned or stripped.
        filepath: Path of the file to write; must end with `.tflite`.
        quantize: `None` to keep float32 weights, or `"dynamic_range"` to
            also quantize weights to int8 (`tf.lite.Optimize.DEFAULT`
            without a representative dataset: activations stay float).
        sparse_format: Whether to store sparse weights in TFLite's sparse
            tensor format (smaller unzipped, larger zipped; see above).
        **kwargs: Other LiteRT converter settings, passed to
            `model.export` (for example `representative_dataset`).
            `optimizations` is set by this function.

    Raises:
        ValueError: If `model` is not a Keras model, `filepath` does not end
            with `.tflite`, `quantize` is not one of the options,
            `sparse_format` is not a bool, or `optimizations` is passed.
        RuntimeError: If the Keras backend is not TensorFlow.

    Example:

    ```python
    kprune.export.export_litert(pruned_model, "model.tflite")
    kprune.export.export_litert(
        pruned_model, "model_int8.tflite", quantize="dynamic_range"
    )
    ```
    """
    if quantize not in LITERT_QUANTIZE_OPTIONS:
        raise ValueError(
            'Argument `quantize` must be None or "dynamic_range". '
            f"Received: quantize={quantize!r}"
        )
    if not isinstance(sparse_format, bool):
        raise ValueError(
            "Argument `sparse_format` must be True or False. "
            f"Received: sparse_format={sparse_format!r}"
        )
    filepath = os.fspath(filepath)
    if not filepath.endswith(".tflite"):
        raise ValueError(
            "Argument `filepath` must end with `.tflite`. "
            f"Received: filepath={filepath!r}"
        )
    if "optimizations" in kwargs:
        raise ValueError(
            "Argument `optimizations` is set by "
            "`kprune.export.export_litert`; use "
            "`quantize` and `sparse_format` to choose them. Received: "
            f"optimizations={kwargs['optimizations']!r}"
        )
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "`kprune.export.export_litert` needs the TensorFlow backend (it "
            "uses "
            "the TensorFlow Lite converter). "
            f"Received backend: {keras.backend.backend()!r}. Set "
            "KERAS_BACKEND=tensorflow, or save the weights with "
            "`kprune.compression.save_compact` instead."
        )
    import tensorflow as tf

    model = _plain_model(model)
    optimizations = []
    if sparse_format:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    if quantize == "dynamic_range":
        optimizations.append(tf.lite.Optimize.DEFAULT)
    model.export(
        filepath,
        format="litert",
        verbose=False,
        optimizations=optimizations,
        **kwargs,
    )
