"""Structured pruning: whole Dense units and Conv filters, then shrinking.

`StructuredSparsity` prunes whole output units of Dense layers and whole
filters of convolutions, ranked by the L1 or L2 norm of their kernel
slice, following a schedule during training. A removed unit also has the
weights that read it in the next layers masked, so the masked model
computes exactly what the model without that unit computes, and
`shrink_model` then removes the units for real: it returns a smaller plain
Keras model with the same predictions.

A layer's units can be removed when every path from its output reaches
Dense or Conv layers through layers that act per channel
(BatchNormalization, activations, dropout, pooling, padding, Flatten).
Otherwise the layer keeps all its units, and `structured_plan` says why:
model outputs (their units are the model's outputs), `Add`, `Concatenate`
and other merges (residual branches would need one shared mask for every
branch, which this version does not compute, so they are left alone),
`Reshape`, `LayerNormalization` (which mixes channels), softmax over
channels, shared layers, nested models, `channels_first` layers.
"""

import keras
import numpy as np
from keras import layers as L
from keras import ops

from kprune import masking
from kprune.groups import MaskGroup
from kprune.schedules import PruningSchedule
from kprune.wrapper import PruneLowMagnitude
from kprune.wrapper import collect_pruned_layers

_UNIT_LAYERS = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D)
_TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
# Layers without weights that act on each channel separately.
_PER_CHANNEL = (
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
)
_CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")
NORMS = ("l1", "l2")


@keras.saving.register_keras_serializable(package="kprune")
class StructuredSparsity(PruningSchedule):
    """Prunes whole Dense units and Conv filters, following `schedule`.

    At each step where `schedule` prunes, every Dense or Conv layer whose
    units can be removed (see `kprune.structured_plan`) keeps the
    `kept_count(units, sparsity)` units of largest kernel norm and masks
    the others, together with the weights of the following layers that
    read them. Give it to the whole model, then call `kprune.shrink_model`
    to get a smaller plain model. Works with `UpdatePruningStep` (which
    connects the layers when training starts), `strip_pruning` (which
    keeps the zeros in place) and saving.

    Args:
        schedule: A `kprune.PruningSchedule`: when to prune and the
            fraction of units removed from each layer.
        norm: `"l2"` (default) or `"l1"`: the norm of a unit's kernel slice
            that ranks it.

    Example:

    ```python
    pruned = kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.StructuredSparsity(
            kprune.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=1000)
        ),
    )
    # ... fit with kprune.UpdatePruningStep() ...
    small = kprune.shrink_model(pruned)
    ```
    """

    needs_group = True

    def __init__(self, schedule: PruningSchedule, norm: str = "l2"):
        if not isinstance(schedule, PruningSchedule) or getattr(
            schedule, "needs_group", False
        ):
            raise ValueError(
                "Argument `schedule` must be a `kprune.PruningSchedule` such "
                "as `kprune.PolynomialDecay(...)`, not one that prunes "
                f"across layers. Received: schedule={schedule!r}"
            )
        if norm not in NORMS:
            raise ValueError(
                f'Argument `norm` must be "l1" or "l2". Received: norm={norm!r}'
            )
        self.schedule = schedule
        self.norm = norm

    def __call__(self, step):
        return self.schedule(step)

    def get_config(self) -> dict:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "norm": self.norm,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(
            config["schedule"]
        )
        return cls(**config)

    def __eq__(self, other):
        return (
            type(self) is type(other)
            and self.schedule == other.schedule
            and self.norm == other.norm
        )

    def __hash__(self):
        return hash((type(self), self.schedule, self.norm))

    def __repr__(self):
        return f"StructuredSparsity({self.schedule!r}, norm={self.norm!r})"


def _base(layer):
    return layer.layer if isinstance(layer, PruneLowMagnitude) else layer


def _is_unit_layer(layer):
    layer = _base(layer)
    return (
        isinstance(layer, _UNIT_LAYERS)
        and not isinstance(layer, _TRANSPOSED)
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and getattr(layer, "groups", 1) == 1
    )


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


def _passes_channels(layer):
    layer = _base(layer)
    if isinstance(layer, L.BatchNormalization):
        rank = len(layer.input.shape)
        return layer.axis in (-1, rank - 1)
    if isinstance(layer, _PER_CHANNEL):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return False
        return _activation_name(layer) not in _CHANNEL_MIXING_ACTIVATIONS
    return False


