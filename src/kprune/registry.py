"""Which weights of which layers are pruned.

Built-in layers are matched with `isinstance`, so a subclass of `Dense` is
prunable like `Dense`. Layers are looked up most-derived first.

A layer is, for pruning, one of:

- prunable: it declares its weights (`PrunableLayer`), its class is
  registered here (built in, or by `register_prunable_layer`), or it is a
  container (attention, RNN, `Bidirectional`, `TimeDistributed`, or any
  custom layer or model) whose sublayers hold prunable weights and nothing
  unknown. A container is pruned as one unit: one wrapper, one step, a mask
  for each prunable weight of every sublayer inside it.
- nothing to prune: normalization scales, attention scales, fixed
  spectrogram kernels, preprocessing state, or no weights at all. Weights
  that are vectors (biases, scales, learned tokens, position ids) are never
  pruned, so a layer holding only these, besides its sublayers, needs no
  description either.
- rejected: layers whose weights belong to another framework, which no
  Keras optimizer constraint can reach.
- unknown: a layer with weights of its own that nobody has described.
"""

import keras

from kprune._keras_internals import flatten_layers
from kprune._keras_internals import layer_attributes
from kprune._keras_internals import own_variables
from kprune._keras_internals import sublayers
from kprune.api_export import kprune_export
from kprune.prunable_layer import PrunableLayer

# Layer class -> names of the attributes holding the weights to prune
# (dotted paths reach into sublayers), or a function of the layer giving
# those names.
_PRUNABLE_WEIGHTS = {
    keras.layers.Dense: ("kernel",),
    keras.layers.EinsumDense: ("kernel",),
    keras.layers.Conv1D: ("kernel",),
    keras.layers.Conv2D: ("kernel",),
    keras.layers.Conv3D: ("kernel",),
    keras.layers.Conv1DTranspose: ("kernel",),
    keras.layers.Conv2DTranspose: ("kernel",),
    keras.layers.Conv3DTranspose: ("kernel",),
    keras.layers.DepthwiseConv1D: ("kernel",),
    keras.layers.DepthwiseConv2D: ("kernel",),
    keras.layers.SeparableConv1D: ("depthwise_kernel", "pointwise_kernel"),
    keras.layers.SeparableConv2D: ("depthwise_kernel", "pointwise_kernel"),
    keras.layers.Embedding: ("embeddings",),
    keras.layers.ReversibleEmbedding: lambda layer: (
        ("embeddings",)
        if layer.tie_weights
        else ("embeddings", "reverse_embeddings")
    ),
    keras.layers.SimpleRNNCell: ("kernel", "recurrent_kernel"),
    keras.layers.LSTMCell: ("kernel", "recurrent_kernel"),
    keras.layers.GRUCell: ("kernel", "recurrent_kernel"),
    # Their cell class is not public, so the cell's weights are named here.
    keras.layers.ConvLSTM1D: ("cell.kernel", "cell.recurrent_kernel"),
    keras.layers.ConvLSTM2D: ("cell.kernel", "cell.recurrent_kernel"),
    keras.layers.ConvLSTM3D: ("cell.kernel", "cell.recurrent_kernel"),
}

