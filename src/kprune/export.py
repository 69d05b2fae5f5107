"""Export of pruned models: LiteRT files, and 2:4 kernels for NVIDIA GPUs."""

import os

import keras
import numpy as np

from kprune import _keras_internals
from kprune import registry
from kprune.api_export import kprune_export
from kprune.compression import _plain_model
from kprune.wrapper import collect_pruned_layers
from kprune.wrapper import require_model

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
    op), so inference is no faster, except in one case: the `DENSIFY` ops
    are what makes XNNPACK try its sparse inference, which runs a
    convolutional network that follows its rules (see
    `kprune.PruneForLatencyOnXNNPack`) faster on ARM CPUs. For that path
    the file also keeps explicit padding: the converter folds
    `ZeroPadding2D` + `padding="valid"` into strided "SAME" padding where
    they compute the same, which XNNPACK runs dense, so this function
    turns each such convolution back into a `PAD` and a "VALID"
    convolution (same outputs). Check the file with
    `kprune.export.xnnpack_sparse_problems`. With TensorFlow 2.21, a file both
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
            tensor format (smaller unzipped, larger zipped, and needed by
            XNNPACK's sparse inference; see above).
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
    if sparse_format:
        _unfold_symmetric_padding(filepath)


def _unfold_symmetric_padding(filepath):
    """Turns strided "SAME" convolutions back into a `PAD` and a "VALID"
    convolution where the padding is the same on each side.

    The converter folds `ZeroPadding2D` + `padding="valid"` into "SAME"
    padding wherever they compute the same (odd input sizes at stride 2),
    but XNNPACK keeps strided "SAME" padding implicit, which its sparse
    inference refuses, while it folds an explicit zero `PAD` into the
    convolution as padding on each side, which it accepts. The outputs
    are identical.
    """
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    with open(filepath, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    graph = model.subgraphs[0]
    ops = schema.BuiltinOperator
    code_of = {
        i: max(c.builtinCode, c.deprecatedBuiltinCode)
        for i, c in enumerate(model.operatorCodes)
    }
    pad_code = None
    operators, changed = [], False
    for op in graph.operators:
        padding = None
        if code_of[op.opcodeIndex] in (ops.CONV_2D, ops.DEPTHWISE_CONV_2D):
            padding = _symmetric_same_padding(graph, op, schema)
        if padding is None:
            operators.append(op)
            continue
        if not np.any(padding):  # "SAME" pads nothing here: "VALID"
            op.builtinOptions.padding = schema.Padding.VALID
            operators.append(op)
            changed = True
            continue
        if pad_code is None:
            pad_code = next(
                (i for i, c in code_of.items() if c == ops.PAD), None
            )
            if pad_code is None:
                code = schema.OperatorCodeT()
                code.builtinCode = code.deprecatedBuiltinCode = ops.PAD
                code.version = 1
                model.operatorCodes.append(code)
                pad_code = len(model.operatorCodes) - 1
        source = graph.tensors[op.inputs[0]]
        amounts = schema.BufferT()
        amounts.data = np.array(
            [[0, 0], padding[0], padding[1], [0, 0]], "int32"
        ).tobytes()
        model.buffers.append(amounts)
        paddings = schema.TensorT()
        paddings.shape = np.array([4, 2], "int32")
        paddings.type = schema.TensorType.INT32
        paddings.buffer = len(model.buffers) - 1
        paddings.name = source.name + b"/xnnpack_paddings"
        padded = schema.TensorT()
        grow = np.array([0, sum(padding[0]), sum(padding[1]), 0], "int32")
        padded.shape = np.asarray(source.shape, "int32") + grow
        if source.shapeSignature is not None:
            signature = np.asarray(source.shapeSignature, "int32")
            padded.shapeSignature = np.where(
                signature < 0, -1, signature + grow
            )
        padded.type = source.type
        padded.buffer = 0  # the empty buffer, as for any activation
        padded.name = source.name + b"/xnnpack_pad"
        graph.tensors.extend([paddings, padded])
        pad = schema.OperatorT()
        pad.opcodeIndex = pad_code
        pad.inputs = np.array([op.inputs[0], len(graph.tensors) - 2], "int32")
        pad.outputs = np.array([len(graph.tensors) - 1], "int32")
        pad.builtinOptionsType = schema.BuiltinOptions.PadOptions
        pad.builtinOptions = schema.PadOptionsT()
        op.inputs[0] = len(graph.tensors) - 1
        op.builtinOptions.padding = schema.Padding.VALID
        operators.extend([pad, op])
        changed = True
    if not changed:
        return
    graph.operators = operators
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    with open(filepath, "wb") as f:
        f.write(builder.Output())


def _symmetric_same_padding(graph, op, schema):
    """((top, bottom), (left, right)) of a strided "SAME" convolution whose
    padding is the same on each side, else None."""
    options = op.builtinOptions
    strides = (options.strideH, options.strideW)
    if options.padding != schema.Padding.SAME or strides == (1, 1):
        return None
    source = graph.tensors[op.inputs[0]]
    shape = [int(n) for n in source.shape]
    kernel = [int(n) for n in graph.tensors[op.inputs[1]].shape[1:3]]
    dilations = (options.dilationHFactor, options.dilationWFactor)
    if len(shape) != 4:
        return None
    signature = source.shapeSignature
    if signature is not None and min(int(n) for n in signature[1:3]) < 0:
        return None  # height or width set at run time
    padding = []
    for size, k, stride, dilation in zip(
        shape[1:3], kernel, strides, dilations
    ):
        extent = (k - 1) * dilation + 1
        total = max((-(-size // stride) - 1) * stride + extent - size, 0)
        if total % 2:
            return None
        padding.append([total // 2, total // 2])
    return padding


# TFLite operators XNNPACK runs elementwise in its sparse (CHW) layout on
# 4-D tensors; this is the set every XNNPACK version since 2020 accepts.
_XNNPACK_SPARSE_UNARY = {
    "ABS",
    "CEIL",
    "ELU",
    "FLOOR",
    "HARD_SWISH",
    "LEAKY_RELU",
    "LOGISTIC",
    "NEG",
    "RELU",
    "RELU6",
    "RELU_N1_TO_1",
    "ROUND",
    "SQUARE",
}

# What a node does in XNNPACK's sparse rewrite: run in the sparse layout,
# turn the dense layout into it (the start convolution), or end it.
_IN, _START, _END = 1, 2, 4


@kprune_export("kprune.export")
def xnnpack_sparse_problems(filepath) -> list:
    """Lists why XNNPACK would not run a LiteRT file on its sparse path.

    TensorFlow Lite's XNNPACK delegate runs part of a convolutional
    network in a sparse, channels-first layout ("Fast Sparse ConvNets")
    when the file asks for it and the graph follows its rules. This reads
    the file's main graph and checks those rules as XNNPACK does (its
    `xnn_check_nchw_compatibility` and `xnn_subgraph_rewrite_for_nchw`):

    - some weight is stored in TFLite's sparse format (read through a
      `DENSIFY` operator), without which the delegate never tries;
    - each sparse part starts at a float32 `CONV_2D` with a 3x3 kernel,
      stride 2, padding 1 on each side (a zero `PAD` folded into it) and
      3 input channels, and ends at a `MEAN` over height and width;
    - in between are only float32 1x1 `CONV_2D` (stride 1, no padding, no
      groups), 3x3 or 5x5 `DEPTHWISE_CONV_2D` (stride 1 or 2, padding 1
      or 2 on each side, depth multiplier 1), `ADD` and `MUL` of two 4-D
      tensors, elementwise activations, `RESIZE_BILINEAR` and other
      `MEAN`s, and no tensor in it is read from outside it;
    - more than 2/3 of the weights of its 1x1 convolutions are zero.

    It cannot tell whether a device's runtime takes the path: XNNPACK
    runs sparse kernels only on ARM and WebAssembly, and x86 processors
    without AVX.

    Needs TensorFlow, whose generated TFLite schema reads the file.

    Args:
        filepath: Path of a `.tflite` file.

    Returns:
        A list of strings, one per broken rule, naming the operator (its
        index, type and output tensor); empty if XNNPACK would run every
        sparse part of the file sparse.

    Example:

    ```python
    kprune.export.export_litert(model, "model.tflite", sparse_format=True)
    for problem in kprune.export.xnnpack_sparse_problems("model.tflite"):
        print(problem)
    ```
    """
    from tensorflow.lite.python import schema_py_generated as schema

    with open(os.fspath(filepath), "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    return _Graph(model, schema).problems()


class _Graph:
    """The main graph of a `.tflite` file, as XNNPACK's delegate sees it."""

    def __init__(self, model, schema):
        self.schema = schema
        self.model = model
        graph = model.subgraphs[0]
        self.tensors = graph.tensors
        self.outputs = set(int(t) for t in graph.outputs)
        codes = {
            value: name
            for name, value in vars(schema.BuiltinOperator).items()
            if not name.startswith("_")
        }
        self.ops = []
        for index, op in enumerate(graph.operators):
            code = model.operatorCodes[op.opcodeIndex]
            self.ops.append(
                {
                    "index": index,
                    "name": codes.get(
                        max(code.builtinCode, code.deprecatedBuiltinCode),
                        "CUSTOM",
                    ),
                    "inputs": [int(t) for t in op.inputs if t >= 0],
                    "outputs": [int(t) for t in op.outputs],
                    "options": op.builtinOptions,
                }
            )
        self.producer = {t: op for op in self.ops for t in op["outputs"]}
        self.consumers = {}
        for op in self.ops:
            for t in dict.fromkeys(op["inputs"]):
                self.consumers.setdefault(t, []).append(op)

    # Tensors.

    def data(self, t):
        buffer = self.model.buffers[self.tensors[t].buffer]
        return None if buffer.data is None else bytes(buffer.data)

    def static(self, t):
        """Whether tensor `t` is a constant (also once densified)."""
        if self.data(t):
            return True
        op = self.producer.get(t)
        return (
            op is not None
            and op["name"] in ("DENSIFY", "DEQUANTIZE")
            and self.static(op["inputs"][0])
        )

    def shape(self, t):
        return [int(n) for n in self.tensors[t].shape]

    def is_float(self, t):
        types = self.schema.TensorType
        return self.tensors[t].type in (types.FLOAT32, types.FLOAT16)

    def sparse_weights(self):
        """Outputs of `DENSIFY` ops reading a sparse float constant."""
        return {
            op["outputs"][0]
            for op in self.ops
            if op["name"] == "DENSIFY"
            and self.tensors[op["inputs"][0]].sparsity is not None
            and self.is_float(op["inputs"][0])
        }

    def zeros(self, t):
        """(zeros, values) of constant weight `t`, stored dense or sparse."""
        op = self.producer.get(t)
        if op is not None and op["name"] in ("DENSIFY", "DEQUANTIZE"):
            return self.zeros(op["inputs"][0])
        size = int(np.prod(self.shape(t)))
        if not self.data(t):
            return 0, size  # weights computed at run time: none known zero
        dtype = "float16" if self.tensors[t].type == 1 else "float32"
        values = np.frombuffer(self.data(t), dtype=dtype)
        return size - int(np.count_nonzero(values)), size

    def describe(self, op):
        out = self.tensors[op["outputs"][0]].name
        out = out.decode() if isinstance(out, bytes) else out
        return f"operator #{op['index']} {op['name']} (output {out!r})"

    # Nodes.

    def nodes(self):
        """The XNNPACK nodes: each op but those unpacking constants, with
        a zero `PAD` folded into the convolution it alone feeds."""
        nodes, folded = [], {}
        for op in self.ops:
            if op["name"] in ("DENSIFY", "DEQUANTIZE") and self.static(
                op["outputs"][0]
            ):
                continue
            node = dict(op)
            if op["name"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                node["padding"] = self.conv_padding(op)
                pad = self.producer.get(op["inputs"][0])
                if (
                    pad is not None
                    and node["padding"] is not None
                    and self.foldable_pad(pad)
                ):
                    (top, bottom), (left, right) = self.pad_amounts(pad)[1:3]
                    t, b, l_, r = node["padding"]
                    node["padding"] = (
                        t + top,
                        b + bottom,
                        l_ + left,
                        r + right,
                    )
                    node["inputs"] = [pad["inputs"][0], *op["inputs"][1:]]
                    folded[pad["index"]] = node
            nodes.append(node)
        nodes = [n for n in nodes if n["index"] not in folded]
        return nodes

    def conv_padding(self, op):
        """(top, bottom, left, right), or None for TensorFlow "SAME"
        padding at a stride above 1 (which XNNPACK keeps implicit)."""
        options = op["options"]
        if options.padding == self.schema.Padding.VALID:
            return (0, 0, 0, 0)
        if (options.strideH, options.strideW) != (1, 1):
            return None
        _, kh, kw, _ = self.shape(op["inputs"][1])
        ph = (kh - 1) * options.dilationHFactor
        pw = (kw - 1) * options.dilationWFactor
        return (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)

    def pad_amounts(self, pad):
        """The `PAD`'s [[before, after]] for each axis."""
        t = pad["inputs"][1]
        int64 = self.tensors[t].type == self.schema.TensorType.INT64
        dtype = "int64" if int64 else "int32"
        return np.frombuffer(self.data(t), dtype).reshape(-1, 2).tolist()

    def foldable_pad(self, pad):
        """Whether XNNPACK folds `pad` into the convolution it feeds."""
        if pad["name"] != "PAD" or not self.data(pad["inputs"][1]):
            return False
        if len(self.consumers.get(pad["outputs"][0], [])) != 1:
            return False
        if pad["outputs"][0] in self.outputs:
            return False
        amounts = self.pad_amounts(pad)
        return len(amounts) == 4 and amounts[0] == amounts[3] == [0, 0]

    def role(self, node):
        """(what the node does in the sparse layout, why not if nothing)."""
        inputs = node["inputs"]
        if node["name"] in ("MEAN", "RESIZE_BILINEAR", "PAD", "RESHAPE"):
            inputs = inputs[:1]  # the others are parameters, not values
        if not all(self.is_float(t) for t in inputs + node["outputs"]):
            return 0, "it is not float32 (quantized weights or activations)"
        name = node["name"]
        if name == "CONV_2D":
            return self.conv_role(node)
        if name == "DEPTHWISE_CONV_2D":
            return self.depthwise_role(node)
        if name == "MEAN":
            axes = np.frombuffer(self.data(node["inputs"][1]) or b"", "int32")
            rank = len(self.shape(node["inputs"][0]))
            if rank == 4 and sorted(axes % 4) == [1, 2]:
                return _IN | _END, None
            return 0, "only a MEAN over height and width of a 4-D tensor"
        if name in ("ADD", "MUL"):
            if all(len(self.shape(t)) == 4 for t in node["inputs"]):
                return _IN, None
            return 0, (
                f"{name} runs sparse only on two 4-D tensors; it has inputs "
                f"of shapes {[self.shape(t) for t in node['inputs']]} (a "
                "BatchNormalization that no convolution absorbs, or a "
                "product with a scalar)"
            )
        if name in _XNNPACK_SPARSE_UNARY:
            if len(self.shape(node["inputs"][0])) == 4:
                return _IN, None
            return 0, f"{name} runs sparse only on a 4-D tensor"
        if name == "RESIZE_BILINEAR":
            if min(self.shape(node["inputs"][0])[1:3]) > 1:
                return _IN, None
            return 0, "RESIZE_BILINEAR runs sparse only on inputs above 1x1"
        if name == "DEPTH_TO_SPACE":
            return _END, None
        return 0, f"XNNPACK has no sparse {name}"

    def conv_role(self, node):
        options = node["options"]
        _, kh, kw, in_channels = self.shape(node["inputs"][1])
        channels = self.shape(node["inputs"][0])[-1]
        strides = (options.strideH, options.strideW)
        if channels != in_channels:
            return 0, "a grouped convolution"
        if (options.dilationHFactor, options.dilationWFactor) != (1, 1):
            return 0, "a dilated convolution"
        padding = node["padding"]
        if padding is None:
            padding_text = "TensorFlow 'SAME' padding at stride 2"
        else:
            padding_text = (
                "padding {} above, {} below, {} left, {} right".format(*padding)
            )
        if (kh, kw) == (1, 1):
            if strides == (1, 1) and padding == (0, 0, 0, 0):
                return _IN, None
            return 0, (
                f"a 1x1 convolution with strides {strides} and "
                f"{padding_text} (needs stride 1, no padding)"
            )
        if (kh, kw) == (3, 3):
            problems = []
            if padding != (1, 1, 1, 1):
                problems.append(f"{padding_text}, not 1 on each side")
            if strides != (2, 2):
                problems.append(f"strides {strides}, not 2")
            if in_channels != 3:
                problems.append(f"{in_channels} input channels, not 3")
            if not problems:
                return _START, None
            return 0, "a 3x3 convolution with " + "; ".join(problems)
        return 0, f"a {kh}x{kw} convolution (only 1x1, or the 3x3 start)"

    def depthwise_role(self, node):
        options = node["options"]
        _, kh, kw, out_channels = self.shape(node["inputs"][1])
        channels = self.shape(node["inputs"][0])[-1]
        strides = (options.strideH, options.strideW)
        padding = node["padding"]
        problems = []
        if (options.dilationHFactor, options.dilationWFactor) != (1, 1):
            problems.append("dilation")
        if out_channels != channels:
            problems.append(f"depth multiplier {out_channels // channels}")
        if strides not in ((1, 1), (2, 2)):
            problems.append(f"strides {strides}")
        if (kh, kw) not in ((3, 3), (5, 5)):
            problems.append(f"a {kh}x{kw} kernel (only 3x3 or 5x5)")
        elif padding is None:
            problems.append("TensorFlow 'SAME' padding at stride 2")
        elif padding != (kh // 2,) * 4:
            problems.append(
                "padding {} above, {} below, {} left, {} right".format(*padding)
                + f", not {kh // 2} on each side"
            )
        if problems:
            return 0, "a depthwise convolution with " + "; ".join(problems)
        return _IN, None

    # The sparse parts.

    def problems(self):
        problems = []
        if not self.sparse_weights():
            problems.append(
                "No float32 weight is stored in TFLite's sparse format (no "
                "DENSIFY operator reads one), so the XNNPACK delegate never "
                "tries sparse inference: export with "
                "`kprune.export.export_litert(..., sparse_format=True)` "
                "(`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`), without "
                "quantization, from a model whose 1x1 convolutions are "
                "pruned."
            )
        nodes = self.nodes()
        roles = {n["index"]: self.role(n) for n in nodes}
        producer = {t: n for n in nodes for t in n["outputs"]}
        consumers = {}
        for n in nodes:
            for t in dict.fromkeys(n["inputs"]):
                consumers.setdefault(t, []).append(n)
        ends = [n for n in nodes if roles[n["index"]][0] & _END]
        if not ends:
            problems.append(
                "No MEAN over height and width (a GlobalAveragePooling2D) "
                "ends a sparse part: XNNPACK runs the whole file dense."
            )
        clusters = []
        for end in ends:
            members, why, broken = self.cluster(end, roles, producer)
            for other in clusters:
                if other[0] & members:
                    other[0].update(members)
                    other[1].extend(why)
                    other[2].update(broken)
                    break
            else:
                clusters.append((members, why, broken))
        for cluster in clusters:
            problems.extend(
                self.cluster_problems(*cluster, nodes, consumers, roles)
            )
        return problems

    def cluster(self, end, roles, producer):
        """The nodes of the sparse part ending at `end`, and why it breaks."""
        members, why, broken = {end["index"]}, [], set()
        stack = [end]
        while stack:
            node = stack.pop()
            if roles[node["index"]][0] == _START:
                continue  # the start reads the dense layout
            for t in node["inputs"]:
                if self.static(t):
                    continue
                source = producer.get(t)
                if source is None:
                    if node["index"] not in members:
                        continue  # an input reached past a broken node
                    why.append(
                        f"{self.describe(node)} reads the model input "
                        "directly: a sparse part must start with the 3x3 "
                        "stride-2 convolution"
                    )
                    continue
                if source["index"] in members or source["index"] in broken:
                    continue
                role, reason = roles[source["index"]]
                if role & (_IN | _START):
                    members.add(source["index"])
                else:
                    # Followed further, so that every problem is listed.
                    broken.add(source["index"])
                    why.append(
                        f"{self.describe(source)} feeds the sparse part "
                        f"ending at {self.describe(end)}, but {reason}"
                    )
                stack.append(source)
        return members, why, broken

    def cluster_problems(self, members, why, broken, nodes, consumers, roles):
        by_index = {n["index"]: n for n in nodes}
        inside = [by_index[i] for i in sorted(members)]
        problems = list(dict.fromkeys(why))
        for node in inside:
            if not roles[node["index"]][0] & (_IN | _END):
                continue  # a start: its input is dense
            for t in node["inputs"]:
                if self.static(t):
                    continue
                readers = consumers.get(t, [])
                # Readers reported as broken already are not repeated.
                outside = [
                    r
                    for r in readers
                    if r["index"] not in members and r["index"] not in broken
                ]
                if t in self.outputs or outside:
                    whom = ", ".join(self.describe(r) for r in outside)
                    problems.append(
                        f"The output of {self.describe(self.producer[t])} "
                        "is read outside its sparse part ("
                        + (whom or "as a model output")
                        + "): XNNPACK then runs the part dense"
                    )
        zeros = params = 0
        for node in inside:
            if node["name"] == "CONV_2D" and self.shape(node["inputs"][1])[
                1:3
            ] == [1, 1]:
                z, n = self.zeros(node["inputs"][1])
                zeros, params = zeros + z, params + n
        last = self.describe(inside[-1])
        if params == 0:
            problems.append(
                f"The sparse part ending at {last} has no 1x1 convolution."
            )
        elif zeros * 3 <= params * 2:
            problems.append(
                f"The 1x1 convolutions of the sparse part ending at {last} "
                f"have {zeros} zero weights of {params} "
                f"({zeros / params:.1%}): XNNPACK needs more than 2/3."
            )
        return list(dict.fromkeys(problems))


# Shapes of the (out, in) matrix that both of PyTorch's 2:4 backends accept
# (PyTorch 2.13, `torch/sparse/semi_structured.py`): rows and columns must
# be multiples of these. CUTLASS needs (32, 64) for float16 and bfloat16
# and (16, 128) for int8; cuSPARSELt (16, 16) and (32, 32).
_SEMI_STRUCTURED_ALIGNMENT = {
    "float16": (32, 64),
    "bfloat16": (32, 64),
    "int8": (32, 128),
}


@kprune_export("kprune.export")
def semi_structured_weights(
    model,
    m_by_n: tuple = (2, 4),
    layers: list | None = None,
    dtype: str | None = "float16",
) -> dict:
    """N:M sparse kernels in the layout of NVIDIA's sparse tensor cores.

    NVIDIA GPUs from Ampere on (compute capability 8.0+) multiply 2:4
    sparse matrices at up to twice the dense math rate: cuSPARSELt and
    CUTLASS, which PyTorch's `torch.sparse.to_sparse_semi_structured`
    calls, take the sparse operand as a row-major (out, in) matrix in
    which every 4 consecutive entries of a row (along the reduction, or
    input, dimension) hold at most 2 nonzeros, and store it as the kept
    values, of shape (out, in / 2), plus 2-bit positions. kprune's
    `sparsity_m_by_n=(2, 4)` prunes along each kernel's input axis, so
    its kernels map onto that layout:

    - `Dense`: the kernel transposed, `(units, input_dim)`, PyTorch's
      `nn.Linear.weight`.
    - `EinsumDense`: the kernel's axes that its equation contracts with
      the input, flattened in the kernel's order, are the columns; its
      other axes, flattened in the kernel's order, are the rows. For the
      attention query kernel `"abc,cde->abde"` of shape
      `(hidden, heads, head_dim)` that is `(heads * head_dim, hidden)`;
      for the output kernel `"abcd,cde->abe"` of shape
      `(heads, head_dim, hidden)` it is `(hidden, heads * head_dim)`.
    - `Conv1D`, `Conv2D`, `Conv3D` (with `groups=1`): `(filters,
      kh * kw * in)`, the kernel as an implicit GEMM reads it on
      channels-last (NHWC) inputs, input channels innermost (cuDNN's KRSC
      filter layout). PyTorch's own `(out, in, kh, kw)` layout flattened
      would break the groups, which run along input channels.

    Pruned models are stripped first (see `kprune.strip_pruning`).
    Depthwise, separable and transposed convolutions have no such matrix
    and are not exported.

    Args:
        model: A Keras model pruned with `sparsity_m_by_n=m_by_n`, or
            stripped after such pruning.
        m_by_n: `(m, n)`: at least `m` zeros in every `n` consecutive
            inputs of each row. Sparse tensor cores run only `(2, 4)`.
        layers: Names (or `layer.path`s) of the layers to export; a
            layer that holds others (a `MultiHeadAttention`) stands for
            the `Dense`, `EinsumDense` and convolutions inside it. `None`
            exports, for a pruned model, the layers pruned with
            `sparsity_m_by_n=m_by_n`, and for a stripped model every
            `Dense`, `EinsumDense` and convolution: name the N:M layers
            to leave the others dense.
        dtype: The dtype the matrices will run in on the GPU:
            `"float16"`, `"bfloat16"` or `"int8"`, whose shape rules are
            checked, or `None` to check none. The rule is the one both of
            PyTorch's 2:4 backends (CUTLASS and cuSPARSELt) accept: rows
            (outputs) a multiple of 32, and columns (inputs) a multiple
            of 64 for 16-bit floats, of 128 for int8. The rule applies to
            `m_by_n=(2, 4)` only. The returned arrays keep the kernels'
            dtype; cast them.

    Returns:
        A dict from each layer's `path` to a dict with `"matrix"`, the
        `(out, in)` NumPy array; `"values"`, its kept entries, of shape
        `(out, in * (n - m) / n)`, group by group; `"indices"`, a uint8
        array of the same shape giving each kept entry's position (0 to
        `n - 1`) in its group of `n`, ascending within the group; and
        `"kernel_shape"`, the Keras kernel's shape.
        `kprune.export.semi_structured_to_dense` turns values and indices
        back into the matrix.

    Raises:
        ValueError: If `model` is not a Keras model, `m_by_n` or `dtype`
            is invalid, a name in `layers` is unknown or its layer has no
            GEMM matrix, or a layer's matrix breaks the N:M pattern along
            its inputs or the shape rule of `dtype` (the message names
            the layer and says it can be left dense).

    Example:

    ```python
    pruned = kprune.prune_low_magnitude(
        model, kprune.ConstantSparsity(0.5, 0), sparsity_m_by_n=(2, 4)
    )
    # ... train with kprune.UpdatePruningStep() ...
    for path, w in kprune.export.semi_structured_weights(pruned).items():
        print(path, w["matrix"].shape, w["values"].shape)
    ```
    """
    m, n = _check_m_by_n(m_by_n)
    if dtype is not None and dtype not in _SEMI_STRUCTURED_ALIGNMENT:
        raise ValueError(
            "Argument `dtype` must be one of "
            f"{sorted(_SEMI_STRUCTURED_ALIGNMENT)} or None. "
            f"Received: dtype={dtype!r}"
        )
    require_model(model)
    wrapped = collect_pruned_layers(model)
    pruned_names = None
    if layers is None and wrapped:
        pruned_names = [
            w.layer.name
            for w in wrapped
            if w.sparsity_m_by_n is not None
            and tuple(w.sparsity_m_by_n) == (m, n)
        ]
    found = [
        layer
        for layer in _keras_internals.flatten_layers(_plain_model(model))
        if getattr(layer, "kernel", None) is not None
    ]
    if layers is None and pruned_names is None:
        chosen = [layer for layer in found if _gemm_kind(layer)]
    elif layers is None:
        chosen = [
            layer
            for layer in found
            if _gemm_kind(layer)
            and any(_named(layer, name) for name in pruned_names)
        ]
    else:
        if isinstance(layers, str):
            layers = [layers]
        chosen = []
        for name in layers:
            matches = [
                layer
                for layer in found
                if name in (layer.name, layer.path)
                or (_named(layer, name) and _gemm_kind(layer))
            ]
            if not matches:
                raise ValueError(
                    f"Argument `layers` names {name!r}, which is no layer "
                    "with a kernel in `model`, nor holds one. Layers with "
                    f"kernels: {[layer.path for layer in found]}"
                )
            chosen.extend(x for x in matches if x not in chosen)
    result = {}
    for layer in chosen:
        matrix = _gemm_matrix(layer)
        _check_semi_structured(layer, matrix, m, n, dtype)
        values, indices = _compress(matrix, m, n)
        result[layer.path] = {
            "matrix": matrix,
            "values": values,
            "indices": indices,
            "kernel_shape": tuple(layer.kernel.shape),
        }
    return result


@kprune_export("kprune.export")
def semi_structured_to_dense(values, indices, m_by_n: tuple = (2, 4)):
    """Rebuilds an `(out, in)` matrix from its N:M compressed form.

    The inverse of the `"values"` and `"indices"` that
    `kprune.export.semi_structured_weights` returns.

    Args:
        values: Array of shape `(out, in * (n - m) / n)`: the kept entries,
            `n - m` per group of `n` inputs.
        indices: Integer array of the same shape: each kept entry's
            position (0 to `n - 1`) in its group.
        m_by_n: `(m, n)`.

    Returns:
        The `(out, in)` NumPy array, zero outside the kept positions.

    Raises:
        ValueError: If `m_by_n` is invalid or the shapes disagree.

    Example:

    ```python
    w = kprune.export.semi_structured_weights(pruned)["sequential/dense"]
    matrix = kprune.export.semi_structured_to_dense(
        w["values"], w["indices"]
    )
    ```
    """
    m, n = _check_m_by_n(m_by_n)
    values = np.asarray(values)
    indices = np.asarray(indices)
    kept = n - m
    if (
        values.ndim != 2
        or values.shape != indices.shape
        or values.shape[1] % kept
    ):
        raise ValueError(
            "Arguments `values` and `indices` must be 2-D arrays of the "
            f"same shape, with a multiple of {kept} columns. Received: "
            f"values.shape={values.shape}, indices.shape={indices.shape}"
        )
    rows, columns = values.shape
    groups = columns // kept
    dense = np.zeros((rows, groups, n), dtype=values.dtype)
    np.put_along_axis(
        dense,
        indices.reshape(rows, groups, kept).astype(np.intp),
        values.reshape(rows, groups, kept),
        axis=-1,
    )
    return dense.reshape(rows, groups * n)


def _check_m_by_n(m_by_n):
    try:
        m, n = (int(v) for v in m_by_n)
    except (TypeError, ValueError):
        m, n = 0, 0
    if not 0 < m < n:
        raise ValueError(
            "Argument `m_by_n` must be a tuple (m, n) of integers with "
            f"0 < m < n. Received: m_by_n={m_by_n!r}"
        )
    return m, n


def _named(layer, name):
    """Whether `layer` is called `name` or lies inside a layer so called
    (a pruned `MultiHeadAttention` holds the `EinsumDense` kernels)."""
    return (
        name in (layer.name, layer.path)
        or name in layer.path.split("/")[:-1]
        or layer.path.startswith(name + "/")
    )


def _gemm_kind(layer):
    """Which GEMM matrix `layer`'s kernel has, or None."""
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, keras.layers.EinsumDense):
        return "einsum"
    if isinstance(
        layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    ):
        return "conv"
    return None


def _gemm_matrix(layer):
    """`layer`'s kernel as the (out, in) matrix of its GEMM."""
    kind = _gemm_kind(layer)
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    if kind == "dense":
        return np.ascontiguousarray(kernel.T)
    if kind == "conv" and getattr(layer, "groups", 1) == 1:
        return np.ascontiguousarray(
            np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)
        )
    if kind == "einsum":
        inputs, output = layer.equation.replace(" ", "").split("->")
        source, letters = inputs.split(",")
        batch = [c for c in letters if c in source and c in output]
        contracted = registry.einsum_contracted_axes(layer.equation)
        if contracted and not batch and "." not in letters:
            rest = [i for i in range(kernel.ndim) if i not in contracted]
            columns = int(np.prod([kernel.shape[i] for i in contracted]))
            return np.ascontiguousarray(
                kernel.transpose(rest + contracted).reshape(-1, columns)
            )
    raise ValueError(
        f"Layer {layer.path!r} ({type(layer).__name__}) has no single "
        "(out, in) matrix for a 2:4 sparse GEMM: supported are Dense, "
        "EinsumDense without batch axes in its kernel, and Conv1D/2D/3D "
        "with groups=1. Leave it out of `layers` to keep it dense."
    )


def _check_semi_structured(layer, matrix, m, n, dtype):
    rows, columns = matrix.shape
    leave_dense = "Leave it out of `layers` to keep it dense"
    if columns % n:
        raise ValueError(
            f"Layer {layer.path!r}: its (out, in) matrix of shape "
            f"{matrix.shape} has {columns} inputs, not a multiple of {n}, "
            f"so it has no {m}:{n} layout. {leave_dense}."
        )
    nonzero = (matrix != 0).reshape(rows, columns // n, n).sum(axis=-1)
    broken = np.argwhere(nonzero > n - m)
    if broken.size:
        row, group = broken[0]
        raise ValueError(
            f"Layer {layer.path!r}: its kernel breaks the {m}:{n} pattern "
            f"along its inputs in {len(broken)} of {nonzero.size} groups; "
            f"the first is row {row}, inputs {group * n} to "
            f"{group * n + n - 1}, with {nonzero[row, group]} nonzeros "
            f"(at most {n - m} allowed). Prune it with "
            f"`sparsity_m_by_n=({m}, {n})` and train at least one step "
            "with `kprune.UpdatePruningStep()`, or leave it out of "
            "`layers` to keep it dense."
        )
    if dtype is None or (m, n) != (2, 4):
        return
    min_rows, min_columns = _SEMI_STRUCTURED_ALIGNMENT[dtype]
    if rows % min_rows or columns % min_columns:
        raise ValueError(
            f"Layer {layer.path!r}: its (out, in) matrix of shape "
            f"{matrix.shape} breaks the shape rule of PyTorch's 2:4 "
            f"kernels for {dtype}: outputs must be a multiple of "
            f"{min_rows} and inputs a multiple of {min_columns}. "
            f"{leave_dense}, or give it such a shape."
        )


def _compress(matrix, m, n):
    """Kept values and their positions in each group of `n`."""
    rows, columns = matrix.shape
    groups = matrix.reshape(rows, columns // n, n)
    # Nonzeros first, in index order; a group with fewer than n - m
    # nonzeros keeps its first zeros too, so every group keeps n - m.
    order = np.argsort(groups == 0, axis=-1, kind="stable")
    indices = np.sort(order[..., : n - m], axis=-1)
    values = np.take_along_axis(groups, indices, axis=-1)
    return (
        values.reshape(rows, -1),
        indices.astype(np.uint8).reshape(rows, -1),
    )
