"""Every use kprune makes of Keras's private API, and why.

Keras 3 has no public API for the few things below; each function says what
it reads or writes and which Keras file defines it (Keras 3.15,
`keras/src/...`). Everything else in kprune uses public Keras only, which
`tests/test_keras_internals.py` checks. When Keras changes one of these,
this module is the one to fix.
"""

import contextlib


def flatten_layers(layer, include_self=False, recursive=True) -> list:
    """The layers `layer` tracks, each once, in Keras's order.

    `Model.layers` lists only a model's direct layers, and a `Layer` that
    holds sublayers (a keras-hub block, an attention layer) has no public
    list at all; `Layer._flatten_layers` (layers/layer.py) walks the
    tracked sublayers of any layer, nested ones included.
    """
    return list(
        layer._flatten_layers(include_self=include_self, recursive=recursive)
    )


def sublayers(layer) -> list:
    """The layers `layer` tracks directly (see `flatten_layers`)."""
    return flatten_layers(layer, include_self=False, recursive=False)


def call_count(layer) -> int:
    """How many times `layer` was called on symbolic inputs.

    The public `layer.input` and `layer.output` describe the first call
    only; the calls themselves are the layer's `_inbound_nodes`
    (ops/operation.py).
    """
    return len(layer._inbound_nodes)


def calls(layer) -> list:
    """`(input tensors, output tensors, args, kwargs)` of each symbolic
    call of `layer`.

    The public `layer.input` and `layer.output` describe the first call
    only; each call is a `Node` in the layer's `_inbound_nodes`
    (ops/operation.py), whose `input_tensors` are the call's tensor
    arguments, flattened, `outputs` its outputs, and `arguments` the
    arguments as passed (ops/node.py, ops/symbolic_arguments.py).
    """
    return [
        (
            list(node.input_tensors),
            list(node.outputs),
            node.arguments.args,
            node.arguments.kwargs,
        )
        for node in layer._inbound_nodes
    ]


@contextlib.contextmanager
def symbolic_calls(layer, args, kwargs, size=None):
    """Runs `layer.call` on symbolic tensors so its sublayers' calls are
    recorded, and forgets them afterwards.

    Calling a layer on `KerasTensor`s records one `Node` for the call but
    nothing inside it: `Layer.compute_output_spec` (layers/layer.py) runs
    `call` on backend placeholders. Calling `layer.call` itself on fresh
    `KerasTensor`s makes each sublayer and `keras.ops` call inside it
    record its own `Node` (ops/node.py), which is the graph of the block.
    Keras has no public way to undo a call: the records live in each
    operation's `_inbound_nodes` and `_outbound_nodes`, which are cut back
    to their length before the trace on exit, so the model is unchanged.

    Args:
        layer: A built layer.
        args, kwargs: The arguments of a call of `layer`; each
            `KerasTensor` in them is replaced by a fresh one of the same
            shape and dtype.
        size: If not None, the fresh tensors have this size where the
            shape has None (an unknown batch or sequence size), for a
            `call` that needs the sizes (`ops.shape`) as numbers; what it
            computes from them is then fixed for that size.

    Yields:
        `(inputs, outputs, operations)`: the fresh input tensors (in the
        order of the call's flattened tensor arguments), the flattened
        outputs of `layer.call`, and the operations called between them.
    """
    import keras

    def fresh(value):
        if isinstance(value, keras.KerasTensor):
            shape = value.shape
            if size is not None:
                shape = tuple(size if d is None else d for d in shape)
            return keras.KerasTensor(shape, dtype=value.dtype)
        return value

    args, kwargs = keras.tree.map_structure(fresh, (tuple(args), kwargs))
    inputs = [
        v
        for v in keras.tree.flatten((args, kwargs))
        if isinstance(v, keras.KerasTensor)
    ]
    known = flatten_layers(layer)
    lengths = [
        (op, len(op._inbound_nodes), len(op._outbound_nodes)) for op in known
    ]
    try:
        with lenient_output_specs(known):
            outputs = keras.tree.flatten(layer.call(*args, **kwargs))
        operations, seen, stack = [], set(), list(outputs)
        while stack:
            history = getattr(stack.pop(), "_keras_history", None)
            operation = history and history.operation
            if operation is None or id(operation) in seen:
                continue
            seen.add(id(operation))
            operations.append(operation)
            for node in operation._inbound_nodes:
                stack.extend(node.input_tensors)
        yield inputs, outputs, operations
    finally:
        for op, inbound, outbound in lengths:
            del op._inbound_nodes[inbound:]
            del op._outbound_nodes[outbound:]