# Layers of optional packages, which kprune does not import, by their
# qualified class name (module and class), matched over the class's MRO
# like the classes above: names of the weights to prune, a function of the
# layer giving them, or `()` for nothing to prune. A registration with
# `register_prunable_layer` takes precedence.
_KERAS_HUB = "keras_hub.src."
_PRUNABLE_BY_NAME = {
    _KERAS_HUB + "layers.modeling.position_embedding.PositionEmbedding": (
        "position_embeddings",
    ),
    # Its output kernel exists only when it does not reuse the token
    # embedding, which the backbone prunes.
    _KERAS_HUB + "layers.modeling.masked_lm_head.MaskedLMHead": lambda layer: (
        ("_intermediate_dense.kernel",)
        + (("_kernel",) if layer.token_embedding is None else ())
    ),
    _KERAS_HUB + "models.deberta_v3.relative_embedding.RelativeEmbedding": (
        "rel_embeddings",
    ),
    # The layers below hold matrices of their own beside sublayers: naming
    # them makes their names the whole of what is pruned, so the kernels of
    # their sublayers are named too. Learned tokens stay dense, as vectors
    # do.
    # The position table; the patch convolution's kernel. Not the class and
    # distillation tokens.
    _KERAS_HUB + "models.deit.deit_layers.DeiTEmbeddings": (
        "position_embedding",
        "patch_embedding.kernel",
    ),
    # The position table the forward pass adds; the patch convolution's
    # kernel. Not `position_embeddings`, the frozen table it is interpolated
    # from, which keras-hub rewrites from it when saving; not the class,
    # mask and register tokens.
    _KERAS_HUB + "models.dinov2.dinov2_layers.DINOV2Embedding": (
        "interpolated_position_embeddings",
        "patch_embeddings.projection.kernel",
    ),
    # The relative position table, as DeBERTa's; the query-key-value and
    # output kernels. Not their biases.
    _KERAS_HUB + "models.swin_transformer.swin_transformer_layers."
    "WindowAttention": (
        "relative_position_bias_table",
        "qkv.kernel",
        "proj.kernel",
    ),
    # The projections' kernels; the relative position table, as DeBERTa's,
    # which only the first attention layer of each stack holds (the others
    # are passed the bias it computes).
    _KERAS_HUB + "models.t5.t5_multi_head_attention.T5MultiHeadAttention": (
        lambda layer: (
            (
                ("relative_attention_bias",)
                if layer.use_relative_attention_bias
                else ()
            )
            + (
                "query_projector.kernel",
                "key_projector.kernel",
                "value_projector.kernel",
                "output_projector.kernel",
            )
        )
    ),
    # The segment encoding (one row per same/other segment, like BERT's
    # segment embedding); the attention kernels, relative position
    # projection included, and the FFN kernels. Not its content, positional
    # and segment attention biases (a bias vector per head).
    _KERAS_HUB + "models.xlnet.xlnet_encoder.XLNetEncoder": (
        "segment_encoding",
        "relative_attention._query_dense.kernel",
        "relative_attention._key_dense.kernel",
        "relative_attention._value_dense.kernel",
        "relative_attention._output_dense.kernel",
        "relative_attention._encoding_dense.kernel",
        "feedforward_intermediate_dense.kernel",
        "feedforward_output_dense.kernel",
    ),
    # Nothing: its rotary frequencies, a vector, are made in `__init__` and
    # the layer is never built, so kprune could not tell that its `build`
    # adds nothing.
    _KERAS_HUB + "models.smollm3.smollm3_layers.SmolLM3RotaryEmbedding": (),
    # Mixture-of-experts FFN kernels, one slice per expert, held as plain
    # weights (their biases are not pruned).
    **{
        _KERAS_HUB + name: (
            "_expert_feedforward_gate_dense",
            "_expert_feedforward_output_dense",
        )
        for name in (
            "models.qwen_moe.qwen_moe_decoder.QwenMoeExperts",
            "models.qwen3_moe.qwen3_moe_decoder.Qwen3MoeExperts",
            "models.qwen3_5_moe.qwen3_5_moe_decoder.Qwen3_5MoeExperts",
        )
    },
    _KERAS_HUB + "models.mixtral.mixtral_decoder.MixtralMoeExperts": (
        "_expert_feedforward_gate_dense",
        "_expert_feedforward_intermediate_dense",
        "_expert_feedforward_output_dense",
    ),
    _KERAS_HUB + "models.gpt_oss.gpt_oss_decoder.GptOssExperts": (
        "gate_up_proj",
        "down_proj",
    ),
    # Normalization scales.
    **{
        _KERAS_HUB + name: ()
        for name in (
            "layers.modeling.rms_normalization.RMSNormalization",
            "models.gemma.rms_normalization.RMSNormalization",
            "models.gemma3.gemma3_layers.RMSNormalization",
            "models.gemma3n.rms_normalization.Gemma3nRMSNorm",
            "models.gpt_oss.gpt_oss_layer_norm.GptOssLayerNormalization",
            "models.llama.llama_layernorm.LlamaLayerNorm",
            "models.mistral.mistral_layer_norm.MistralLayerNormalization",
            "models.mixtral.mixtral_layer_norm.MixtralLayerNormalization",
            "models.phi3.phi3_layernorm.Phi3LayerNorm",
            "models.qwen.qwen_layernorm.QwenLayerNorm",
            "models.qwen3.qwen3_layernorm.Qwen3LayerNorm",
            "models.qwen_moe.qwen_moe_layernorm.QwenMoeLayerNorm",
            "models.qwen3_moe.qwen3_moe_layernorm.Qwen3MoeLayerNorm",
            "models.t5.t5_layer_norm.T5LayerNorm",
        )
    },
}

