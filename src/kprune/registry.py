"""Which weights of which layers are pruned.

Built-in layers are matched with `isinstance`, so a subclass of `Dense` is
prunable like `Dense`. Layers are looked up most-derived first.
"""

import keras

from kprune.prunable_layer import PrunableLayer

# Layer class -> names of the attributes holding the weights to prune.
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
}

# Layers with weights of which none is worth pruning (scales, shifts,
# statistics): they are left as they are.
_NOTHING_TO_PRUNE = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.Normalization,
    keras.layers.PReLU,
)


# Transposed convolutions store kernels as (..., filters, input channels).
_INPUT_CHANNELS_LAST = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)


def input_channel_axis(layer) -> int:
    """The input-channel axis of `layer`'s kernels, along which N:M groups
    run: -2 for Dense and Conv kernels, -1 for transposed convolutions."""
    return -1 if isinstance(layer, _INPUT_CHANNELS_LAST) else -2


def _registered_names(layer):
    for cls in type(layer).__mro__:
        if cls in _PRUNABLE_WEIGHTS:
            return _PRUNABLE_WEIGHTS[cls]
    return None


def supports_custom(layer) -> bool:
    """Whether `layer` declares its prunable weights itself."""
    return isinstance(layer, PrunableLayer) or callable(
        getattr(layer, "get_prunable_weights", None)
    )


def is_prunable(layer) -> bool:
    """Whether `prune_low_magnitude` knows which weights of `layer` to prune."""
    return supports_custom(layer) or _registered_names(layer) is not None


def has_nothing_to_prune(layer) -> bool:
    """Whether `layer` is known to have no weight worth pruning."""
    return isinstance(layer, _NOTHING_TO_PRUNE) or (
        layer.built and not layer.weights
    )


def unsupported_layer_error(layer) -> ValueError:
    return ValueError(
        f"Layer {layer.name!r} of class {type(layer).__name__} has weights, "
        "but kprune does not know which of them to prune. Make it prunable "
        "by subclassing `kprune.PrunableLayer` and returning the weights to "
        "prune from `get_prunable_weights()`, or leave it out of pruning "
        "(prune only the layers you choose with `keras.models.clone_model` "
        "and a `clone_function`)."
    )


def get_prunable_weights(layer) -> list:
    """The weight variables of a built `layer` that are pruned.

    Args:
        layer: A built Keras layer.

    Returns:
        A list of variables.

    Raises:
        ValueError: If the layer is neither registered nor a
            `PrunableLayer`.
    """
    if supports_custom(layer):
        return list(layer.get_prunable_weights())
    names = _registered_names(layer)
    if names is None:
        raise unsupported_layer_error(layer)
    return [getattr(layer, name) for name in names]