@contextlib.contextmanager
def lenient_output_specs(layers):
    """Lets `layers` be called on `KerasTensor`s with keyword arguments
    set to None that their `compute_output_spec` does not take.

    A layer called on `KerasTensor`s infers its outputs with
    `compute_output_spec` (`Operation.symbolic_call`, ops/operation.py),
    which gets the call's arguments. Some layers pass more: keras-hub's
    `CachedMultiHeadAttention` takes `cache=None` and
    `cache_update_index=None`, which `MultiHeadAttention.compute_output_spec`
    does not take, so its symbolic call fails where its eager call works.
    Keras has no public hook for this; while the context is open, each
    layer's `compute_output_spec` is shadowed by an instance attribute that
    drops such arguments (None is their default), and it is removed on
    exit.
    """
    import inspect

    shadowed = []
    for layer in layers:
        method = layer.compute_output_spec
        try:
            parameters = inspect.signature(method).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            continue

        def spec(*args, _method=method, _parameters=parameters, **kwargs):
            kwargs = {
                k: v
                for k, v in kwargs.items()
                if v is not None or k in _parameters
            }
            return _method(*args, **kwargs)

        object.__setattr__(layer, "compute_output_spec", spec)
        shadowed.append(layer)
    try:
        yield
    finally:
        for layer in shadowed:
            vars(layer).pop("compute_output_spec")


def layer_attributes(layer) -> dict:
    """The attributes of `layer` that hold layers, by name.

    On the torch backend a layer is a `torch.nn.Module`, whose
    `__setattr__` keeps sublayers apart, not in `__dict__`; its public
    `named_children` lists them.
    """
    import keras

    found = dict(vars(layer))
    if hasattr(layer, "named_children"):
        found.update(layer.named_children())
    return {k: v for k, v in found.items() if isinstance(v, keras.layers.Layer)}


def copy_legacy_input_shape(source, target) -> None:
    """Gives `target` the `input_shape=` that `source` was created with.

    `Sequential` makes its input from its first layer's legacy
    `input_shape=` argument, which `Layer.__init__` keeps only as
    `_input_shape_arg` (layers/layer.py, models/sequential.py). Passing it
    to `target`'s constructor instead would warn a second time about an
    argument the user already passed.
    """
    shape = getattr(source, "_input_shape_arg", None)
    if shape is not None:
        target._input_shape_arg = shape


def set_call_signature(layer, signature, like) -> None:
    """Makes Keras bind `layer`'s calls to `signature`.

    `Layer.__init__` (layers/layer.py) derives these attributes from the
    signature of `layer.call`, and `Layer.__call__` binds each call's
    arguments with them: which are tensors, which take masks, which are
    call-context arguments such as `training`. There is no public way to
    declare them, so a wrapper whose `call(*args, **kwargs)` forwards to
    the layer `like` sets them from `signature` (which takes `training`),
    and takes `like`'s context arguments and non-tensor positional
    arguments.
    """
    layer._call_signature = signature
    layer.call_signature_parameters = list(signature.parameters)
    layer._call_has_training_arg = "training" in signature.parameters
    layer._call_has_mask_arg = "mask" in signature.parameters
    layer._call_context_args = set(like._call_context_args) | {"training"}
    layer._call_has_context_arg = {
        arg: arg in signature.parameters for arg in layer._call_context_args
    }
    layer._allow_non_tensor_positional_args = (
        like._allow_non_tensor_positional_args
    )