# Containers whose own weights (if any) are not worth pruning: they are
# pruned through their sublayers (query/key/value/output projections,
# cells, the wrapped layer).
_CONTAINERS = (
    keras.layers.MultiHeadAttention,
    keras.layers.GroupQueryAttention,
    keras.layers.RNN,
    keras.layers.StackedRNNCells,
    keras.layers.Bidirectional,
    keras.layers.TimeDistributed,
    keras.layers.SpectralNormalization,
)

# Layers with weights of which none is worth pruning (scales, shifts,
# statistics, fixed transforms): they are left as they are.
_NOTHING_TO_PRUNE = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.RMSNormalization,
    keras.layers.Normalization,
    keras.layers.PReLU,
    keras.layers.Attention,
    keras.layers.AdditiveAttention,
    keras.layers.MelSpectrogram,
    keras.layers.STFTSpectrogram,
)

# Layers whose weights live outside Keras variables that an optimizer
# constraint can reach -> why.
_REJECTED = {
    keras.layers.JaxLayer: "its weights belong to a JAX function",
    keras.layers.TorchModuleWrapper: "its weights belong to a torch module",
    keras.layers.TFSMLayer: "its weights belong to a loaded SavedModel",
}

# Transposed convolutions store kernels as (..., filters, input channels).
_INPUT_CHANNELS_LAST = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)

PRUNABLE = "prunable"
NOTHING_TO_PRUNE = "nothing to prune"
REJECTED = "rejected"
UNKNOWN = "unknown"


@kprune_export("kprune.registry")
def register_prunable_layer(layer_class, weight_names) -> None:
    """Tells kprune which weights of a layer class to prune.

    For layers you cannot edit (a third-party package's), this does what
    subclassing `kprune.PrunableLayer` does for your own. The registration
    covers subclasses too, and replaces any earlier one for that class,
    built-in classes included. An empty list marks the class as having
    nothing to prune: it is then kept dense inside pruned models instead of
    failing the call.

    Args:
        layer_class: A subclass of `keras.layers.Layer`.
        weight_names: Names of the attributes that hold the weights to
            prune, such as `["kernel"]`; a dotted name such as
            `"cell.kernel"` reaches into a sublayer.

    Raises:
        ValueError: If `layer_class` is not a layer class or a name is not
            a non-empty string.

    Example:

    ```python
    # A layer of another package holding `self.table` and `self.scale`.
    kprune.registry.register_prunable_layer(their_package.Lookup, ["table"])
    pruned = kprune.prune_low_magnitude(model)
    ```
    """
    if not (
        isinstance(layer_class, type)
        and issubclass(layer_class, keras.layers.Layer)
    ):
        raise ValueError(
            "Argument `layer_class` must be a subclass of "
            f"`keras.layers.Layer`. Received: layer_class={layer_class!r}"
        )
    if isinstance(weight_names, str):
        weight_names = [weight_names]
    names = tuple(weight_names)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            "Argument `weight_names` must be a list of attribute names such "
            f"as ['kernel']. Received: weight_names={weight_names!r}"
        )
    _PRUNABLE_WEIGHTS[layer_class] = names


def input_channel_axis(layer) -> int:
    """The input-channel axis of `layer`'s kernels, along which N:M groups
    run: -2 for Dense and Conv kernels, -1 for transposed convolutions,
    and for `EinsumDense` the last kernel axis its equation contracts with
    the input (the query kernel `"abc,cde->abde"` of attention reads its
    inputs on axis 0, not on the heads axis -2)."""
    if isinstance(layer, _INPUT_CHANNELS_LAST):
        return -1
    if isinstance(layer, keras.layers.EinsumDense):
        return _contracted_axis(layer.equation)
    return -2


def weight_input_axis(layer, weight) -> int:
    """The input-channel axis of `weight`, a prunable weight of `layer`.

    It is the axis of the layer that owns the weight, which for a layer
    that holds sublayers (`MultiHeadAttention` and its `EinsumDense`
    projections, a keras-hub block) is the sublayer, not `layer`.
    """
    for owner in flatten_layers(layer, include_self=True):
        if any(v is weight for v in own_variables(owner)):
            return input_channel_axis(owner)
    return input_channel_axis(layer)


def einsum_contracted_axes(equation) -> list:
    """The kernel axes that an `EinsumDense` equation `"x,w->y"` sums with
    its input, in kernel order: the kernel's input axes."""
    inputs, output = equation.replace(" ", "").split("->")
    source, kernel = inputs.split(",")
    return [
        i
        for i, letter in enumerate(kernel)
        if letter in source and letter not in output
    ]


