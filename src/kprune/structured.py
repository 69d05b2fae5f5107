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
Layers whose outputs meet in element-wise merges (`Add`, `Subtract`,
`Average`, `Maximum`, `Minimum`, `Multiply`: residual blocks) form one
group that loses the same units, ranked by the sum of their norms; a merge
that also takes a tensor from elsewhere (an identity skip from the model
input, a layer not pruned structurally) leaves its group alone. Otherwise
a layer keeps all its units, and `structured_plan` says why: model
outputs (their units are the model's outputs), `Concatenate`, `Reshape`,
`LayerNormalization` (which mixes channels), softmax over the units,
shared layers, nested models, `channels_first` layers.
"""

import keras
import numpy as np
from keras import layers as L
from keras import ops

from kprune import _keras_internals
from kprune import masking
from kprune.api_export import kprune_export
from kprune.engine import MaskGroup
from kprune.schedules import PruningSchedule
from kprune.schedules import _AcrossLayersSchedule
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


@kprune_export("kprune.structured")
class StructuredSparsity(_AcrossLayersSchedule):
    """Prunes whole Dense units and Conv filters, following `schedule`.

    At each step where `schedule` prunes, every Dense or Conv layer whose
    units can be removed (see `kprune.structured.structured_plan`) keeps the
    `kept_count(units, sparsity)` units of largest kernel norm and masks
    the others, together with the weights of the following layers that
    read them. Give it to the whole model, then call
    `kprune.structured.shrink_model` to get a smaller plain model. Works
    with `UpdatePruningStep` (which connects the layers when training
    starts), `strip_pruning` (which keeps the zeros in place) and saving.

    Args:
        schedule: A `kprune.PruningSchedule`: when to prune and the
            fraction of units removed from each layer.
        norm: `"l2"` (default) or `"l1"`: the norm of a unit's kernel slice
            that ranks it.

    Example:

    ```python
    pruned = kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.structured.StructuredSparsity(
            kprune.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=1000)
        ),
    )
    # ... fit with kprune.UpdatePruningStep() ...
    small = kprune.structured.shrink_model(pruned)
    ```
    """

    def __init__(self, schedule: PruningSchedule, norm: str = "l2"):
        if (
            not isinstance(schedule, PruningSchedule)
            or schedule.mask_group_key() is not None
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

    def get_config(self) -> dict:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "norm": self.norm,
        }

    def mask_group_key(self):
        # All the structured layers of a model form one group: a removed
        # unit also removes the weights that read it in the next layer.
        return "structured"

    def make_mask_group(self, model, wrappers):
        return StructuredGroup(model, wrappers)

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


_ELEMENTWISE_MERGES = (
    L.Add,
    L.Subtract,
    L.Average,
    L.Maximum,
    L.Minimum,
    L.Multiply,
)


class _Space:
    """Channels that must be removed together: the outputs of the Dense/Conv
    layers (`members`) that meet in element-wise merges such as `Add`, or
    of one layer alone."""

    def __init__(self, member):
        self.members = [member]
        self.consumers = []  # (layer name, repeats after a Flatten)
        self.per_channel = []  # BatchNormalization layer names
        self.reason = None


class _Plan:
    """Which units of which layers can be removed, read from the graph.

    Attributes:
        reasons: Layer name -> `None` if its units can be removed, else the
            reason they are kept.
        spaces: The removable channel spaces; the members of one space lose
            the same units.
        space_of: Member layer name -> its removable `_Space`.
    """

    def __init__(self, model, structured_names):
        self.reasons = {}
        self.spaces = []
        self.space_of = {}
        if not isinstance(model, keras.Model) or not hasattr(model, "layers"):
            return
        self.structured = structured_names
        self.readers = {}
        self.maker = {}
        self.shared = set()
        for layer in model.layers:
            try:
                inputs = layer.input
                self.maker[id(layer.output)] = layer
            except (AttributeError, ValueError):
                inputs = None
            # `layer.input` is the first call's input even when a layer
            # is called several times; only the node count tells.
            if inputs is None or _keras_internals.call_count(layer) > 1:
                self.shared.add(_base(layer).name)
                continue
            if not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            for tensor in inputs:
                self.readers.setdefault(id(tensor), []).append(
                    (layer, len(inputs))
                )
        self.outputs = {id(t) for t in getattr(model, "outputs", None) or []}
        # Union-find over layer names (members and merges).
        self.parent = {}
        self.found = {}
        for layer in model.layers:
            base = _base(layer)
            if not _is_unit_layer(layer) or base.name not in structured_names:
                continue
            self._node(base.name)
            if base.name in self.shared:
                self._fail(
                    base.name,
                    "its connections are unknown: it is shared (called "
                    "more than once) or inside a subclassed model",
                )
            elif _activation_name(base) in _CHANNEL_MIXING_ACTIVATIONS:
                self._fail(base.name, "its softmax mixes its units")
            else:
                self._follow(base.name, layer.output)
        roots = {}
        for name in self.found:
            roots.setdefault(self._root(name), []).append(name)
        for root, names in roots.items():
            space = self.found[root]
            space.members = [n for n in names if n in structured_names]
            if space.reason is None and space.members:
                self.spaces.append(space)
            for name in space.members:
                self.reasons[name] = self._reason(space, name)
                if space.reason is None:
                    self.space_of[name] = space

    @staticmethod
    def _reason(space, name):
        if space.reason is None:
            return None
        where, why = space.reason
        others = sorted(set(space.members) - {name})
        if not others:
            return why
        return (
            f"its channels are merged element-wise with those of {others}, "
            f"which must lose the same units, and at {where!r}: {why}"
        )

    def _node(self, name):
        if name not in self.parent:
            self.parent[name] = name
            self.found[name] = _Space(name)
        return self.found[self._root(name)]

    def _root(self, name):
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def _union(self, a, b):
        space_a, space_b = self._node(a), self._node(b)
        root_a, root_b = self._root(a), self._root(b)
        if root_a == root_b:
            return False
        self.parent[root_b] = root_a
        space_a.members += space_b.members
        space_a.consumers += space_b.consumers
        space_a.per_channel += space_b.per_channel
        space_a.reason = space_a.reason or space_b.reason
        self.found[root_a] = space_a
        return True

    def _fail(self, name, reason):
        space = self._node(name)
        if space.reason is None:
            space.reason = (name, reason)

    def _follow(self, name, tensor, repeats=1):
        """Walks forward from `tensor`, an output in `name`'s space."""
        if id(tensor) in self.outputs:
            return self._fail(name, "its output is a model output")
        users = self.readers.get(id(tensor), [])
        if not users:
            return self._fail(
                name, "its output is not used by the model's top-level layers"
            )
        for user, n_inputs in users:
            base = _base(user)
            what = f"{base.name!r} ({type(base).__name__})"
            if n_inputs != 1:
                if not isinstance(base, _ELEMENTWISE_MERGES):
                    return self._fail(
                        name,
                        f"its output meets other tensors in {what}, whose "
                        "channels kprune cannot match",
                    )
                if repeats != 1:
                    return self._fail(
                        name, f"its output reaches {what} after a Flatten"
                    )
                if self._union(name, base.name):
                    self._join_merge_inputs(base.name, user)
                    self._follow(base.name, user.output)
                continue
            if _is_unit_layer(user):
                if base.name not in self.structured:
                    return self._fail(
                        name,
                        f"it feeds {what}, which is not pruned with "
                        "StructuredSparsity, so its inputs are not masked",
                    )
                self._node(name).consumers.append((base.name, repeats))
            elif isinstance(base, L.Flatten):
                if base.data_format != "channels_last":
                    return self._fail(
                        name, f"it feeds {what} in channels_first order"
                    )
                spatial = base.input.shape[1:-1]
                if None in spatial:
                    return self._fail(name, f"{what} has an unknown input size")
                self._follow(
                    name,
                    user.output,
                    repeats * int(np.prod(spatial, dtype=np.int64)),
                )
            elif _passes_channels(user):
                if isinstance(base, L.BatchNormalization):
                    if repeats != 1:
                        return self._fail(
                            name, f"it reaches {what} after a Flatten"
                        )
                    self._node(name).per_channel.append(base.name)
                self._follow(name, user.output, repeats)
            else:
                return self._fail(
                    name, f"it feeds {what}, which kprune cannot rewire"
                )

    def _join_merge_inputs(self, merge, layer):
        """Every input of an element-wise merge must come, through
        per-channel layers, from a structured Dense/Conv or another merge
        of the same space."""
        for tensor in layer.input:
            source = self.maker.get(id(tensor))
            while source is not None and _passes_channels(source):
                source = self.maker.get(id(source.input))
            base = None if source is None else _base(source)
            if source is not None and (
                isinstance(base, _ELEMENTWISE_MERGES)
                or (_is_unit_layer(source) and base.name in self.structured)
            ):
                self._union(merge, base.name)
                continue
            what = (
                "a model input"
                if source is None or isinstance(base, L.InputLayer)
                else repr(base.name)
            )
            self._fail(
                merge,
                f"{merge!r} ({type(_base(layer)).__name__}) also takes "
                f"{what}, which is not a Dense/Conv layer pruned with "
                "StructuredSparsity, so the branches cannot share one mask",
            )

    def removable(self):
        return [name for name, reason in self.reasons.items() if reason is None]


def _structured_names(model):
    return {
        wrapper.layer.name
        for wrapper in collect_pruned_layers(model)
        if isinstance(wrapper.pruning_schedule, StructuredSparsity)
    }


@kprune_export("kprune.structured")
def structured_plan(model) -> dict:
    """Which layers `StructuredSparsity` can shrink, and why not the others.

    Args:
        model: A Sequential or functional model pruned with
            `kprune.structured.StructuredSparsity`.

    Returns:
        A dict of Dense/Conv layer name to `None` when its units can be
        removed, or to a sentence saying why they are all kept.

    Example:

    ```python
    for name, reason in kprune.structured.structured_plan(pruned).items():
        print(name, reason or "shrinks")
    ```
    """
    return dict(_Plan(model, _structured_names(model)).reasons)


def idle_layers(model) -> dict:
    """Layers pruned with `StructuredSparsity` that it leaves dense.

    A layer is idle when it keeps all its units and reads no unit that
    another layer loses (so no input weight of it is masked either).

    Returns:
        A dict of layer name to the reason it keeps its units.
    """
    plan = _Plan(model, _structured_names(model))
    readers = {name for space in plan.spaces for name, _ in space.consumers}
    return {
        name: reason
        for name, reason in plan.reasons.items()
        if reason is not None and name not in readers
    }


class StructuredGroup(MaskGroup):
    """Computes the masks of the `StructuredSparsity` layers of a model."""

    def __init__(self, model, wrappers):
        super().__init__(wrappers)
        first = self.wrappers[0].pruning_schedule
        for wrapper in self.wrappers:
            if wrapper.pruning_schedule != first:
                raise ValueError(
                    "Layers pruned with StructuredSparsity must share one "
                    "schedule, but layer "
                    f"{self.wrappers[0].name!r} has {first!r} and layer "
                    f"{wrapper.name!r} has {wrapper.pruning_schedule!r}."
                )
        self.norm = first.norm
        names = {w.layer.name for w in self.wrappers}
        self.plan = _Plan(model, names)
        # Consumer name -> (space index, repeats after a Flatten).
        self.inputs = {}
        for index, space in enumerate(self.plan.spaces):
            for consumer, repeats in space.consumers:
                self.inputs[consumer] = (index, repeats)

    def compute_masks(self, weights, sparsity):
        # Units are ranked by the norms of the raw kernels; the members of
        # a space (layers added element-wise) rank them by the sum of
        # their norms and share one mask.
        names = [wrapper.layer.name for wrapper, _ in self.entries]
        space_masks, space_thresholds = [], []
        for space in self.plan.spaces:
            total = None
            for name in space.members:
                weight = weights[names.index(name)]
                values = ops.reshape(
                    ops.cast(weight, "float32"), (-1, weight.shape[-1])
                )
                if self.norm == "l1":
                    scores = ops.sum(ops.abs(values), axis=0)
                else:
                    scores = ops.sqrt(ops.sum(ops.square(values), axis=0))
                total = scores if total is None else total + scores
            units = total.shape[0]
            mask, threshold = masking.top_k_mask(
                total, masking.kept_count(units, sparsity)
            )
            space_masks.append(mask)
            space_thresholds.append(threshold)
        masks, thresholds = [], []
        for (wrapper, _), weight in zip(self.entries, weights):
            name = wrapper.layer.name
            if not _is_unit_layer(wrapper) or len(weight.shape) < 2:
                masks.append(ops.ones(weight.shape, "bool"))
                thresholds.append(ops.zeros((), "float32"))
                continue
            rank = len(weight.shape)
            in_mask = ops.ones((weight.shape[-2],), "bool")
            if name in self.inputs:
                index, repeats = self.inputs[name]
                in_mask = ops.tile(space_masks[index], (repeats,))
            out_mask = ops.ones((weight.shape[-1],), "bool")
            threshold = ops.zeros((), "float32")
            space = self.plan.space_of.get(name)
            if space is not None:
                index = self.plan.spaces.index(space)
                out_mask = space_masks[index]
                threshold = space_thresholds[index]
            mask = ops.logical_and(
                ops.reshape(in_mask, [1] * (rank - 2) + [-1, 1]),
                ops.reshape(out_mask, [1] * (rank - 1) + [-1]),
            )
            masks.append(ops.broadcast_to(mask, weight.shape))
            thresholds.append(threshold)
        return masks, thresholds


def _kept_units(wrapper):
    mask = ops.convert_to_numpy(wrapper.pruning_vars[0][1])
    return np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))