class _Plan:
    """Which units of which layers can be removed, read from the graph.

    Attributes:
        reasons: Layer name -> `None` if its units can be removed, else the
            reason they are kept.
        consumers: Producer name -> list of `(layer name, repeats)`: the
            Dense/Conv layers reading its channels, each channel repeated
            `repeats` times after a Flatten.
        per_channel: Producer name -> list of `(layer name, repeats)` of
            BatchNormalization layers on the way.
    """

    def __init__(self, model, structured_names):
        self.reasons = {}
        self.consumers = {}
        self.per_channel = {}
        if not isinstance(model, keras.Model) or not hasattr(model, "layers"):
            return
        top = list(model.layers)
        readers = {}
        shared = set()
        for layer in top:
            try:
                inputs = layer.input
            except (AttributeError, ValueError):
                inputs = None
            # `layer.input` is the first call's input even when a layer
            # is called several times; only the node count tells.
            if inputs is None or len(getattr(layer, "_inbound_nodes", ())) > 1:
                shared.add(_base(layer).name)
                continue
            if not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            for tensor in inputs:
                readers.setdefault(id(tensor), []).append((layer, len(inputs)))
        outputs = {id(t) for t in getattr(model, "outputs", None) or []}
        for layer in top:
            base = _base(layer)
            if not _is_unit_layer(layer):
                continue
            name = base.name
            if name not in structured_names:
                continue
            reason = None
            if name in shared:
                reason = (
                    "its connections are unknown: it is shared (called more "
                    "than once) or inside a subclassed model"
                )
            elif _activation_name(base) in _CHANNEL_MIXING_ACTIVATIONS:
                reason = "its softmax mixes its units"
            else:
                reason = self._follow(
                    name, layer.output, 1, readers, outputs, structured_names
                )
            self.reasons[name] = reason
            if reason is not None:
                self.consumers.pop(name, None)
                self.per_channel.pop(name, None)

    def _follow(self, name, tensor, repeats, readers, outputs, structured):
        if id(tensor) in outputs:
            return "its output is a model output"
        users = readers.get(id(tensor), [])
        if not users:
            return "its output is not used by the model's top-level layers"
        for user, n_inputs in users:
            base = _base(user)
            what = f"{base.name!r} ({type(base).__name__})"
            if n_inputs != 1:
                return (
                    f"its output meets other tensors in {what}; a residual "
                    "or merged branch would need one mask shared by every "
                    "branch, which kprune does not compute"
                )
            if _is_unit_layer(user):
                if base.name not in structured:
                    return (
                        f"it feeds {what}, which is not pruned with "
                        "StructuredSparsity, so its inputs are not masked"
                    )
                self.consumers.setdefault(name, []).append((base.name, repeats))
                continue
            if isinstance(base, L.Flatten):
                if base.data_format != "channels_last":
                    return f"it feeds {what} in channels_first order"
                spatial = base.input.shape[1:-1]
                if None in spatial:
                    return f"{what} has an unknown input size"
                reason = self._follow(
                    name,
                    user.output,
                    repeats * int(np.prod(spatial, dtype=np.int64)),
                    readers,
                    outputs,
                    structured,
                )
            elif _passes_channels(user):
                if isinstance(base, L.BatchNormalization):
                    self.per_channel.setdefault(name, []).append(
                        (base.name, repeats)
                    )
                reason = self._follow(
                    name, user.output, repeats, readers, outputs, structured
                )
            else:
                reason = f"it feeds {what}, which kprune cannot rewire"
            if reason is not None:
                return reason
        return None

    def removable(self):
        return [name for name, reason in self.reasons.items() if reason is None]


def _structured_names(model):
    return {
        wrapper.layer.name
        for wrapper in collect_pruned_layers(model)
        if isinstance(wrapper.pruning_schedule, StructuredSparsity)
    }


def structured_plan(model) -> dict:
    """Which layers `StructuredSparsity` can shrink, and why not the others.

    Args:
        model: A Sequential or functional model pruned with
            `kprune.StructuredSparsity`.

    Returns:
        A dict of Dense/Conv layer name to `None` when its units can be
        removed, or to a sentence saying why they are all kept.

    Example:

    ```python
    for name, reason in kprune.structured_plan(pruned).items():
        print(name, reason or "shrinks")
    ```
    """
    return dict(_Plan(model, _structured_names(model)).reasons)