def _contracted_axis(equation):
    kernel = equation.replace(" ", "").split("->")[0].split(",")[1]
    contracted = einsum_contracted_axes(equation)
    # With several contracted axes (the output kernel "abcd,cde->abe"),
    # the last one runs along consecutive inputs of the flattened input.
    return (contracted[-1] if contracted else len(kernel) - 2) - len(kernel)


def _registered_names(layer):
    for cls in type(layer).__mro__:
        names = _PRUNABLE_WEIGHTS.get(cls)
        if names is None:
            names = _PRUNABLE_BY_NAME.get(
                f"{cls.__module__}.{cls.__qualname__}"
            )
        if names is not None:
            return tuple(names(layer)) if callable(names) else names
    return None


def _rejection(layer):
    for cls, why in _REJECTED.items():
        if isinstance(layer, cls):
            return why
    return None


def supports_custom(layer) -> bool:
    """Whether `layer` declares its prunable weights itself."""
    return isinstance(layer, PrunableLayer) or callable(
        getattr(layer, "get_prunable_weights", None)
    )


def _own_weights(layer) -> list:
    inner = {id(w) for sub in sublayers(layer) for w in sub.weights}
    return [w for w in layer.weights if id(w) not in inner]


def _never_pruned(weight) -> bool:
    """Whether `weight`, held by a layer itself, is not worth pruning
    whatever its layer: a vector (at most one axis longer than 1: a bias,
    a scale, a learned class or mask token, per-head attention sinks,
    position ids, rotary frequencies)."""
    return sum(dim != 1 for dim in weight.shape) <= 1


def _undescribed_weights(layer) -> list:
    """`layer`'s own weights that may be worth pruning, which only a
    registration can tell."""
    return [w for w in _own_weights(layer) if not _never_pruned(w)]


def _status_and_culprit(layer):
    """`(status, layer to blame when unknown or rejected)`."""
    if supports_custom(layer) or _registered_names(layer):
        return PRUNABLE, None
    if _registered_names(layer) == ():
        return NOTHING_TO_PRUNE, None
    why = _rejection(layer)
    if why is not None:
        return REJECTED, layer
    if isinstance(layer, _NOTHING_TO_PRUNE):
        return NOTHING_TO_PRUNE, None
    known_container = isinstance(layer, _CONTAINERS)
    if not layer.built and not known_container:
        # An unbuilt layer may still create weights: only one that cannot
        # (no custom `build`, no sublayers) is known to be weightless.
        if (
            layer.weights
            or sublayers(layer)
            or (type(layer).build is not keras.layers.Layer.build)
        ):
            return UNKNOWN, layer
        return NOTHING_TO_PRUNE, None
    if not known_container and _undescribed_weights(layer):
        return UNKNOWN, layer
    statuses = [_status_and_culprit(sub) for sub in sublayers(layer)]
    for status, culprit in statuses:
        if status in (UNKNOWN, REJECTED):
            return status, culprit
    if any(status == PRUNABLE for status, _ in statuses):
        return PRUNABLE, None
    if known_container and not layer.built and not statuses:
        # Attention layers create their projections when built.
        return PRUNABLE, None
    return NOTHING_TO_PRUNE, None


def status(layer) -> str:
    """`"prunable"`, `"nothing to prune"`, `"rejected"` or `"unknown"`."""
    return _status_and_culprit(layer)[0]


def is_prunable(layer) -> bool:
    """Whether `prune_low_magnitude` knows which weights of `layer` to prune."""
    return status(layer) == PRUNABLE


def has_nothing_to_prune(layer) -> bool:
    """Whether `layer` is known to have no weight worth pruning."""
    return status(layer) == NOTHING_TO_PRUNE


