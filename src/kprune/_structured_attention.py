"""Structured pruning of transformer blocks: attention heads, FFN units.

Two rules of `kprune.structured`'s `_RULES` table:

- `MultiHeadAttention` reads its query, key and value inputs with its
  projections' kernels (axis 0) and makes `num_heads` heads that only its
  own weights read: the query, key and value kernels (axis 1) and biases
  (axis 0) and the output kernel (axis 0). A head is ranked by the sum of
  the norms of its four kernel slices and removed from all of them, so
  the masked layer computes what the layer without the head computes.
  Its outputs keep their channels.
- A layer that holds sublayers and has no rule of its own (a keras-hub
  `TransformerEncoder`, say) is opened up: its `call` is traced on
  symbolic tensors, which records the calls of its sublayers and
  `keras.ops` (`_keras_internals.symbolic_calls`), and the same rules walk
  that graph, the block's layers named `"block/layer"`. The feed-forward
  pairing (intermediate Dense -> activation -> output Dense) is therefore
  not a known pattern but what the rules read from the graph: the
  intermediate Dense makes units the output Dense reads, while the output
  Dense's units meet the residual `x + residual` and the LayerNorm, which
  keep the hidden size whole.

The block's weights are pruned through the block's wrapper, so the masks
of heads and FFN units are trained by the same `StructuredGroup` as
convolution channels. `rebuild` (called by `shrink_model`) replaces each
traced block by its graph, inlined in a plain functional model, with
smaller layers: fewer heads (`num_heads`; the head size stays), fewer
FFN units.

A block whose call needs its inputs' batch or sequence size as a number
(keras-hub's `TransformerDecoder` builds its causal mask from them) cannot
be traced where the shape says None; it is traced with a placeholder size
there (`_trace`). Its graph then holds what the call computed from that
size as constants, so it is not inlined: `rebuild` keeps the block's own
call, with its resized sublayers swapped in (`_ResizedBlock`), and the
smaller model runs on any batch and sequence size.
"""

import contextlib
import inspect

import keras
from keras import layers as L

from kprune import _keras_internals
from kprune import registry
from kprune import structured

_PROJECTIONS = ("query_dense", "key_dense", "value_dense")


def _attention(plan, call):
    """A `MultiHeadAttention` layer's heads, and the inputs it reads."""
    layer = call.layer
    args, kwargs = call.arguments
    try:
        bound = inspect.signature(layer.call).bind(*args, **kwargs)
    except TypeError:
        return structured._no_rule(plan, call)
    query = bound.arguments["query"]
    value = bound.arguments["value"]
    key = bound.arguments.get("key")
    key = value if key is None else key
    kernels = [structured._weight(layer, f"{p}.kernel") for p in _PROJECTIONS]
    output = structured._weight(layer, "output_dense.kernel")
    heads = layer.num_heads
    if (
        len(query.shape) != 3
        or any(k is None or len(k.shape) != 3 for k in kernels + [output])
        or any(k.shape[1] != heads for k in kernels)
        or output.shape[0] != heads
    ):
        return plan.refuse(
            call,
            f"it feeds {call.what}, whose inputs kprune cannot match to its "
            "heads",
            "kprune removes heads of attention over sequences (rank-3 "
            "inputs, default `attention_axes`) only",
        )
    layout_of = {id(t): x for t, x in zip(call.input_tensors, call.inputs)}
    read = set()
    for tensor, projection in zip((query, key, value), _PROJECTIONS):
        read.add(id(tensor))
        plan.read(call, layout_of[id(tensor)], [(f"{projection}.kernel", 0)])
    for tensor, layout in zip(call.input_tensors, call.inputs):
        if id(tensor) not in read:
            plan.fail(layout, call.name, f"it feeds {call.what} as a mask")

    channels = structured._channels(call.outputs[0])

    def keep_output_channels(config, size):
        # By default the output has the query's channels, which shrink.
        if config.get("output_shape") is None:
            config["output_shape"] = channels

    plan.resize(call.name, layout_of[id(query)], keep_output_channels)

    def set_heads(config, size):
        config["num_heads"] = size

    plan.inner_units(
        call,
        heads,
        [(f"{p}.kernel", 1) for p in _PROJECTIONS]
        + [("output_dense.kernel", 0)],
        [(f"{p}.kernel", 1) for p in _PROJECTIONS]
        + [(f"{p}.bias", 0) for p in _PROJECTIONS]
        + [("output_dense.kernel", 0)],
        set_heads,
    )
    return [
        structured._fixed(structured._channels(t), repr(call.name))
        for t in call.outputs
    ]


def _prunable_weights(layer):
    try:
        return registry.get_prunable_weights(layer)
    except ValueError:
        return []


# Where a block's call needs the sizes its inputs' shapes leave unknown
# (None), it is traced with this size there. 2, not 1: a size of 1 would
# broadcast against anything and hide a mismatch.
_PLACEHOLDER_SIZE = 2


