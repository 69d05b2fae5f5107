"""`PruningPolicy`: model-wide rules on which layers may be pruned.

`PruneForLatencyOnXNNPack` follows the sparse inference rules of
TensorFlow Lite's XNNPACK delegate (its README, "Sparse Inference", and
`xnn_check_nchw_compatibility` in XNNPACK's src/subgraph.c) on Keras
layers, as tfmot 0.8.1 does, and lists every rule a model breaks.
`make_xnnpack_compatible` rewrites strided "same" padding into the
symmetric form those rules need, where that computes the same function.
"""

import abc
import collections
import warnings

import keras
import numpy as np

from kprune.api_export import kprune_export
from kprune.wrapper import PruneLowMagnitude


@kprune_export("kprune")
class PruningPolicy(abc.ABC):
    """Decides which layers of a model `prune_low_magnitude` may prune.

    Subclass it and pass an instance as `pruning_policy=` when pruning a
    whole model: `ensure_model_supports_pruning` is called once on the
    model and may raise to refuse it; `allow_pruning` is asked for each
    layer that could be pruned, and layers it refuses stay dense.

    Example:

    ```python
    class KeepFirstLayerDense(kprune.PruningPolicy):
        def __init__(self, first_layer_name):
            self.first_layer_name = first_layer_name

        def allow_pruning(self, layer):
            return layer.name != self.first_layer_name

        def ensure_model_supports_pruning(self, model):
            pass

    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=KeepFirstLayerDense("conv1")
    )
    ```
    """

    @abc.abstractmethod
    def allow_pruning(self, layer) -> bool:
        """Returns whether `layer` may be pruned."""

    @abc.abstractmethod
    def ensure_model_supports_pruning(self, model) -> None:
        """Raises `ValueError` if `model` cannot be pruned under this policy."""


class _Call:
    """One call of a layer (or operation) in a model's flattened graph."""

    def __init__(self, op, producers, name=None):
        self.op = op
        self.name = op.name if op is not None else name
        self.producers = list(dict.fromkeys(producers))
        self.consumers = []
        for producer in self.producers:
            producer.consumers.append(self)

    @property
    def layer(self):
        """The layer called, seen through a pruning wrapper."""
        if isinstance(self.op, PruneLowMagnitude):
            return self.op.layer
        return self.op

    def describe(self):
        if self.op is None:
            return f"input {self.name!r}" if self.name else "the model input"
        return f"layer {self.name!r} ({type(self.layer).__name__})"


def _is_graph_model(op) -> bool:
    # A functional model, or a subclass of one (a keras-hub task), is a
    # `keras.Function` of its inputs.
    return isinstance(op, (keras.Sequential, keras.Function))


def _tensor_keys(structure):
    """`(operation name, call index, output index)` for each tensor named
    in `structure`, a part of a functional model's config."""
    if isinstance(structure, dict):
        if structure.get("class_name") == "__keras_tensor__":
            return [tuple(structure["config"]["keras_history"])]
        structure = list(structure.values())
    if isinstance(structure, (list, tuple)):
        return [key for part in structure for key in _tensor_keys(part)]
    return []


def _graph_of(model):
    """`(inputs, calls, outputs)` of a functional `model`: `calls` holds
    `(operation, inputs, call)` for each call, producers first; a tensor
    is named by the key `(operation name, call index, output index)` and
    `call` is `(operation name, call index)`.

    Keras lists the calls of a functional model (a shared layer has one
    per use) publicly only in its config: each layer's `inbound_nodes`
    names the input tensors of each of its calls.
    """
    # The config of a plain functional model over the same tensors holds
    # the graph even for a subclass (a keras-hub task), whose own
    # `get_config` returns its constructor arguments.
    try:
        config = keras.Model(model.inputs, model.outputs, name=model.name)
        config = config.get_config()
    except NotImplementedError as error:
        raise _no_config_error(model) from error
    operations = {op.name: op for op in model.operations}
    calls = []
    for layer in config["layers"]:
        op = operations[layer["name"]]
        for index, node in enumerate(layer["inbound_nodes"]):
            calls.append((op, _tensor_keys(node), (op.name, index)))

    def model_tensors(refs):
        # `[operation name, call index, output index]` each, where Keras
        # counts the calls of a nested functional model from 1.
        refs = keras.tree.flatten(refs)
        keys = [tuple(refs[i : i + 3]) for i in range(0, len(refs), 3)]
        return [
            (name, call - isinstance(operations[name], keras.Function), index)
            for name, call, index in keys
        ]

    inputs = model_tensors(config["input_layers"])
    outputs = model_tensors(config["output_layers"])
    return inputs, calls, outputs