class StructuredGroup(MaskGroup):
    """Computes the masks of the `StructuredSparsity` layers of a model."""

    def __init__(self, model, wrappers):
        super().__init__(wrappers)
        first = self.leader.pruning_schedule
        for wrapper in self.wrappers:
            if wrapper.pruning_schedule != first:
                raise ValueError(
                    "Layers pruned with StructuredSparsity must share one "
                    f"schedule, but layer {self.leader.name!r} has {first!r} "
                    f"and layer {wrapper.name!r} has "
                    f"{wrapper.pruning_schedule!r}."
                )
        self.norm = first.norm
        names = {w.layer.name for w in self.wrappers}
        self.plan = _Plan(model, names)
        self.producers = set(self.plan.removable())
        # Masks are computed producers first: the model's top-level layers
        # are in topological order.
        rank = {id(layer): i for i, layer in enumerate(model.layers)}
        self.order = sorted(
            range(len(self.entries)),
            key=lambda i: rank.get(id(self.entries[i][0]), len(rank)),
        )
        # Consumer name -> (producer name, repeats).
        self.inputs = {}
        for producer in self.producers:
            for consumer, repeats in self.plan.consumers[producer]:
                self.inputs[consumer] = (producer, repeats)

    def compute_masks(self, weights, sparsity):
        out_masks = {}
        masks = [None] * len(weights)
        thresholds = [None] * len(weights)
        for position in self.order:
            wrapper, _ = self.entries[position]
            weight = weights[position]
            name = wrapper.layer.name
            threshold = ops.zeros((), "float32")
            if not _is_unit_layer(wrapper) or len(weight.shape) < 2:
                masks[position] = ops.ones(weight.shape, "bool")
                thresholds[position] = threshold
                continue
            units = weight.shape[-1]
            in_mask = ops.ones((weight.shape[-2],), "bool")
            if name in self.inputs:
                producer, repeats = self.inputs[name]
                in_mask = ops.tile(out_masks[producer], (repeats,))
            shape_in = [1] * (len(weight.shape) - 2) + [weight.shape[-2], 1]
            in_mask = ops.reshape(in_mask, shape_in)
            out_mask = ops.ones((units,), "bool")
            if name in self.producers:
                values = ops.where(
                    in_mask, ops.cast(weight, "float32"), ops.zeros(())
                )
                values = ops.reshape(values, (-1, units))
                if self.norm == "l1":
                    scores = ops.sum(ops.abs(values), axis=0)
                else:
                    scores = ops.sqrt(ops.sum(ops.square(values), axis=0))
                out_mask, threshold = masking.top_k_mask(
                    scores, masking.kept_count(units, sparsity)
                )
                out_masks[name] = out_mask
            shape_out = [1] * (len(weight.shape) - 1) + [units]
            mask = ops.logical_and(in_mask, ops.reshape(out_mask, shape_out))
            masks[position] = ops.broadcast_to(mask, weight.shape)
            thresholds[position] = threshold
        return masks, thresholds


def _kept_units(wrapper):
    mask = ops.convert_to_numpy(wrapper.pruning_vars[0][1])
    return np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))


def shrink_model(model):
    """Removes the units pruned by `StructuredSparsity`: a smaller model.

    Every Dense/Conv layer that `structured_plan` marks removable loses its
    masked units (kernel columns or filters, and their biases); the layers
    that read them lose the matching input rows (after a Flatten, every
    spatial position of each removed channel), and BatchNormalization
    layers between lose those channels. The result is a plain Keras model,
    without kprune objects, whose predictions equal the pruned model's (up
    to float rounding). Other pruned layers are stripped as
    `strip_pruning` does. The pruned model is unchanged; the result is not
    compiled.

    Args:
        model: A Sequential or functional model pruned with
            `kprune.StructuredSparsity`.

    Returns:
        A new, smaller `keras.Model`.

    Raises:
        ValueError: If `model` has no layer pruned with
            `StructuredSparsity`.

    Example:

    ```python
    small = kprune.shrink_model(pruned)
    small.save("small.keras")
    ```
    """
    from kprune.prune import strip_pruning

    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Argument `model` must be a Keras model. Received: {model!r}"
        )
    names = _structured_names(model)
    if not names:
        raise ValueError(
            "Model has no layer pruned with `kprune.StructuredSparsity`, so "
            "there is nothing to shrink. Use `kprune.strip_pruning` for "
            "unstructured pruning."
        )
    plan = _Plan(model, names)
    wrappers = {w.layer.name: w for w in collect_pruned_layers(model)}
    kept = {name: _kept_units(wrappers[name]) for name in plan.removable()}
    out_keep, in_keep, channel_keep = {}, {}, {}
    for producer, keep in kept.items():
        out_keep[producer] = keep
        units = wrappers[producer].layer.kernel.shape[-1]
        for consumer, repeats in plan.consumers[producer]:
            flat = np.arange(units * repeats).reshape(repeats, units)
            in_keep[consumer] = flat[:, keep].ravel()
        for layer_name, _ in plan.per_channel.get(producer, []):
            channel_keep[layer_name] = keep
    stripped = strip_pruning(model)

    def clone(layer):
        config = layer.get_config()
        if layer.name in out_keep:
            key = "units" if isinstance(layer, L.Dense) else "filters"
            config[key] = len(out_keep[layer.name])
        return layer.__class__.from_config(config)

    small = keras.models.clone_model(stripped, clone_function=clone)
    for old in stripped.layers:
        if not old.weights:
            continue
        new = small.get_layer(old.name)
        values = [ops.convert_to_numpy(w) for w in old.weights]
        if old.name in channel_keep:
            values = [v[..., channel_keep[old.name]] for v in values]
        elif old.name in out_keep or old.name in in_keep:
            kernel = ops.convert_to_numpy(old.kernel)
            if old.name in in_keep:
                kernel = np.take(kernel, in_keep[old.name], axis=-2)
            if old.name in out_keep:
                kernel = kernel[..., out_keep[old.name]]
            new.kernel.assign(kernel)
            if getattr(old, "bias", None) is not None:
                bias = ops.convert_to_numpy(old.bias)
                if old.name in out_keep:
                    bias = bias[out_keep[old.name]]
                new.bias.assign(bias)
            continue
        new.set_weights(values)
    return small