@kprune_export("kprune.structured")
def shrink_model(model):
    """Removes the units pruned by `StructuredSparsity`: a smaller model.

    Every Dense/Conv layer that `structured_plan` marks removable loses its
    masked units (kernel columns or filters, and their biases; layers added
    element-wise lose the same ones); the layers
    that read them lose the matching input rows (after a Flatten, every
    spatial position of each removed channel), and BatchNormalization
    layers between lose those channels. The result is a plain Keras model,
    without kprune objects, whose predictions equal the pruned model's (up
    to float rounding). Other pruned layers are stripped as
    `strip_pruning` does. The pruned model is unchanged; the result is not
    compiled.

    Args:
        model: A Sequential or functional model pruned with
            `kprune.structured.StructuredSparsity`.

    Returns:
        A new, smaller `keras.Model`.

    Raises:
        ValueError: If `model` has no layer pruned with
            `StructuredSparsity`.

    Example:

    ```python
    small = kprune.structured.shrink_model(pruned)
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
            "Model has no layer pruned with "
            "`kprune.structured.StructuredSparsity`, so there is nothing to "
            "shrink. Use `kprune.strip_pruning` for unstructured pruning."
        )
    plan = _Plan(model, names)
    wrappers = {w.layer.name: w for w in collect_pruned_layers(model)}
    out_keep, in_keep, channel_keep = {}, {}, {}
    for space in plan.spaces:
        # The members of a space share their mask: read it from one.
        keep = _kept_units(wrappers[space.members[0]])
        units = wrappers[space.members[0]].layer.kernel.shape[-1]
        for member in space.members:
            out_keep[member] = keep
        for consumer, repeats in space.consumers:
            flat = np.arange(units * repeats).reshape(repeats, units)
            in_keep[consumer] = flat[:, keep].ravel()
        for layer_name in space.per_channel:
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