@contextlib.contextmanager
def _trace(layer, args, kwargs):
    """`layer.call` traced on symbolic tensors (`symbolic_calls`).

    A call that needs the batch or sequence size as a number (keras-hub's
    `TransformerDecoder` builds its causal mask with `ops.arange` of
    `ops.shape(x)[1]`) fails on tensors whose shape has None there; it is
    traced again with `_PLACEHOLDER_SIZE` in their place. Its graph then
    holds what it computed from the sizes as constants, fixed for that
    size, so `rebuild` does not inline it.

    Yields:
        `(inputs, outputs, calls, size)`: `calls` as `sorted_calls` gives
        them, `size` the placeholder size or None.
    """
    with contextlib.ExitStack() as stack:
        size = None
        try:
            traced = stack.enter_context(
                _keras_internals.symbolic_calls(layer, args, kwargs)
            )
        except Exception:  # any failure of the user's `call`
            size = _PLACEHOLDER_SIZE
            traced = stack.enter_context(
                _keras_internals.symbolic_calls(layer, args, kwargs, size)
            )
        inputs, outputs, operations = traced
        calls = structured.sorted_calls(outputs, operations)
        yield inputs, outputs, calls, size


def _block(plan, call):
    """A layer with sublayers: its traced graph, walked by the rules."""
    layer = call.layer
    if (
        isinstance(layer, keras.Model)
        or not layer.built
        or not _keras_internals.sublayers(layer)
    ):
        return structured._no_rule(plan, call)
    if not call.structured:
        return plan.refuse(
            call,
            f"it feeds {call.what}, which is not pruned with "
            "StructuredSparsity, so its inputs are not masked",
        )
    args, kwargs = call.arguments
    with contextlib.ExitStack() as stack:
        try:
            inputs, outputs, calls, size = stack.enter_context(
                _trace(layer, args, kwargs)
            )
        except Exception as error:  # any failure of the user's `call`
            return plan.refuse(
                call,
                f"it feeds {call.what}, whose call kprune cannot trace",
                f"StructuredSparsity has no channel rule for "
                f"{type(layer).__name__} layers, and kprune cannot trace its "
                f"call on symbolic tensors to find its graph "
                f"({type(error).__name__}: {error})",
            )
        if len(outputs) != len(call.outputs):
            return plan.refuse(
                call,
                f"it feeds {call.what}, whose traced call does not match "
                "its outputs",
                "its traced call does not give the outputs of its call",
            )
        # Every pruned weight must belong to a sublayer called in the
        # graph; a layer that runs its sublayers otherwise (a
        # TimeDistributed's `call` of its layer's `call`) is not followed.
        called = {
            id(w)
            for operation, *_ in calls
            if isinstance(operation, L.Layer)
            for w in _prunable_weights(operation)
        }
        missing = [
            w.path for w in _prunable_weights(layer) if id(w) not in called
        ]
        if missing:
            return plan.refuse(
                call,
                f"it feeds {call.what}, whose graph kprune cannot follow",
                f"StructuredSparsity has no channel rule for "
                f"{type(layer).__name__} layers, and its traced call does "
                f"not call the sublayers holding {missing} as layers, so "
                "kprune cannot follow their channels",
            )
        if size is not None:
            # `rebuild` keeps such a block's own `call` and swaps its
            # sublayers, which must therefore be its attributes, and
            # layers kprune resizes whole (not blocks to open up too).
            attributes = {
                id(v) for v in _keras_internals.layer_attributes(layer).values()
            }
            hidden = [
                operation.name
                for operation, *_ in calls
                if isinstance(operation, L.Layer)
                and (
                    id(operation) not in attributes
                    or (
                        structured._rule(operation) is _block
                        and _keras_internals.sublayers(operation)
                    )
                )
            ]
            if hidden:
                return plan.refuse(
                    call,
                    f"it feeds {call.what}, whose sublayers kprune cannot "
                    "replace",
                    f"StructuredSparsity has no channel rule for "
                    f"{type(layer).__name__} layers, its call needs its "
                    "inputs' batch or sequence size, and kprune cannot "
                    f"replace the layers it calls ({hidden}) by smaller ones",
                )
        layouts = {id(t): x for t, x in zip(inputs, call.inputs)}
        plan.walk(calls, layouts, prefix=f"{call.name}/", structured=True)
        inner = []
        for layer_, *_ in calls:
            name = f"{call.name}/{layer_.name}"
            if isinstance(layer_, L.Layer) and _prunable_weights(layer_):
                inner.append(name)
        plan.blocks[call.name] = inner
        return [
            layouts.get(id(t))
            or structured._fixed(structured._channels(t), repr(call.name))
            for t in outputs
        ]


RULES = {
    L.MultiHeadAttention: _attention,
    # Looked up last, most-derived class first: any layer type without a
    # rule of its own.
    L.Layer: _block,
}