def _no_config_error(model):
    culprit = model
    for op in model.operations:
        try:
            op.get_config()
        except NotImplementedError:
            culprit = op
            break
    return ValueError(
        f"`{PruneForLatencyOnXNNPack.__name__}` reads the layer graph of "
        f"model {model.name!r} from its config, but {culprit.name!r} "
        f"({type(culprit).__name__}) has no config: it was created with "
        "arguments Keras cannot serialize and does not define "
        "`get_config()`. Define `get_config()` returning its `__init__` "
        "arguments, or prune without `pruning_policy`."
    )


def _flatten_graph(model, sources):
    """Adds the calls of `model` fed by `sources` (one `_Call` per model
    input); nested Sequential and functional models are expanded. Returns
    the `_Call` producing each model output."""
    if isinstance(model, keras.Sequential):
        (call,) = sources
        for layer in model.layers:
            if _is_graph_model(layer):
                (call,) = _flatten_graph(layer, [call])
            else:
                call = _Call(layer, [call])
        return [call]
    inputs, calls, outputs = _graph_of(model)
    # The `_Call` (or, for a nested model, the list of `_Call`s by output
    # index) made by each call of an operation.
    made = {key[:2]: [source] for key, source in zip(inputs, sources)}

    def producer(key):
        results = made[key[:2]]
        return results[key[2]] if len(results) > 1 else results[0]

    # The config lists calls by operation, so a shared layer's later call
    # can come before the calls that feed it: those wait for another pass.
    while calls:
        waiting = []
        for op, keys, call in calls:
            if any(key[:2] not in made for key in keys):
                waiting.append((op, keys, call))
                continue
            args = [producer(key) for key in keys]
            if _is_graph_model(op):
                made[call] = _flatten_graph(op, args)
            else:
                made[call] = [_Call(op, args)]
        if len(waiting) == len(calls):
            raise RuntimeError(
                f"Cannot follow the graph of model {model.name!r}: the calls "
                f"{[call for _, _, call in waiting]} read tensors no call "
                "makes. Please report this with your Keras version."
            )
        calls = waiting
    return [producer(key) for key in outputs]


def _zero_padding_before(call, size):
    """Whether `call`'s only input is a `ZeroPadding2D` of `size` on each
    side of height and width that feeds only `call` (XNNPACK folds such a
    padding into the convolution)."""
    if len(call.producers) != 1:
        return False
    producer = call.producers[0]
    layer = producer.op
    return (
        isinstance(layer, keras.layers.ZeroPadding2D)
        and layer.padding == ((size, size), (size, size))
        and len(producer.consumers) == 1
    )


_SUPPORTED = (
    "supported there: 1x1 `Conv2D` (strides 1, no dilation, groups 1); "
    "3x3 or 5x5 `DepthwiseConv2D` (depth_multiplier 1, no dilation) with "
    "padding='same' and strides 1, or padding='valid' and strides 1 or 2 "
    "right after a `ZeroPadding2D` of 1 (3x3) or 2 (5x5) that feeds only "
    "it; `BatchNormalization` on the last axis right after a convolution; "
    "`ReLU`, `LeakyReLU`, `ELU`, `Activation` relu/relu6/leaky_relu/elu/"
    "sigmoid; `Add`, `Multiply` (layers or +, * on two 4-D tensors); "
    "`Dropout`; `UpSampling2D` bilinear; "
    "`GlobalAveragePooling2D(keepdims=True)`"
)

_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "elu", "sigmoid")

# `keras.ops` calls in a functional model (`x + y`, `keras.ops.relu(x)`)
# are operations, not layers: accepted by class name.
# XNNPACK runs no subtraction sparse: only addition and multiplication.
_OPS = {"Add", "Multiply"} | {
    "Relu",
    "Relu6",
    "LeakyRelu",
    "Elu",
    "Sigmoid",
}