def own_variables(layer) -> list:
    """The variables `Layer.load_own_variables` assigns, in its order.

    They are the layer's own variables, not those of its sublayers, which
    the public `layer.variables` includes; `Layer.load_own_variables` and
    `save_own_variables` (layers/layer.py) read `_trainable_variables`
    then `_non_trainable_variables`.
    """
    return layer._trainable_variables + layer._non_trainable_variables


def set_untracked(layer, name, value) -> None:
    """Sets attribute `name` of `layer` without Keras tracking it.

    `Layer.__setattr__` (layers/layer.py) tracks layers and variables set
    as attributes, and refuses new ones once the layer is built. Use it
    only for values Keras tracks already (through a model's graph, say).
    """
    object.__setattr__(layer, name, value)


def replace_sublayer(parent, old, new) -> None:
    """Points every reference that built layer `parent` holds to sublayer
    `old` at `new`, Keras's list of tracked sublayers included.

    Keras has no public way to swap a sublayer of a built layer: its
    attributes are locked (see `set_untracked`), and the tracked sublayers
    are the list `_layers` (layers/layer.py), an attribute like any other,
    so it is updated in the same pass and tracking stays exact.
    """

    def swap(container):
        if isinstance(container, list):
            for i, value in enumerate(container):
                if value is old:
                    list.__setitem__(container, i, new)
        elif isinstance(container, dict):
            for key, value in container.items():
                if value is old:
                    dict.__setitem__(container, key, new)

    for name, value in list(vars(parent).items()):
        if value is old:
            set_untracked(parent, name, new)
        elif isinstance(value, tuple) and any(v is old for v in value):
            set_untracked(
                parent, name, tuple(new if v is old else v for v in value)
            )
        else:
            swap(value)


def raw_value(variable):
    """The value of `variable` in its own dtype.

    Inside a mixed-precision layer's call, Keras casts every variable read
    to the compute dtype when the variable's `_autocast` flag is set
    (`Variable._maybe_autocast`, backend/common/variables.py); writing such
    a read back would round the float32 weights to float16. The public API
    has no uncast read, and the `AutocastScope` that turns the cast off is
    not public either, so the flag is cleared for the read. (Replica
    threads of a `MirroredStrategy` run one at a time, so no other read
    sees it cleared.)
    """
    autocast = variable._autocast
    variable._autocast = False
    try:
        return variable.value
    finally:
        variable._autocast = autocast


def set_gptq_encoding(layer, config, levels, scales, zeros, groups) -> None:
    """Puts a `Dense` or `EinsumDense` layer in Keras's calibrated GPTQ
    state with the given encoding of its kernel.

    `layer.quantize("gptq", config)` (public) creates the GPTQ variables
    but keeps the float kernel until Keras's own calibration fills them
    (`GPTQ.quantize_and_correct_layer`, quantizers/gptq.py). kprune
    computes the encoding itself, so it does what that method does at its
    end: assign `quantized_kernel`, `kernel_scale`, `kernel_zero` and
    `g_idx`, delete `_kernel` and set `is_gptq_calibrated`
    (layers/core/dense.py, einsum_dense.py `_gptq_build`, `_gptq_call`).
    """
    layer.quantize("gptq", config=config)
    layer.quantized_kernel.assign(levels)
    layer.kernel_scale.assign(scales)
    layer.kernel_zero.assign(zeros)
    layer.g_idx.assign(groups)
    del layer._kernel
    layer.is_gptq_calibrated = True


def after_quantize(model) -> None:
    """What `Model.quantize` does after quantizing layers
    (models/model.py): drop the compiled functions, and on torch retrack
    each layer's variables (`Model._post_quantize`), since the deleted
    float kernels are still referenced by `torch_params`."""
    model.train_function = None
    model.test_function = None
    model.predict_function = None
    model._post_quantize(None)