def unsupported_layer_error(layer) -> ValueError:
    _, culprit = _status_and_culprit(layer)
    culprit = culprit or layer
    inside = (
        ""
        if culprit is layer
        else f" (inside layer {layer.name!r} of class {type(layer).__name__})"
    )
    why = _rejection(culprit)
    if why is not None:
        return ValueError(
            f"Layer {culprit.name!r} of class {type(culprit).__name__}"
            f"{inside} cannot be pruned: {why}, out of reach of the Keras "
            "optimizer that kprune prunes through. Leave it out of pruning: "
            "prune only the other layers with the `layers=` argument of "
            "`kprune.prune_low_magnitude`, or wrap them yourself with "
            "`keras.models.clone_model` and a `clone_function`."
        )
    name = type(culprit).__name__
    attributes = weight_attributes(culprit)
    if attributes:
        listed = ", ".join(
            f"`{attribute}` {tuple(weight.shape)}"
            for attribute, weight in attributes
        )
        weights = f"has weights of its own ({listed}), but"
        if not culprit.built:
            # A layer may make weights in `__init__` and never be built, as
            # keras-hub's SmolLM3 rotary embedding does (the table lists it).
            weights = (
                f"has weights of its own ({listed}) and is not built "
                "(its own `build` may make more), so"
            )
        inner = _sublayer_weight_names(culprit)
        undescribed = {id(w) for w in _undescribed_weights(culprit)}
        example = [
            attribute
            for attribute, weight in attributes
            if id(weight) in undescribed
        ] + inner
        build = ""
    else:
        weights = "is not built yet, so"
        example = ["<its weight attributes>"]
        inner = []
        build = " Build it first (call it on an input) to see its weights."
    keep = "keep the names of the weights worth pruning"
    if inner:
        # A registration replaces kprune's choice for the whole layer.
        keep += (
            ", its sublayers' included: the dotted names are those kprune "
            "prunes in them, and without them they stay dense"
        )
    return ValueError(
        f"Layer {culprit.name!r} of class {name}{inside} {weights} kprune "
        "does not know which of them to prune. Make it prunable either by "
        "subclassing `kprune.PrunableLayer` and returning the weights to "
        "prune from `get_prunable_weights()`, or, for a class you cannot "
        "edit, with "
        f"`kprune.registry.register_prunable_layer({name}, {example!r})` "
        f"({keep}; `[]` keeps it dense).{build} Or leave it out of "
        "pruning: choose the layers with "
        "the `layers=` argument of `kprune.prune_low_magnitude`, or with "
        "`keras.models.clone_model` and a `clone_function`."
    )


def _sublayer_weight_names(layer) -> list:
    """Dotted names (`"query_dense.kernel"`) of the weights kprune prunes in
    the sublayers that `layer` holds as attributes."""
    names, seen = [], set()
    for attribute, value in layer_attributes(layer).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if supports_custom(value) or status(value) != PRUNABLE:
            continue
        inner = _registered_names(value)
        if inner is None:
            inner = _sublayer_weight_names(value)
        names.extend(f"{attribute}.{name}" for name in inner)
    return names


def weight_attributes(layer) -> list:
    """`(attribute name, variable)` for each weight `layer` holds itself.

    The names are those `register_prunable_layer` takes: the public
    property (`kernel`) where the variable is stored privately (`_kernel`),
    else the attribute itself. Variables not held in an attribute (in a
    list, say) are named by their path.
    """
    found = []
    attributes = vars(layer)
    for weight in _own_weights(layer):
        names = [n for n, v in attributes.items() if v is weight]
        if not names:
            found.append((weight.path, weight))
            continue
        name = names[0]
        public = name.lstrip("_")
        try:
            if public != name and getattr(layer, public, None) is weight:
                name = public
        except Exception:  # a property that fails on this layer
            pass
        found.append((name, weight))
    return found


def _resolve(layer, path):
    value = layer
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            names = [name for name, _ in weight_attributes(layer)]
            raise ValueError(
                f"Layer {layer.name!r} of class {type(layer).__name__} has no "
                f"weight {path!r}, which is registered as prunable for its "
                f"class. Its own weights are {names}. Register the names of "
                "the weights to prune with "
                "`kprune.registry.register_prunable_layer`."
            )
    return value


def get_prunable_weights(layer) -> list:
    """The weight variables of a built `layer` that are pruned.

    Args:
        layer: A built Keras layer.

    Returns:
        A list of variables, without duplicates, in the order found.

    Raises:
        ValueError: If the layer, or a layer inside it, has weights that
            kprune does not know how to prune.
    """
    if supports_custom(layer):
        return list(layer.get_prunable_weights())
    names = _registered_names(layer)
    if names:
        return [_resolve(layer, name) for name in names]
    status_, _ = _status_and_culprit(layer)
    if status_ in (UNKNOWN, REJECTED):
        raise unsupported_layer_error(layer)
    if status_ == NOTHING_TO_PRUNE or isinstance(layer, _NOTHING_TO_PRUNE):
        return []
    weights, seen = [], set()
    for sub in sublayers(layer):
        if not sub.built and not sub.weights:
            # Never called by its built parent (keras-hub's EfficientNet
            # blocks make a squeeze-excite conv they skip at ratio 0).
            continue
        for weight in get_prunable_weights(sub):
            if id(weight) not in seen:
                seen.add(id(weight))
                weights.append(weight)
    return weights