@kprune_export("kprune")
class PruneForLatencyOnXNNPack(PruningPolicy):
    """Prunes only 1x1 `Conv2D` layers, in models XNNPACK runs sparse.

    TensorFlow Lite's XNNPACK delegate runs a convolutional network with
    sparse 1x1 convolutions faster ("Fast Sparse ConvNets",
    arXiv:1911.09723), on the part of the graph it can run sparse. This
    policy, like tfmot's of the same name, first checks that the model has
    that part, and refuses it with a `ValueError` that lists every rule
    the model breaks, each with the layer and what to change:

    - every input branch starts with a `Conv2D` with a 3x3 kernel, 3 input
      channels, `strides=(2, 2)`, no dilation, groups 1 and
      `padding="valid"`, right after a `ZeroPadding2D(padding=1)` that
      feeds only it (XNNPACK's 3x3 stride-2 convolution with padding 1 on
      each side);
    - every output branch goes through a `GlobalAveragePooling2D` (TFLite's
      `MEAN` over height and width), which ends the sparse part; layers
      after it (a classifier head) are free;
    - between the two there are only 1x1 `Conv2D` (strides 1, no dilation,
      groups 1), 3x3 or 5x5 `DepthwiseConv2D` (depth multiplier 1, no
      dilation; `padding="same"` with strides 1, or `padding="valid"` with
      strides 1 or 2 after a `ZeroPadding2D` of 1 or 2 on each side that
      feeds only it), `BatchNormalization` on the channels axis right
      after a convolution (so that the converter folds it), `ReLU`,
      `LeakyReLU`, `ELU`, `Activation` relu/relu6/leaky_relu/elu/sigmoid,
      `Add`, `Multiply` (also as `+`, `*` on two 4-D tensors; XNNPACK runs
      no subtraction sparse), `Dropout`, bilinear `UpSampling2D` and
      `GlobalAveragePooling2D(keepdims=True)`.

    `padding="same"` at stride 2 breaks the first and third rules:
    TensorFlow pads such a layer asymmetrically (the odd pixel at the
    bottom and right) on even input sizes. Where it pads symmetrically,
    `kprune.pruning_policy.make_xnnpack_compatible` rewrites it.

    Then only `Conv2D` layers with a 1x1 kernel are pruned; all other
    layers stay dense. XNNPACK runs the sparse part sparse only when more
    than 2/3 of the 1x1 convolution weights are zero (prune to 0.75 or
    more, not exactly 2/3), and only from a file that stores them sparse:
    export the stripped model with
    `kprune.export.export_litert(model, path, sparse_format=True)`
    (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`), and check the file with
    `kprune.export.xnnpack_sparse_problems`.

    The model must be a built Sequential or functional model: the policy
    reads its graph. Subclassed and unbuilt models are refused.

    Example:

    ```python
    pruned = kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.PolynomialDecay(0.25, 0.75, 0, end_step),
        pruning_policy=kprune.PruneForLatencyOnXNNPack(),
    )
    ```
    """

    def allow_pruning(self, layer) -> bool:
        """Returns whether `layer` is a `Conv2D` with a 1x1 kernel."""
        return isinstance(layer, keras.layers.Conv2D) and tuple(
            layer.kernel_size
        ) == (1, 1)

    def ensure_model_supports_pruning(self, model) -> None:
        """Raises `ValueError` if XNNPACK cannot run `model` sparse.

        Args:
            model: The Keras model about to be pruned.

        Raises:
            ValueError: If `model` is not a built Sequential or functional
                model, or does not follow XNNPACK's sparse inference
                rules; the message names the layer and the rule.
        """
        policy = type(self).__name__
        if not _is_graph_model(model):
            raise ValueError(
                f"`{policy}` reads the model's layer graph, so it needs a "
                "Sequential or functional model. Received the subclassed "
                f"model {model.name!r} ({type(model).__name__}). Build it "
                "with `keras.Input` and the functional API, or prune it "
                "without `pruning_policy`."
            )
        try:
            model_inputs = model.inputs if model.built else None
        except ValueError:  # a Sequential built without an input shape
            model_inputs = None
        if not model_inputs:
            raise ValueError(
                f"`{policy}` reads the model's layer graph, so the model "
                f"must be built. Model {model.name!r} is not: start it "
                "with `keras.Input(shape=...)`, or call "
                "`model.build(input_shape)` before pruning."
            )
        names = {}
        if not isinstance(model, keras.Sequential):
            names = {
                id(op.output): op.name
                for op in model.operations
                if isinstance(op, keras.layers.InputLayer)
            }
        inputs = [
            _Call(None, [], name=names.get(id(t), "")) for t in model_inputs
        ]
        outputs = _flatten_graph(model, inputs)
        problems = []
        starts = self._find_starts(inputs, problems)
        ends = self._find_ends(outputs, problems)
        self._check_between(starts, ends, problems)
        if problems:
            count = (
                "1 problem"
                if len(problems) == 1
                else f"{len(problems)} problems"
            )
            raise ValueError(
                f"`{policy}`: model {model.name!r} breaks XNNPACK's sparse "
                f"inference rules ({count}), so XNNPACK would run it dense. "
                "Fix each of these:\n"
                + "\n".join(f"- {problem}" for problem in problems)
            )

    # Each rule below mirrors a condition of XNNPACK's sparse inference
    # (`xnn_check_nchw_compatibility` and `xnn_subgraph_rewrite_for_nchw`
    # in XNNPACK's src/subgraph.c).

    def _start_mismatch(self, call):
        """Why a `Conv2D` call cannot start the sparse subgraph, or None."""
        layer = call.layer
        problems = []
        if tuple(layer.kernel_size) != (3, 3):
            problems.append(f"kernel_size={tuple(layer.kernel_size)}")
        if tuple(layer.strides) != (2, 2):
            problems.append(f"strides={tuple(layer.strides)}")
        if tuple(layer.dilation_rate) != (1, 1):
            problems.append(f"dilation_rate={tuple(layer.dilation_rate)}")
        if layer.groups != 1:
            problems.append(f"groups={layer.groups}")
        if layer.padding.lower() != "valid":
            problems.append(
                f"padding={layer.padding!r}{_same_padding_note(layer)}"
            )
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and tuple(kernel.shape[2:3]) != (3,):
            problems.append(f"{kernel.shape[2]} input channels, not 3")
        if layer.padding.lower() == "valid" and not _zero_padding_before(
            call, 1
        ):
            before = ", ".join(p.describe() for p in call.producers)
            problems.append(
                f"its input comes from {before}, not from a "
                "`ZeroPadding2D(padding=1)` that feeds only it"
            )
        return "; ".join(problems) or None

    def _find_starts(self, inputs, problems):
        """The start convolution of every input branch (forward search).

        A branch that reaches a model output without a valid start is
        reported in `problems`; its first `Conv2D`, if any, is returned
        as a start anyway, so that the layers after it are checked too.
        """
        starts, seen = [], set(inputs)
        queue = collections.deque(inputs)
        near_misses = []
        while queue:
            call = queue.popleft()
            if isinstance(call.layer, keras.layers.Conv2D) and not isinstance(
                call.layer, keras.layers.DepthwiseConv2D
            ):
                mismatch = self._start_mismatch(call)
                if mismatch is None:
                    starts.append(call)
                    continue
                near_misses.append((call, mismatch))
            if not call.consumers:
                misses = [
                    (miss, why)
                    for miss, why in near_misses
                    if _reaches(miss, call, "consumers")
                ]
                if misses and misses[0][0] in starts:
                    continue  # reported for another output already
                if misses:
                    miss, why = misses[0]
                    starts.append(miss)
                    found = (
                        f"{miss.describe()} is the first `Conv2D` on the "
                        f"way, but it has {why}"
                    )
                else:
                    found = "there is no `Conv2D` on the way"
                problems.append(
                    "Start: XNNPACK needs every input branch to start its "
                    "sparse subgraph with a `Conv2D` with a 3x3 kernel, "
                    "strides=(2, 2), padding='valid', no dilation, groups 1 "
                    "and 3 input channels, right after a "
                    "`ZeroPadding2D(padding=1)` (padding 1 on each side). "
                    f"The branch from {_inputs_reaching(call, inputs)} "
                    f"reaches the model output {call.describe()} without "
                    f"one: {found}. Start the network with "
                    "`ZeroPadding2D(padding=1)` then `Conv2D(filters, 3, "
                    "strides=2, padding='valid')` on 3-channel images."
                )
                continue
            for nxt in call.consumers:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        return starts

    def _find_ends(self, outputs, problems):
        """The `GlobalAveragePooling2D` of every output (backward search)."""
        ends = set()
        for output in dict.fromkeys(outputs):
            seen = {output}
            queue = collections.deque([output])
            poolings, missing = [], []
            while queue:
                call = queue.popleft()
                if isinstance(call.layer, keras.layers.GlobalAveragePooling2D):
                    ends.add(call)
                    continue
                if "Pool" in type(call.layer).__name__:
                    poolings.append(call)
                if not call.producers:
                    missing.append(call)
                for prev in call.producers:
                    if prev not in seen:
                        seen.add(prev)
                        queue.append(prev)
            for source in missing:
                hint = ""
                on_way = [
                    p for p in poolings if _reaches(source, p, "consumers")
                ]
                if on_way:
                    hint = (
                        f" ({on_way[0].describe()} on the way does not "
                        "end it: only a global average pooling does)"
                    )
                problems.append(
                    "End: XNNPACK needs every output branch to end its "
                    "sparse subgraph with a `GlobalAveragePooling2D` "
                    "(TFLite `MEAN` over height and width). Following the "
                    f"model output {output.describe()} back reaches "
                    f"{source.describe()} without one{hint}. Add "
                    "`GlobalAveragePooling2D(keepdims=True)` after the last "
                    "convolution block; layers after it are not checked."
                )
        return ends

    def _check_between(self, starts, ends, problems):
        """Every call between a start and an end must be supported."""
        # Only calls from which an end can be reached are checked: a branch
        # that reaches none (a classifier without global pooling) is
        # reported as missing its end.
        before_end = set()
        stack = list(ends)
        while stack:
            call = stack.pop()
            for prev in call.producers:
                if prev not in before_end:
                    before_end.add(prev)
                    stack.append(prev)
        seen = set(starts)
        queue = collections.deque()
        for start in starts:
            for nxt in start.consumers:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        while queue:
            call = queue.popleft()
            if call in ends:
                continue
            if call not in before_end:
                continue
            why = self._unsupported(call)
            if why is not None:
                problems.append(
                    f"Between: {call.describe()} lies in XNNPACK's sparse "
                    "subgraph (between the start `Conv2D` and the "
                    f"`GlobalAveragePooling2D`) and breaks its rules: {why}."
                )
            for nxt in call.consumers:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)

    def _unsupported(self, call):
        """Why XNNPACK's sparse inference cannot run `call`, or None."""
        layer = call.layer
        if not isinstance(layer, keras.layers.Layer):
            if type(layer).__name__ in _OPS:
                return None
            return (
                f"the operation {type(layer).__name__} is not supported; "
                f"{_SUPPORTED}"
            )
        if isinstance(
            layer,
            (
                keras.layers.Add,
                keras.layers.Multiply,
                keras.layers.ReLU,
                keras.layers.LeakyReLU,
                keras.layers.ELU,
                keras.layers.Dropout,
            ),
        ):
            return None
        if isinstance(layer, keras.layers.ZeroPadding2D):
            return self._zero_padding_mismatch(call)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            return self._depthwise_mismatch(call)
        if isinstance(layer, keras.layers.Conv2D):
            problems = [
                f"{name}={value}"
                for name, value, good in (
                    ("kernel_size", tuple(layer.kernel_size), (1, 1)),
                    ("strides", tuple(layer.strides), (1, 1)),
                    ("dilation_rate", tuple(layer.dilation_rate), (1, 1)),
                    ("groups", layer.groups, 1),
                )
                if value != good
            ]
            if problems:
                return (
                    "only 1x1 `Conv2D` with strides 1, no dilation and "
                    f"groups 1 is supported; it has {', '.join(problems)}"
                )
            return None
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            if layer.keepdims:
                return None
            return "keepdims=False (use keepdims=True inside the subgraph)"
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.axis not in (-1, 3):
                return f"axis={layer.axis} (must be the last, channels axis)"
            return _batch_normalization_mismatch(call)
        if isinstance(layer, keras.layers.UpSampling2D):
            if layer.interpolation == "bilinear":
                return None
            return (
                f"interpolation={layer.interpolation!r} (only 'bilinear' "
                "is supported)"
            )
        if isinstance(layer, keras.layers.Activation):
            name = keras.activations.serialize(layer.activation)
            if name in _ACTIVATIONS:
                return None
            return f"activation {name!r} is not supported"
        return f"{type(layer).__name__} is not supported; {_SUPPORTED}"

    def _zero_padding_mismatch(self, call):
        # XNNPACK has no sparse (CHW) padding kernel: a padding runs sparse
        # only folded into the depthwise convolution it feeds.
        consumers = call.consumers
        if len(consumers) == 1:
            layer = consumers[0].layer
            if (
                isinstance(layer, keras.layers.DepthwiseConv2D)
                and layer.padding.lower() == "valid"
            ):
                return None
        fed = ", ".join(c.describe() for c in consumers) or "nothing"
        return (
            "a `ZeroPadding2D` runs in the sparse subgraph only folded into "
            "a `DepthwiseConv2D(padding='valid')` that is its only consumer; "
            f"it feeds {fed}"
        )

    def _depthwise_mismatch(self, call):
        layer = call.layer
        kernel = tuple(layer.kernel_size)
        strides = tuple(layer.strides)
        padding = layer.padding.lower()
        rule = (
            "`DepthwiseConv2D` must be 3x3 or 5x5 with depth_multiplier 1 "
            "and no dilation, with padding='same' and strides 1, or with "
            "padding='valid' and strides 1 or 2 right after a "
            "`ZeroPadding2D` of 1 (3x3) or 2 (5x5) on each side (XNNPACK "
            "needs the same padding on each side)"
        )
        got = (
            f"it has kernel_size={kernel}, strides={strides}, "
            f"padding={layer.padding!r}, depth_multiplier="
            f"{layer.depth_multiplier}, dilation_rate="
            f"{tuple(layer.dilation_rate)}"
        )
        if (
            kernel not in ((3, 3), (5, 5))
            or layer.depth_multiplier != 1
            or tuple(layer.dilation_rate) != (1, 1)
        ):
            return f"{rule}; {got}"
        if padding == "same" and strides == (1, 1):
            return None
        if (
            padding == "valid"
            and strides in ((1, 1), (2, 2))
            and _zero_padding_before(call, kernel[0] // 2)
        ):
            return None
        if padding == "valid" and strides in ((1, 1), (2, 2)):
            got += (
                f", and no `ZeroPadding2D({kernel[0] // 2})` before it (that "
                "feeds only it)"
            )
            before = call.producers[0].layer if call.producers else None
            if isinstance(before, keras.layers.ZeroPadding2D):
                got += f": the one before it pads {before.padding}"
                if _is_3x3_stride_2_depthwise(layer) and (
                    _embedding(_input_size(before), before.padding)
                ):
                    got += _DEPTHWISE_5X5
        if padding == "same":
            got += _same_padding_note(layer)
        return f"{rule}; {got}"


def _batch_normalization_mismatch(call):
    """Why a `BatchNormalization` call is not folded by the converter."""
    # The converter folds a batch normalization into the convolution
    # before it. Left alone it becomes a MUL and an ADD by 1-D constants,
    # and XNNPACK runs binary operators sparse only on two 4-D inputs.
    if len(call.producers) == 1:
        producer = call.producers[0]
        if (
            isinstance(
                producer.layer,
                (keras.layers.Conv2D, keras.layers.DepthwiseConv2D),
            )
            and len(producer.consumers) == 1
        ):
            return None
    before = ", ".join(p.describe() for p in call.producers)
    return (
        "a `BatchNormalization` runs in the sparse subgraph only right "
        "after a `Conv2D` or `DepthwiseConv2D` that feeds only it (the "
        "converter folds it into the convolution; alone it becomes a MUL "
        "and an ADD by 1-D constants, which XNNPACK runs only dense); its "
        f"input comes from {before}"
    )


def _same_padding(size, kernel, stride, dilation):
    """TensorFlow's "same" padding of one spatial axis: (before, after)."""
    extent = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _input_size(layer):
    """(height, width) of the input of `layer`'s first call, or None."""
    try:
        shape = tuple(layer.input.shape)
    except (AttributeError, ValueError):
        return None
    if len(shape) != 4 or None in shape[1:3]:
        return None
    return shape[1], shape[2]


def _symmetric_padding(layer):
    """((top, left), None) if `layer`'s "same" padding is symmetric on its
    input, else (None, why)."""
    size = _input_size(layer)
    if size is None:
        return None, "its input height and width are not known"
    pads = [
        _same_padding(n, k, s, d)
        for n, k, s, d in zip(
            size, layer.kernel_size, layer.strides, layer.dilation_rate
        )
    ]
    if all(before == after for before, after in pads):
        return (pads[0][0], pads[1][0]), None
    (top, bottom), (left, right) = pads
    return None, (
        f"on its {size[0]}x{size[1]} input, padding='same' pads {top} "
        f"above and {bottom} below, {left} left and {right} right"
    )


_DEPTHWISE_5X5 = (
    "; `kprune.pruning_policy.make_xnnpack_compatible(model, "
    "depthwise_5x5=True)` rewrites it as a 5x5 depthwise convolution "
    "padded by 2 on each side that computes the same"
)


def _same_padding_note(layer):
    """Why a "same"-padded strided layer breaks the rules, and the fix."""
    if layer.padding.lower() != "same" or tuple(layer.strides) == (1, 1):
        return ""
    pads, why = _symmetric_padding(layer)
    if pads is None:
        hint = ""
        if _is_3x3_stride_2_depthwise(layer):
            hint = _DEPTHWISE_5X5
        return (
            f" ({why}: TensorFlow puts the odd pixel at the bottom and "
            "right, and no symmetric padding computes the same outputs with "
            "this kernel; use `ZeroPadding2D` and padding='valid' and train "
            "or fine-tune the layer that way, or feed inputs of odd height "
            f"and width){hint}"
        )
    return (
        f" (on its input this pads {pads[0]} above and below and {pads[1]} "
        "left and right: `kprune.pruning_policy.make_xnnpack_compatible` "
        "rewrites it as `ZeroPadding2D` then padding='valid', with the "
        "same outputs)"
    )


def _inputs_reaching(call, inputs):
    """Names the model input(s) a dead-end `call` is reached from."""
    names = [c.describe() for c in inputs if _reaches(c, call, "consumers")]
    return ", ".join(names)


def _reaches(source, target, direction):
    seen, stack = {source}, [source]
    while stack:
        call = stack.pop()
        if call is target:
            return True
        for nxt in getattr(call, direction):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


@kprune_export("kprune.pruning_policy")
def make_xnnpack_compatible(model, depthwise_5x5: bool = False) -> keras.Model:
    """Rewrites strided "same" padding as XNNPACK's sparse inference needs.

    XNNPACK runs a 3x3 stride-2 `Conv2D` or `DepthwiseConv2D` sparse only
    with the same padding on each side, while `padding="same"` at stride
    2 lets TensorFlow pad `max((ceil(n / s) - 1) * s + k - n, 0)` pixels
    in all along an axis of size `n`, with the odd one at the bottom or
    right. Where that total is even on both axes (for a 3x3 or 5x5 kernel
    at stride 2: odd heights and widths), the layer computes the same
    function as a `ZeroPadding2D` of half the total on each side followed
    by the layer with `padding="valid"`, which is what this function
    builds; the outputs are identical.

    Where the total is odd (even sizes, as in
    `keras.applications.MobileNetV2` at 224x224), no symmetric padding of
    the same kernel gives the same outputs. With `depthwise_5x5=True`, a
    3x3 stride-2 `DepthwiseConv2D` padded 0 before and 1 after (by "same"
    padding on even sizes, or by a `ZeroPadding2D(((0, 1), (0, 1)))` that
    feeds only it, as in MobileNetV2) becomes a 5x5 one padded by 2 on
    each side whose kernel holds the 3x3 one in its bottom-right corner
    and zeros elsewhere: the same function (equal up to float rounding)
    at about 2.8x the depthwise multiply-adds, a small share of a
    MobileNet's, which the 5x5 kernel then trains as 25 weights. Other
    layers (a `Conv2D` stem: XNNPACK's sparse start is 3x3 only) are left
    as they are and named in a warning; fix them by training or
    fine-tuning the model with `ZeroPadding2D` and `padding="valid"`, or
    by feeding inputs of odd height and width.

    Only `keras.layers.Conv2D` and `keras.layers.DepthwiseConv2D` layers
    with strides above 1 are rewritten, and only those called once whose
    input height and width are known; nested Sequential and functional
    models are rewritten too. Call it before pruning: then check the
    result with `kprune.PruneForLatencyOnXNNPack`, which lists the rules
    that remain broken.

    Args:
        model: A built Sequential or functional Keras model. It is left
            unchanged.
        depthwise_5x5: Whether to rewrite 3x3 stride-2 depthwise
            convolutions padded asymmetrically as 5x5 ones (see above).

    Returns:
        A new functional model computing the same function, with copies
        of `model`'s layers and weights (a layer that cannot be rebuilt
        from its config is shared). The rewritten layers keep their
        names; each added padding layer is named after its layer, with
        `_pad` appended.

    Raises:
        ValueError: If `model` is not a built Sequential or functional
            model, or `depthwise_5x5` is not a bool.

    Example:

    ```python
    model = kprune.pruning_policy.make_xnnpack_compatible(model)
    pruned = kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.ConstantSparsity(0.8, 0),
        pruning_policy=kprune.PruneForLatencyOnXNNPack(),
    )
    ```
    """
    name = "kprune.pruning_policy.make_xnnpack_compatible"
    if not _is_graph_model(model):
        raise ValueError(
            f"`{name}` rewrites the model's layer graph, so it needs a "
            "Sequential or functional model. Received the subclassed model "
            f"{model.name!r} ({type(model).__name__})."
        )
    try:
        built = bool(model.inputs) if model.built else False
    except ValueError:  # a Sequential built without an input shape
        built = False
    if not built:
        raise ValueError(
            f"`{name}` needs a built model (the padding depends on the "
            f"input size). Model {model.name!r} is not: start it with "
            "`keras.Input(shape=...)`."
        )
    if not isinstance(depthwise_5x5, bool):
        raise ValueError(
            "Argument `depthwise_5x5` must be True or False. Received: "
            f"depthwise_5x5={depthwise_5x5!r}"
        )
    kept = []
    new = _rewrite_padding(model, kept, depthwise_5x5)
    if kept:
        warnings.warn(
            f"`{name}` left {len(kept)} layer(s) with padding that XNNPACK "
            "cannot run sparse, as no rewrite computes the same function:\n"
            + "\n".join(f"- {line}" for line in kept),
            stacklevel=2,
        )
    return new


def _rewrite_padding(model, kept, depthwise_5x5):
    """A functional copy of `model` with strided padding made symmetric
    where that keeps the function; `kept` collects why other strided
    layers are left as they are."""
    # A model of one input stays callable on a tensor, as the user's model
    # is (`model.input` is not defined for a nested model never called on
    # its own).
    inputs, outputs = (
        tensors[0] if len(tensors) == 1 else tensors
        for tensors in (model.inputs, model.outputs)
    )
    graph = keras.Model(inputs, outputs, name=model.name)
    _, calls, _ = _graph_of(graph)
    uses = collections.Counter(op.name for op, _, _ in calls)
    operations = {op.name: op for op in graph.operations}
    readers = collections.defaultdict(list)
    first_input = {}
    for op, keys, _ in calls:
        first_input.setdefault(op.name, keys[0][0] if keys else None)
        for key in keys:
            readers[key[:2]].append(op)
    names = set(operations)

    def new_name(base):
        name = f"{base}_pad"
        while name in names:
            name += "_"
        names.add(name)
        return name

    # id(old layer) -> (padding to add before it or None, its name, where
    # its 3x3 kernel sits in a 5x5 one or None); id(old ZeroPadding2D) ->
    # the padding that replaces its own.
    plans, repads = {}, {}
    for op in graph.operations:
        if type(op) not in (
            keras.layers.Conv2D,
            keras.layers.DepthwiseConv2D,
        ) or tuple(op.strides) == (1, 1):
            continue
        where = f"layer {op.name!r} ({type(op).__name__})"
        if op.padding.lower() == "valid":
            # keras.applications.MobileNetV2: ZeroPadding2D((0, 1), (0, 1))
            # on even sizes, then a 3x3 stride-2 depthwise convolution.
            pad = operations.get(first_input.get(op.name))
            if not (
                depthwise_5x5
                and _is_3x3_stride_2_depthwise(op)
                and type(pad) is keras.layers.ZeroPadding2D
                and uses[op.name] == uses[pad.name] == 1
                and len(readers[(pad.name, 0)]) == 1
            ):
                continue
            offsets = _embedding(_input_size(pad), pad.padding)
            if offsets is not None:
                repads[id(pad)] = ((2, 2), (2, 2))
                plans[id(op)] = (None, None, offsets)
            continue
        if uses[op.name] > 1:
            kept.append(
                f"{where} is called {uses[op.name]} times; rewrite it by "
                "hand with `ZeroPadding2D` and padding='valid'"
            )
            continue
        pads, why = _symmetric_padding(op)
        if pads is not None:
            plans[id(op)] = (pads, new_name(op.name), None)
            continue
        size = _input_size(op)
        if depthwise_5x5 and _is_3x3_stride_2_depthwise(op) and size:
            same = [_same_padding(n, 3, 2, 1) for n in size]
            offsets = _embedding(size, same)
            if offsets is not None:
                plans[id(op)] = ((2, 2), new_name(op.name), offsets)
                continue
        hint = ""
        if _is_3x3_stride_2_depthwise(op) and not depthwise_5x5:
            hint = " (`depthwise_5x5=True` rewrites it as a 5x5 one)"
        kept.append(
            f"{where}: {why}, and no symmetric padding computes the same "
            f"outputs{hint}"
        )

    pairs, planned = [], {}

    def clone(layer):
        if _is_graph_model(layer):
            return _rewrite_padding(layer, kept, depthwise_5x5)
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless operation, such as `keras.ops.add`
        if id(layer) in repads:
            return keras.layers.ZeroPadding2D(
                repads[id(layer)], name=layer.name
            )
        if id(layer) in plans:
            config = layer.get_config()
            config["padding"] = "valid"
            if plans[id(layer)][2] is not None:
                config["kernel_size"] = (5, 5)
            new = type(layer).from_config(config)
            planned[id(new)] = plans[id(layer)]
        else:
            try:
                new = type(layer).from_config(layer.get_config())
            except Exception:
                new = layer  # cannot be rebuilt: shared, as tfmot does
        pairs.append((layer, new))
        return new

    def call(layer, *args, **kwargs):
        pads, pad_name, _ = planned.get(id(layer), (None, None, None))
        if pads is not None and pads != (0, 0):
            (top, left) = pads
            padding = keras.layers.ZeroPadding2D(
                ((top, top), (left, left)), name=pad_name
            )
            args = (padding(args[0]), *args[1:])
        return layer(*args, **kwargs)

    input_names = {
        id(op.output): op.name
        for op in graph.operations
        if isinstance(op, keras.layers.InputLayer)
    }
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(
            batch_shape=t.shape, dtype=t.dtype, name=input_names.get(id(t))
        ),
        graph.input,
    )
    new = keras.models.clone_model(
        graph,
        input_tensors=inputs,
        clone_function=clone,
        call_function=call,
    )
    for old, copy in pairs:
        if copy is old or not old.weights:
            continue
        weights = old.get_weights()
        offsets = planned.get(id(copy), (None, None, None))[2]
        if offsets is not None:
            # The 3x3 taps where the 5x5 kernel, padded by 2, reads the
            # pixels the 3x3 one read; the other taps are zero.
            top, left = offsets
            kernel = np.zeros((5, 5, *weights[0].shape[2:]), weights[0].dtype)
            kernel[top : top + 3, left : left + 3] = weights[0]
            weights[0] = kernel
        copy.set_weights(weights)
    return new


def _is_3x3_stride_2_depthwise(layer):
    return (
        type(layer) is keras.layers.DepthwiseConv2D
        and tuple(layer.kernel_size) == (3, 3)
        and tuple(layer.strides) == (2, 2)
        and tuple(layer.dilation_rate) == (1, 1)
    )


def _embedding(size, pads):
    """Where a 3x3 stride-2 kernel padded by `pads` ((before, after) per
    axis) sits in a 5x5 one padded by 2 on each side computing the same,
    as (top, left); None if nowhere or if `pads` is symmetric already.

    The 5x5 kernel reads pixel `2 * i + k - 2` with tap `k`, the 3x3 one
    pixel `2 * i + m - before` with tap `m`: tap `m` moves to
    `k = m + 2 - before`. Both read zeros outside the image, so they agree
    wherever they give as many outputs.
    """
    if size is None or all(tuple(p) == (1, 1) for p in pads):
        return None
    offsets = []
    for n, (before, after) in zip(size, pads):
        if (before, after) not in ((0, 1), (1, 1)):
            return None
        if (n + before + after - 3) // 2 != (n - 1) // 2:
            return None  # another number of outputs
        offsets.append(2 - before)
    return tuple(offsets)