@keras.saving.register_keras_serializable("kprune", "ResizedBlock")
class _ResizedBlock(L.Layer):
    """A block whose call needs its inputs' sizes, with smaller sublayers.

    Such a block's traced graph holds what its call computed from the
    placeholder sizes (`_trace`), so it is not inlined: the block itself
    runs, rebuilt from its config, with the sublayers `rebuild` resized in
    place of its own. Its config nests both, so the model loads from a
    `.keras` file (with `kprune` imported) and the block runs on inputs
    of any batch and sequence size.

    Args:
        block: The block's `keras.saving.serialize_keras_object` dict.
        sublayers: Name of each attribute of the block to replace -> the
            layer (or its serialized dict) that replaces it.
    """

    def __init__(self, block, sublayers, **kwargs):
        super().__init__(**kwargs)
        self.block = keras.saving.deserialize_keras_object(block)
        attributes = _keras_internals.layer_attributes(self.block)
        for attribute, sublayer in sublayers.items():
            if isinstance(sublayer, dict):
                sublayer = keras.saving.deserialize_keras_object(sublayer)
            _keras_internals.replace_sublayer(
                self.block, attributes[attribute], sublayer
            )
        self.sublayers = sorted(sublayers)
        self.built = True

    def call(self, *args, **kwargs):
        return self.block(*args, **kwargs)

    def get_config(self):
        attributes = _keras_internals.layer_attributes(self.block)
        return {
            **super().get_config(),
            "block": keras.saving.serialize_keras_object(self.block),
            "sublayers": {
                a: keras.saving.serialize_keras_object(attributes[a])
                for a in self.sublayers
            },
        }


def _clone(operation, name, inner, plan, kept):
    """A copy of `operation` for the rebuilt model, resized by `plan`."""
    if not isinstance(operation, L.Layer):
        # A `keras.ops` call: a fresh operation with a fresh name.
        config = operation.get_config()
        config.pop("name", None)
        try:
            return type(operation).from_config(config)
        except Exception:  # an op that cannot be re-created: share it
            return operation
    config = structured._shrunk_config(plan, name, operation, kept)
    if inner:
        # The block's layers join the model's graph: their names must be
        # unique in it, and may not contain "/".
        config["name"] = name.replace("/", "_")
    return type(operation).from_config(config)


def rebuild(model, plan, kept):
    """`model` (stripped) as a plain functional model, each block of
    `plan.blocks` inlined, every layer resized and its weights sliced.

    Args:
        model: The stripped functional model.
        plan: Its `structured._Plan`.
        kept: `kept(layout)`: the indices of the channels of `layout` that
            stay, or None when all stay.
    """
    tree = keras.tree

    def fresh(t):
        return keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name)

    inputs = tree.map_structure(fresh, model.input)
    tensors = {
        id(old): new
        for old, new in zip(tree.flatten(model.input), tree.flatten(inputs))
    }
    clones, copies = {}, []

    def new_tensor(value):
        if isinstance(value, keras.KerasTensor):
            return tensors[id(value)]
        return value

    def replay(calls, prefix):
        for operation, ins, outs, _, (args, kwargs) in calls:
            name = prefix + operation.name
            new_args, new_kwargs = tree.map_structure(
                new_tensor, (tuple(args), kwargs)
            )
            if name in plan.blocks:
                with _trace(operation, args, kwargs) as (
                    block_ins,
                    block_outs,
                    block_calls,
                    size,
                ):
                    if size is None:
                        for traced, outer in zip(block_ins, ins):
                            tensors[id(traced)] = tensors[id(outer)]
                        replay(block_calls, f"{name}/")
                        result = [tensors[id(t)] for t in block_outs]
                    else:
                        result = resized_block(
                            operation, name, block_ins, block_calls
                        )(*new_args, **new_kwargs)
            else:
                if id(operation) not in clones:
                    clones[id(operation)] = _clone(
                        operation, name, bool(prefix), plan, kept
                    )
                    copies.append((name, operation, clones[id(operation)]))
                clone = clones[id(operation)]
                with _keras_internals.lenient_output_specs([clone]):
                    result = clone(*new_args, **new_kwargs)
            for old, new in zip(outs, tree.flatten(result)):
                tensors[id(old)] = new

    def resized_block(block, name, traced_inputs, calls):
        """`block` with its traced sublayers resized (`_ResizedBlock`)."""
        # The clones are built by a replay of the trace on fresh tensors,
        # which gives each the input shape it gets in the smaller block.
        for t in traced_inputs:
            tensors[id(t)] = keras.KerasTensor(t.shape, dtype=t.dtype)
        replay(calls, f"{name}/")
        sublayers = {
            attribute: clones[id(sublayer)]
            for attribute, sublayer in _keras_internals.layer_attributes(
                block
            ).items()
            if id(sublayer) in clones
        }
        return _ResizedBlock(
            keras.saving.serialize_keras_object(block),
            sublayers,
            name=block.name,
        )

    _, calls, _ = structured._graph(model)
    replay(calls, "")
    outputs = tree.map_structure(lambda t: tensors[id(t)], model.output)
    small = keras.Model(inputs, outputs, name=model.name)
    for name, old, new in copies:
        if isinstance(old, L.Layer) and old.weights:
            new.set_weights(structured._shrunk_weights(plan, name, old, kept))
    return small
