"""Structured pruning: whole units, filters and channels, then shrinking.

`StructuredSparsity` prunes whole output units of Dense layers and whole
filters of convolutions, ranked by the L1 or L2 norm of their kernel
slice, following a schedule during training. A removed unit also has the
weights that read it masked, so the masked model computes exactly what
the model without that unit computes, and `shrink_model` then removes the
units for real: it returns a smaller plain Keras model with the same
predictions.

Which layers must lose the same channels is read from the model's graph,
as DepGraph (Torch-Pruning) does, not from a list of known blocks: the
graph is walked from the inputs carrying each tensor's channel layout,
and a small rule per layer type (`_RULES`) says how channels flow through
it:

- Dense, Conv1D/2D/3D and the pointwise part of SeparableConv make new
  channels (their units) and read their input channels with kernel axis
  -2;
- DepthwiseConv1D/2D (`depth_multiplier=1`), the depthwise part of
  SeparableConv and BatchNormalization pass the channels they read and
  lose the removed ones from their own weights;
- activations, dropout, pooling, padding, cropping, upsampling pass them;
  Flatten repeats them once per position; a Reshape that keeps the last
  axis passes them;
- `Concatenate` along the channels lays its inputs' channels end to end,
  so a layer reading it loses the removed channels of each part at that
  part's offset;
- element-wise merges (`Add`, `Subtract`, `Average`, `Maximum`,
  `Minimum`, `Multiply`, and `Concatenate` along another axis) join the
  channels they align: their makers form one group, ranked by the sum of
  their norms, that loses the same units (residual blocks,
  squeeze-and-excitation);
- `MultiHeadAttention` loses whole heads, and a layer with sublayers and
  no rule of its own (a keras-hub transformer block) is traced and its
  graph walked with the same rules (`_structured_attention`).

Channels keep all their units when they reach a model output, a layer
without a rule (`LayerNormalization`, an embedding, a `keras.ops` call, a
nested model), softmax
over the units, a layer called more than once, a layer that mixes them
but is not pruned with `StructuredSparsity` (so it cannot mask them), a
merge with channels that cannot lose units (an identity skip from the
model input), or a depthwise convolution with `depth_multiplier > 1`;
`structured_plan` says which and why.

`fold_batchnorm` then folds each BatchNormalization into the convolution
or Dense layer before it, for inference: the same function with fewer
operations, which matters most at batch 1, where the fixed cost of each
operation outweighs its arithmetic.
"""

import collections

import keras
import numpy as np
from keras import layers as L
from keras import ops

from kprune import _keras_internals
from kprune import masking
from kprune import registry
from kprune.api_export import kprune_export
from kprune.engine import MaskGroup
from kprune.schedules import PruningSchedule
from kprune.schedules import _AcrossLayersSchedule
from kprune.wrapper import PruneLowMagnitude
from kprune.wrapper import collect_pruned_layers
from kprune.wrapper import require_model

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
_ELEMENTWISE_MERGES = (
    L.Add,
    L.Subtract,
    L.Average,
    L.Maximum,
    L.Minimum,
    L.Multiply,
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


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _channels(tensor):
    shape = tuple(tensor.shape)
    return shape[-1] if shape else None


# Channel layouts. The last axis of a tensor is a sequence of blocks
# `(segments, repeats)`: the segments' channels one after the other,
# `repeats` times (a Flatten repeats them once per spatial position). A
# segment is the units of a channel space (`space` is the name of a layer
# that makes them), or `size` channels that always stay (`space` is None),
# made by `origin`. A `Concatenate` joins its inputs' layouts, so the
# layers reading it know which of their inputs belong to which space.
_Segment = collections.namedtuple("_Segment", ["space", "size", "origin"])


def _fixed(size, origin):
    return (((_Segment(None, size, origin),), 1),)


def _segments(layout):
    return [segment for segments, _ in layout for segment in segments]


def _size(layout):
    total = 0
    for segments, repeats in layout:
        sizes = [segment.size for segment in segments]
        if None in sizes:
            return None
        total += repeats * sum(sizes)
    return total


def _sizes(layout):
    """What two layouts must share to be added element-wise."""
    return [(tuple(s.size for s in segments), n) for segments, n in layout]


def _layout_mask(layout, space_masks, xp):
    """The keep-mask of `layout`'s channels, or None when it keeps all.

    Args:
        layout: A channel layout.
        space_masks: Space name -> keep-mask of its units, for the spaces
            that lose units.
        xp: `keras.ops` (inside a training step) or `numpy`.
    """
    parts, removes = [], False
    for segments, repeats in layout:
        block = []
        for segment in segments:
            mask = space_masks.get(segment.space)
            removes = removes or mask is not None
            block.append(
                xp.ones((segment.size,), "bool") if mask is None else mask
            )
        block = block[0] if len(block) == 1 else xp.concatenate(block)
        parts.append(block if repeats == 1 else xp.tile(block, (repeats,)))
    if not removes:
        return None
    return parts[0] if len(parts) == 1 else xp.concatenate(parts)


# `attribute` of a layer (a weight) follows the channels of `layout` along
# `axis`.
_Slice = collections.namedtuple("_Slice", ["attribute", "axis", "layout"])
# A layer whose units make a channel space, ranked by the norms of its
# weight `attribute` along the last axis.
# `axis` of the weight runs along the units (the last, for a Dense kernel;
# the heads axis of an attention projection).
_Member = collections.namedtuple(
    "_Member", ["layer", "attribute", "axis"], defaults=(-1,)
)


def _weight(layer, attribute):
    """The weight `attribute` of `layer`, a dotted path through its
    sublayers (`"query_dense.kernel"`), or None."""
    value = layer
    for part in attribute.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


class _Space:
    """Channels that lose the same units: the outputs of the layers in
    `members`, which meet in element-wise merges such as `Add`, or of one
    layer alone."""

    def __init__(self, member, size):
        self.members = [member]
        self.size = size
        self.key = member.layer
        # `(where, why)` once the space must keep all its units.
        self.reason = None


class _Call:
    """One call of a layer in the model's graph, as a rule sees it.

    Attributes:
        layer: The layer (the wrapped layer, for a pruned one).
        inputs: The channel layout of each input tensor.
        input_tensors: The input tensors.
        outputs: The output tensors.
        structured: Whether the layer is pruned with `StructuredSparsity`
            (in the group being planned), so its weights can be masked.
    """

    def __init__(
        self,
        layer,
        inputs,
        input_tensors,
        outputs,
        structured,
        name=None,
        arguments=((), {}),
    ):
        self.layer = layer
        self.inputs = inputs
        self.input_tensors = input_tensors
        self.outputs = outputs
        self.structured = structured
        # The layer's name in the plan: inside a block traced by
        # `_structured_attention`, `"block/layer"`.
        self.name = layer.name if name is None else name
        # `(args, kwargs)` of the call, tensors included.
        self.arguments = arguments

    @property
    def what(self):
        kind = type(self.layer).__name__
        if isinstance(self.layer, L.Layer):
            return f"{self.name!r} ({kind})"
        block, _, _ = self.name.rpartition("/")
        if block:
            # A `keras.ops` call traced inside a block is named anew by
            # each trace: name the block instead.
            return f"a keras.ops {kind} in {block!r}"
        return f"{self.name!r} (keras.ops {kind})"


def _graph(model):
    """The calls of `model`'s layers from its inputs to its outputs.

    Returns:
        `(inputs, calls, outputs)` as `sorted_calls` gives them, or None
        when the model has no graph (a subclassed model).
    """
    try:
        inputs = list(model.inputs or [])
        outputs = list(model.outputs or [])
    except (AttributeError, ValueError):
        return None
    if not inputs or not outputs:
        return None
    # A functional model's operations include the `keras.ops` called on
    # its tensors (`a + b`), which are not layers.
    operations = getattr(model, "operations", None) or model.layers
    return inputs, sorted_calls(outputs, operations), outputs


def sorted_calls(outputs, operations):
    """The calls of `operations` that `outputs` depend on, in order.

    Returns:
        A list of `(layer, input tensors, output tensors, shared,
        (args, kwargs))` in which each call comes after the calls making
        its inputs; `shared` says whether the layer is called more than
        once.
    """
    maker, order = {}, []
    for layer in operations:
        if isinstance(layer, L.InputLayer):
            continue
        for call_inputs, call_outputs, *arguments in _keras_internals.calls(
            layer
        ):
            call = (layer, call_inputs, call_outputs, tuple(arguments))
            order.append(call)
            for tensor in call_outputs:
                maker[id(tensor)] = call
    # Only the calls the outputs depend on: a layer may also have been
    # called in another model's graph.
    needed, stack = set(), list(outputs)
    while stack:
        call = maker.get(id(stack.pop()))
        if call is not None and id(call) not in needed:
            needed.add(id(call))
            stack.extend(call[1])
    order = [call for call in order if id(call) in needed]
    readers, waiting = {}, {}
    for call in order:
        made = {id(t) for t in call[1] if id(maker.get(id(t))) in needed}
        waiting[id(call)] = len(made)
        for tensor_id in made:
            readers.setdefault(tensor_id, []).append(call)
    ready = collections.deque(c for c in order if not waiting[id(c)])
    calls_per_layer = collections.Counter(id(call[0]) for call in order)
    ordered = []
    while ready:
        call = ready.popleft()
        layer, call_inputs, call_outputs, arguments = call
        shared = calls_per_layer[id(layer)] > 1
        ordered.append((layer, call_inputs, call_outputs, shared, arguments))
        for tensor_id in {id(t) for t in call_outputs}:
            for reader in readers.get(tensor_id, []):
                waiting[id(reader)] -= 1
                if not waiting[id(reader)]:
                    ready.append(reader)
    return ordered


class _Plan:
    """Which channels of which layers can be removed, read from the graph.

    The model's graph is walked from its inputs, each call of a layer in
    turn, carrying the channel layout of every tensor. The rule of each
    layer type (`_RULES`) says how the channels flow through it: which
    weights follow its input channels, whether it makes new channels (a
    Dense or Conv layer's units) and which layouts it outputs. Channel
    spaces that meet element-wise are joined (union-find), and a space
    reaching something that cannot follow it (a model output, a layer
    without a rule) keeps all its units.

    Attributes:
        reasons: Name of each layer pruned with `StructuredSparsity` ->
            `None` if it loses units or channels, else why not.
        spaces: The channel spaces that can lose units.
        key: Name of each layer making a space -> the key of its space
            (the members of one space share a key).
        slices: Layer name -> its `_Slice`s: which weights lose which
            channels.
        resizes: Layer name -> `(layout, set_size)` pairs: `set_size(config,
            n)` edits its config for `layout` keeping `n` channels.
        layers: Layer name -> the layer (a layer inside a block traced by
            `_structured_attention` is named `"block/layer"`).
        blocks: Name of each block whose graph was traced and walked ->
            the names of its layers with prunable weights.
    """

    def __init__(self, model, structured_names):
        self.structured = set(structured_names)
        self.reasons = {}
        self.spaces = []
        self.key = {}
        self.slices = {}
        self.resizes = {}
        self._parent = {}
        self._space = {}
        self._refused = {}
        self._reads = {}
        self._seen = {}
        self._maker = {}
        self.layers = {}
        self.blocks = {}
        graph = None
        if isinstance(model, keras.Model):
            graph = _graph(model)
        if graph is None:
            for name in sorted(self.structured):
                self.reasons[name] = _UNKNOWN_CONNECTIONS
            return
        inputs, calls, outputs = graph
        layouts = {id(t): _fixed(_channels(t), "a model input") for t in inputs}
        self.walk(calls, layouts)
        for tensor in outputs:
            self.fail(
                layouts.get(id(tensor), ()),
                self._maker.get(id(tensor)),
                "its output is a model output",
            )
        self._finish()

    def walk(self, calls, layouts, prefix="", structured=None):
        """Applies the rule of each call in `calls` (`sorted_calls`).

        Args:
            calls: The calls, in order.
            layouts: `id(tensor)` -> its layout, for the tensors the calls
                read from outside; the layouts of their outputs are added.
            prefix: Put before each layer's name (`"block/"` inside a
                block).
            structured: Whether the layers are pruned with
                `StructuredSparsity` (inside a block: the block's); None
                looks each layer up.
        """
        for layer, call_inputs, call_outputs, shared, arguments in calls:
            base = _base(layer)
            name = prefix + base.name
            call = _Call(
                base,
                [
                    layouts.get(id(t)) or _fixed(_channels(t), "a tensor")
                    for t in call_inputs
                ],
                call_inputs,
                call_outputs,
                base.name in self.structured
                if structured is None
                else structured,
                name=name,
                arguments=arguments,
            )
            self._seen.setdefault(name)
            self.layers[name] = base
            if shared:
                results = self.refuse(
                    call,
                    f"it feeds {call.what}, which is called more than once",
                    _UNKNOWN_CONNECTIONS,
                )
            else:
                results = _rule(base)(self, call)
            for tensor, layout in zip(call_outputs, results):
                layouts[id(tensor)] = layout
                self._maker[id(tensor)] = name

    # What rules call.

    def read(self, call, layout, weights, masked=True):
        """`weights` of `call.layer`, `(attribute, axis)` pairs, follow the
        channels of `layout`.

        Args:
            masked: Whether the weights mix the channels into others (the
                input rows of a Dense kernel): the layer must then be
                pruned with `StructuredSparsity`, which masks the rows of
                removed channels, or the channels stay. Per-channel
                weights (a BatchNormalization's, a depthwise kernel) are
                only sliced by `shrink_model`, and masked when pruned.
        """
        name = call.name
        self._reads.setdefault(name, []).append(layout)
        if not any(segment.space for segment in _segments(layout)):
            return
        if masked and not self._masks(call, [a for a, _ in weights]):
            return self.fail(
                layout,
                name,
                f"it feeds {call.what}, which is not pruned with "
                "StructuredSparsity, so its inputs are not masked",
            )
        for attribute, axis in weights:
            weight = _weight(call.layer, attribute)
            if weight is None:
                continue
            if _size(layout) != weight.shape[axis]:
                return self.fail(
                    layout,
                    name,
                    f"kprune cannot match its channels to the weight "
                    f"{attribute!r} of {call.what}",
                )
            self.slices.setdefault(name, []).append(
                _Slice(attribute, axis, layout)
            )

    @staticmethod
    def _masks(call, attributes):
        """Whether `StructuredSparsity` masks these weights of the layer."""
        if not call.structured:
            return False
        prunable = registry.get_prunable_weights(call.layer)
        return all(
            any(w is _weight(call.layer, name) for w in prunable)
            for name in attributes
        )

    def produce(self, call, attribute, weights, set_size):
        """Returns the layout of `call.layer`'s outputs, units ranked by
        the norms of its weight `attribute` along its last axis.

        They form a new channel space when the layer is pruned with
        `StructuredSparsity`; `weights`, `(attribute, axis)` pairs, then
        lose its removed units, and `set_size(config, n)` sets `n` units
        in the layer's config.
        """
        layer = call.layer
        weight = _weight(layer, attribute)
        size = _channels(call.outputs[0])
        if (
            not self._masks(call, [attribute])
            or weight is None
            or weight.shape[-1] != size
        ):
            return _fixed(size, repr(call.name))
        name = call.name
        self._parent[name] = name
        self._space[name] = _Space(_Member(name, attribute), size)
        layout = (((_Segment(name, size, None),), 1),)
        for attribute, axis in weights:
            if _weight(layer, attribute) is not None:
                self.slices.setdefault(name, []).append(
                    _Slice(attribute, axis, layout)
                )
        self.resize(name, layout, set_size)
        return layout

    def inner_units(self, call, size, members, weights, set_size):
        """`call.layer` makes `size` units that only its own weights read
        (attention heads): they lose units when the layer is pruned with
        `StructuredSparsity`.

        Args:
            size: The number of units.
            members: `(attribute, axis)` of each weight whose norms along
                the units rank them together (their sum).
            weights: `(attribute, axis)` of each weight that loses the
                removed units; the pruned ones are masked.
            set_size: `set_size(config, n)` sets `n` units in the layer's
                config.

        Returns:
            Whether the units can be removed.
        """
        attributes = [a for a, _ in members]
        if not self._masks(call, attributes):
            return False
        name = call.name
        self._parent[name] = name
        first, *others = [_Member(name, a, axis) for a, axis in members]
        space = _Space(first, size)
        space.members += others
        self._space[name] = space
        layout = (((_Segment(name, size, None),), 1),)
        for attribute, axis in weights:
            if _weight(call.layer, attribute) is not None:
                self.slices.setdefault(name, []).append(
                    _Slice(attribute, axis, layout)
                )
        self.resize(name, layout, set_size)
        return True

    def resize(self, name, layout, set_size):
        """`set_size(config, n)` edits layer `name`'s config for `layout`
        keeping `n` channels."""
        self.resizes.setdefault(name, []).append((layout, set_size))

    def merge(self, call, layouts):
        """The channels of `layouts` meet element-wise in `call`: aligned
        spaces lose the same units. Returns the merged layout."""
        first, where = layouts[0], call.name
        if any(_sizes(layout) != _sizes(first) for layout in layouts):
            for layout in layouts:
                self.fail(
                    layout,
                    where,
                    f"its output meets channels of other layers in "
                    f"{call.what}, whose channels kprune cannot match",
                )
            return first
        for layout in layouts[1:]:
            for a, b in zip(_segments(first), _segments(layout)):
                if a.space and b.space:
                    self._union(a.space, b.space)
        for layout in layouts:
            for a, b in zip(_segments(first), _segments(layout)):
                fixed = a if a.space is None else b
                if (a.space is None) != (b.space is None):
                    self.fail(
                        layout if a.space is None else first,
                        where,
                        f"{call.what} also takes {fixed.origin}, which is "
                        "not a Dense/Conv layer pruned with "
                        "StructuredSparsity, so the branches cannot share "
                        "one mask",
                    )
        return first

    def fail(self, layout, where, why):
        """The spaces in `layout` keep all their units, because `why`."""
        for segment in _segments(layout):
            if segment.space is not None:
                space = self._space[self._root(segment.space)]
                if space.reason is None:
                    space.reason = (where, why)

    def refuse(self, call, why, reason=None):
        """`call.layer` keeps every channel: the spaces it reads keep their
        units (`why`), and it is left whole (`reason`, for `structured_plan`).
        Returns layouts of channels that stay, for its outputs."""
        for layout in call.inputs:
            self.fail(layout, call.name, why)
        if reason is not None and call.structured:
            self._refused.setdefault(call.name, reason)
        return [_fixed(_channels(t), repr(call.name)) for t in call.outputs]

    # Union-find over the names of the layers making spaces.

    def _root(self, name):
        while self._parent[name] != name:
            self._parent[name] = self._parent[self._parent[name]]
            name = self._parent[name]
        return name

    def _union(self, a, b):
        root_a, root_b = self._root(a), self._root(b)
        if root_a == root_b:
            return
        space_a, space_b = self._space.pop(root_a), self._space.pop(root_b)
        self._parent[root_b] = root_a
        space_a.members += space_b.members
        space_a.reason = space_a.reason or space_b.reason
        self._space[root_a] = space_a

    def _finish(self):
        for root, space in self._space.items():
            space.key = root
            if space.reason is None:
                self.spaces.append(space)
        self.key = {name: self._root(name) for name in self._parent}
        names = [n for n in self._seen if n in self.structured]
        names += sorted(self.structured - set(names))
        for name in names:
            self.reasons[name] = self._reason(name)
            for inner in self.blocks.get(name, ()):
                self.reasons[inner] = self._reason(inner)

    def _removable(self, layout):
        return any(
            segment.space is not None
            and self._space[self.key[segment.space]].reason is None
            for segment in _segments(layout)
        )

    def reads_removable(self, name):
        """Whether layer `name` reads channels that some layer loses."""
        return any(self._removable(x) for x in self._reads.get(name, ()))

    def _reason(self, name):
        if name in self._refused:
            return self._refused[name]
        if name in self.blocks:
            inner = {n: self._reason(n) for n in self.blocks[name]}
            if not inner or any(why is None for why in inner.values()):
                return None if inner else "it has no layer to prune"
            return "none of its layers loses units: " + "; ".join(
                f"{n!r}: {why}" for n, why in inner.items()
            )
        if name in self.key:
            space = self._space[self.key[name]]
            if space.reason is None:
                return None
            where, why = space.reason
            others = sorted({m.layer for m in space.members} - {name})
            if not others:
                return why
            return (
                f"its channels are merged element-wise with those of "
                f"{others}, which must lose the same units, and at "
                f"{where!r}: {why}"
            )
        if name not in self._reads:
            if name in self._seen:
                return "it makes no channels and reads none"
            return (
                "it is not a top-level layer of the model's graph (it is "
                "inside a nested model or layer), so its connections are "
                "unknown"
            )
        if self.reads_removable(name):
            return None
        segments = [s for x in self._reads[name] for s in _segments(x)]
        spaces = [s.space for s in segments if s.space is not None]
        if not spaces:
            origins = sorted({s.origin for s in segments})
            return (
                f"the channels it reads come from {', '.join(origins)}, "
                "not from a layer pruned with StructuredSparsity"
            )
        first = spaces[0]
        return (
            f"the channels it reads keep all their units ({first!r}: "
            f"{self._reason(first)})"
        )


_UNKNOWN_CONNECTIONS = (
    "its connections are unknown: it is shared (called more than once) or "
    "inside a subclassed model"
)


# How channels flow through each layer type. A rule is called for each
# call of a layer in the model's graph, as `rule(plan, call)` (`call` is a
# `_Call`, `plan` the `_Plan` being built): it tells `plan` which weights
# of the layer follow which channels (`plan.read`), whether the layer
# makes new channels (`plan.produce`), joins channel spaces
# (`plan.merge`) or stops them (`plan.fail`, `plan.refuse`), and returns
# the channel layout of each output tensor. Rules are looked up by class,
# most-derived first; a layer type without one keeps the channels it
# reads (`_no_rule`). Add a layer type by adding its rule here.
_RULES = {}


def _rule(layer):
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return _no_rule


def _no_rule(plan, call):
    return plan.refuse(
        call,
        f"it feeds {call.what}, which kprune cannot rewire",
        f"StructuredSparsity has no channel rule for "
        f"{type(call.layer).__name__} layers, so it keeps all its units",
    )


def _single_input(rule):
    """`rule(plan, call, layout)` for a layer taking one tensor, as a rule
    of `_RULES`."""

    def checked(plan, call):
        if len(call.inputs) != 1:
            return plan.refuse(
                call,
                f"its output meets other tensors in {call.what}, whose "
                "channels kprune cannot match",
                f"it takes {len(call.inputs)} tensors",
            )
        return rule(plan, call, call.inputs[0])

    return checked


def _refuse_channels_first(plan, call):
    return plan.refuse(
        call,
        f"it feeds {call.what}, channels_first, which kprune cannot rewire",
        "it is channels_first, which kprune cannot rewire",
    )


def _set_config(key):
    def set_size(config, size):
        config[key] = size

    return set_size


def _units(plan, call, attribute, weights, key):
    """The output layouts of a layer whose units are the last axis of its
    weight `attribute`."""
    layout = plan.produce(call, attribute, weights, _set_config(key))
    if _activation_name(call.layer) in _CHANNEL_MIXING_ACTIVATIONS:
        plan.fail(layout, call.name, "its softmax mixes its units")
    return [layout]


@_single_input
def _dense_or_conv(plan, call, layout):
    """A Dense or Conv layer reads its input channels with its kernel's
    axis -2 and makes its units: kernel axis -1 and bias."""
    layer = call.layer
    if not _channels_last(layer):
        return _refuse_channels_first(plan, call)
    if getattr(layer, "groups", 1) != 1:
        kind = f"a grouped convolution (groups={layer.groups})"
        return plan.refuse(
            call,
            f"it feeds {call.what}, {kind}, which kprune cannot rewire",
            f"it is {kind}, which kprune cannot rewire",
        )
    plan.read(call, layout, [("kernel", -2)])
    key = "units" if isinstance(layer, L.Dense) else "filters"
    return _units(plan, call, "kernel", [("kernel", -1), ("bias", -1)], key)


def _depth_multiplier_refusal(call):
    m = call.layer.depth_multiplier
    return (
        f"it feeds {call.what}, whose depth_multiplier={m} makes {m} "
        "channels of each input channel; kprune removes channels through "
        "depth_multiplier=1 only",
        f"its depth_multiplier is {m}: each input channel makes {m} "
        "channels, and kprune removes channels through depth_multiplier=1 "
        "only",
    )


@_single_input
def _depthwise(plan, call, layout):
    """A depthwise convolution loses the channels its input loses: its
    kernel's axis -2 and its bias."""
    if not _channels_last(call.layer):
        return _refuse_channels_first(plan, call)
    if call.layer.depth_multiplier != 1:
        return plan.refuse(call, *_depth_multiplier_refusal(call))
    plan.read(call, layout, [("kernel", -2), ("bias", -1)], masked=False)
    return [layout]


@_single_input
def _separable(plan, call, layout):
    """A separable convolution's depthwise part loses the channels its
    input loses; its pointwise part makes its units."""
    layer = call.layer
    if not _channels_last(layer):
        return _refuse_channels_first(plan, call)
    if layer.depth_multiplier != 1:
        plan.fail(layout, call.name, _depth_multiplier_refusal(call)[0])
    else:
        plan.read(
            call, layout, [("depthwise_kernel", -2), ("pointwise_kernel", -2)]
        )
    weights = [("pointwise_kernel", -1), ("bias", -1)]
    return _units(plan, call, "pointwise_kernel", weights, "filters")


@_single_input
def _batch_normalization(plan, call, layout):
    rank = len(call.outputs[0].shape)
    if call.layer.axis not in (-1, rank - 1):
        return plan.refuse(
            call,
            f"it feeds {call.what}, which normalizes axis "
            f"{call.layer.axis}, not the channels",
        )
    weights = ("gamma", "beta", "moving_mean", "moving_variance")
    plan.read(call, layout, [(w, -1) for w in weights], masked=False)
    return [layout]


@_single_input
def _per_channel(plan, call, layout):
    """Layers without weights that act on each channel separately."""
    if not _channels_last(call.layer):
        return _refuse_channels_first(plan, call)
    if _activation_name(call.layer) in _CHANNEL_MIXING_ACTIVATIONS:
        return _no_rule(plan, call)
    return [layout]


@_single_input
def _flatten(plan, call, layout):
    """A Flatten repeats the channels once per position."""
    if not _channels_last(call.layer):
        return plan.refuse(
            call, f"it feeds {call.what} in channels_first order"
        )
    spatial = tuple(call.input_tensors[0].shape)[1:-1]
    if None in spatial:
        return plan.refuse(call, f"{call.what} has an unknown input size")
    positions = int(np.prod(spatial, dtype=np.int64))
    if positions == 1:
        return [layout]
    if any(repeats != 1 for _, repeats in layout):
        return plan.refuse(call, f"it feeds {call.what} after a Flatten")
    return [((tuple(_segments(layout)), positions),)]


@_single_input
def _reshape(plan, call, layout):
    """A Reshape that keeps the last axis only regroups positions."""
    before = tuple(call.input_tensors[0].shape)
    after = tuple(call.outputs[0].shape)
    if len(before) < 2 or len(after) < 2 or before[-1] != after[-1]:
        return plan.refuse(
            call,
            f"it feeds {call.what}, which moves channels off the last axis",
        )

    def set_size(config, size):
        shape = list(config["target_shape"])
        if shape[-1] != -1:
            shape[-1] = size
        config["target_shape"] = tuple(shape)

    plan.resize(call.name, layout, set_size)
    return [layout]


def _concatenate(plan, call):
    """Along the channels, the inputs' layouts follow each other; along
    another axis, the channels meet as in an element-wise merge."""
    rank = len(call.outputs[0].shape)
    if call.layer.axis % rank != rank - 1:
        return [plan.merge(call, call.inputs)]
    return [tuple(block for layout in call.inputs for block in layout)]


def _elementwise(plan, call):
    return [plan.merge(call, call.inputs)]


_RULES.update(
    {
        L.Dense: _dense_or_conv,
        L.Conv1D: _dense_or_conv,
        L.Conv2D: _dense_or_conv,
        L.Conv3D: _dense_or_conv,
        L.DepthwiseConv1D: _depthwise,
        L.DepthwiseConv2D: _depthwise,
        L.SeparableConv1D: _separable,
        L.SeparableConv2D: _separable,
        L.BatchNormalization: _batch_normalization,
        L.Flatten: _flatten,
        L.Reshape: _reshape,
        L.Concatenate: _concatenate,
        **{cls: _per_channel for cls in _PER_CHANNEL},
        **{cls: _elementwise for cls in _ELEMENTWISE_MERGES},
    }
)

# Attention heads and blocks with sublayers (keras-hub transformer blocks):
# their own module, whose rules use the `_Plan` above.
from kprune import _structured_attention  # noqa: E402

_RULES.update(_structured_attention.RULES)


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
        A dict of the name of each layer pruned with `StructuredSparsity`
        to `None` when it loses units or channels (a Dense/Conv layer's
        units, a depthwise convolution's channels, attention heads), or to
        a sentence saying why it keeps them all. A block whose graph is
        traced (a keras-hub transformer block) is `None` when one of its
        layers shrinks, and each of its layers with pruned weights has an
        entry `"block/layer"` of its own.

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
    return {
        name: reason
        for name, reason in plan.reasons.items()
        if name in plan.structured
        and reason is not None
        and not plan.reads_removable(name)
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
        # The layers inside a wrapped block (`self.plan.blocks`: attention
        # heads, feed-forward units) are masked through the block's
        # wrapper, whose pruned weights are theirs.
        entry_of = {
            id(wrapper.pruning_vars[index][0]): n
            for n, (wrapper, index) in enumerate(self.entries)
        }
        # Per entry: the slices of its weight.
        self.slices = [[] for _ in self.entries]
        for name, slices in self.plan.slices.items():
            for s in slices:
                weight = _weight(self.plan.layers[name], s.attribute)
                if id(weight) in entry_of:
                    self.slices[entry_of[id(weight)]].append(s)
        # Per removable space: `(entry, axis)` of the weights whose norms
        # along `axis` rank its units.
        self.scored = [
            [
                (
                    entry_of[
                        id(_weight(self.plan.layers[m.layer], m.attribute))
                    ],
                    m.axis,
                )
                for m in space.members
            ]
            for space in self.plan.spaces
        ]

    def compute_masks(self, weights, sparsity):
        # Units are ranked by the norms of the raw kernels; the members of
        # a space (layers added element-wise) rank them by the sum of
        # their norms and share one mask.
        space_masks, thresholds = {}, [ops.zeros((), "float32")] * len(weights)
        for space, entries in zip(self.plan.spaces, self.scored):
            total = None
            for n, axis in entries:
                values = ops.cast(weights[n], "float32")
                if axis % len(values.shape) != len(values.shape) - 1:
                    values = ops.moveaxis(values, axis, -1)
                values = ops.reshape(values, (-1, values.shape[-1]))
                if self.norm == "l1":
                    scores = ops.sum(ops.abs(values), axis=0)
                else:
                    scores = ops.sqrt(ops.sum(ops.square(values), axis=0))
                total = scores if total is None else total + scores
            mask, threshold = masking.top_k_mask(
                total, masking.kept_count(space.size, sparsity)
            )
            space_masks[space.key] = mask
            for n, _ in entries:
                thresholds[n] = threshold
        space_masks = {
            name: space_masks[key]
            for name, key in self.plan.key.items()
            if key in space_masks
        }
        masks = []
        for weight, slices in zip(weights, self.slices):
            mask = None
            for s in slices:
                kept = _layout_mask(s.layout, space_masks, ops)
                if kept is None:
                    continue
                shape = [1] * len(weight.shape)
                shape[s.axis] = -1
                kept = ops.reshape(kept, shape)
                mask = kept if mask is None else ops.logical_and(mask, kept)
            if mask is None:
                masks.append(ops.ones(weight.shape, "bool"))
            else:
                masks.append(ops.broadcast_to(mask, weight.shape))
        return masks, thresholds


def _space_masks(model, plan):
    """Space name -> numpy keep-mask of its units, read from the masks."""
    masks = {
        id(weight): mask
        for wrapper in collect_pruned_layers(model)
        for weight, mask, _ in wrapper.pruning_vars
    }
    kept = {}
    for space in plan.spaces:
        # The members of a space share their mask: read it from one.
        member = space.members[0]
        weight = _weight(plan.layers[member.layer], member.attribute)
        mask = np.moveaxis(
            ops.convert_to_numpy(masks[id(weight)]), member.axis, -1
        )
        kept[space.key] = mask.reshape(-1, mask.shape[-1]).any(axis=0)
    return {name: kept[key] for name, key in plan.key.items() if key in kept}


@kprune_export("kprune.structured")
def shrink_model(model):
    """Removes the units pruned by `StructuredSparsity`: a smaller model.

    Every layer that `structured_plan` marks removable loses its masked
    units (kernel columns or filters, and their biases; layers added
    element-wise lose the same ones), and every layer the channels flow
    through loses them too: the input rows of the next Dense/Conv layers
    (after a `Concatenate`, the rows of each input's kept channels; after
    a `Flatten`, every spatial position of each removed channel), the
    channels of BatchNormalization and depthwise convolutions in between.
    A `MultiHeadAttention` loses its removed heads (`num_heads`). A traced
    block (a keras-hub transformer block) is replaced by its graph, its
    layers named `block_layer`, so the result is then a functional model
    even when `model` was a keras-hub model. A block whose call needs its
    inputs' batch or sequence size (keras-hub's `TransformerDecoder`:
    GPT-2 and other causal models) stays, with its smaller sublayers, in
    a kprune layer (loading its `.keras` file needs `import kprune`).
    Otherwise the result is a plain Keras model, without kprune objects;
    its predictions equal the pruned model's (up to float rounding). Other
    pruned layers are stripped as `strip_pruning` does. The pruned model is
    unchanged; the result is not compiled.

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

    require_model(model)
    names = _structured_names(model)
    if not names:
        raise ValueError(
            "Model has no layer pruned with "
            "`kprune.structured.StructuredSparsity`, so there is nothing to "
            "shrink. Use `kprune.strip_pruning` for unstructured pruning."
        )
    plan = _Plan(model, names)
    space_masks = _space_masks(model, plan)

    def kept(layout):
        mask = _layout_mask(layout, space_masks, np)
        return None if mask is None else np.flatnonzero(mask)

    stripped = strip_pruning(model)
    if plan.blocks:
        from kprune import _structured_attention

        return _structured_attention.rebuild(stripped, plan, kept)

    def clone(layer):
        config = _shrunk_config(plan, layer.name, layer, kept)
        return layer.__class__.from_config(config)

    small = keras.models.clone_model(
        stripped, clone_function=clone, recursive=True
    )
    for old in stripped.layers:
        if old.weights:
            small.get_layer(old.name).set_weights(
                _shrunk_weights(plan, old.name, old, kept)
            )
    return small


def _shrunk_config(plan, name, layer, kept):
    """`layer`'s config, edited to keep the channels `kept(layout)` keeps
    of each layout `plan` resizes it for (layer `name` in the plan)."""
    config = layer.get_config()
    for layout, set_size in plan.resizes.get(name, ()):
        keep = kept(layout)
        if keep is not None:
            set_size(config, len(keep))
    return config


def _shrunk_weights(plan, name, layer, kept):
    """The values of `layer`'s weights, each sliced to the channels
    `kept(layout)` keeps along the axes `plan` slices (layer `name` in the
    plan)."""
    values = [ops.convert_to_numpy(w) for w in layer.weights]
    for s in plan.slices.get(name, ()):
        keep = kept(s.layout)
        weight = _weight(layer, s.attribute)
        for i, w in enumerate(layer.weights):
            if w is weight and keep is not None:
                values[i] = np.take(values[i], keep, axis=s.axis)
    return values


# Layers a following BatchNormalization folds into, with the weight that
# carries their output channels (its last axis, or for a depthwise
# convolution its last two axes: input channel, then multiplier).
_FOLDS_INTO = (
    (L.Dense, "kernel"),
    (L.Conv1D, "kernel"),
    (L.Conv2D, "kernel"),
    (L.Conv3D, "kernel"),
    (L.DepthwiseConv1D, "kernel"),
    (L.DepthwiseConv2D, "kernel"),
    (L.SeparableConv1D, "pointwise_kernel"),
    (L.SeparableConv2D, "pointwise_kernel"),
)


def _keras_class(layer, classes):
    """The Keras class of `classes` that `layer` is, when its subclass (if
    any) keeps Keras's computation; else None."""
    for cls in classes:
        if isinstance(layer, cls):
            # A subclass that changes the computation (weight
            # standardization in `convolution_op`, say) must not be folded.
            for method in ("call", "convolution_op"):
                if getattr(type(layer), method, None) is not getattr(
                    cls, method, None
                ):
                    return None
            return cls
    return None


def _fold_pairs(graph):
    """`{BatchNormalization name: the layer it folds into}` for a model's
    `_graph`."""
    _, calls, outputs = graph
    readers = collections.Counter(id(t) for t in outputs)
    maker = {}
    for layer, call_inputs, call_outputs, shared, _ in calls:
        for tensor_id in {id(t) for t in call_inputs}:
            readers[tensor_id] += 1
        for tensor in call_outputs:
            maker[id(tensor)] = (layer, call_outputs, shared)
    weights = dict(_FOLDS_INTO)
    pairs = {}
    for layer, call_inputs, _, shared, _ in calls:
        if shared or _keras_class(layer, [L.BatchNormalization]) is None:
            continue
        if len(call_inputs) != 1 or id(call_inputs[0]) not in maker:
            continue
        tensor = call_inputs[0]
        producer, made, producer_shared = maker[id(tensor)]
        cls = _keras_class(producer, weights)
        rank = len(tensor.shape)
        channel_axis = rank - 1 if _channels_last(producer) else 1
        if (
            cls is None
            or producer_shared
            or len(made) != 1
            # The producer's output must reach nothing but the
            # normalization: another reader needs it unnormalized.
            or readers[id(tensor)] != 1
            or _activation_name(producer) not in ("linear", "None")
            or getattr(producer, "quantization_mode", None) is not None
            or getattr(producer, "lora_enabled", False)
            or layer.axis % rank != channel_axis
        ):
            continue
        pairs[layer.name] = producer
    return pairs


def _folded_weights(producer, batch_norm):
    """`(name of the weight carrying the channels, its folded value, the
    folded bias)`: the producer followed by `batch_norm` in inference."""
    attribute = dict(_FOLDS_INTO)[_keras_class(producer, dict(_FOLDS_INTO))]

    def value(weight):
        return ops.convert_to_numpy(weight).astype("float64")

    kernel = value(getattr(producer, attribute))
    channels = value(batch_norm.moving_mean).shape[0]
    scale = np.ones(channels)
    if batch_norm.scale:
        scale = value(batch_norm.gamma)
    scale = scale / np.sqrt(
        value(batch_norm.moving_variance) + batch_norm.epsilon
    )
    shift = value(batch_norm.beta) if batch_norm.center else 0.0
    bias = value(producer.bias) if producer.use_bias else 0.0
    if isinstance(producer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        # Output channel c * depth_multiplier + m comes from kernel[..., c, m].
        kernel = kernel * scale.reshape(kernel.shape[-2:])
    else:
        kernel = kernel * scale
    bias = (bias - value(batch_norm.moving_mean)) * scale + shift
    return attribute, kernel, bias


@kprune_export("kprune.structured")
def fold_batchnorm(model: keras.Model) -> keras.Model:
    """Folds each BatchNormalization into the layer before it: a faster
    model for inference.

    A BatchNormalization in inference mode scales and shifts each channel
    by constants, so it folds into the Dense, Conv1D/2D/3D,
    DepthwiseConv1D/2D or SeparableConv1D/2D layer that makes its input:
    that layer's kernel is scaled per output channel and its bias (added
    if it had none) shifted, and the normalization disappears from the
    graph. The result computes the same function as `model` in inference
    (up to float rounding) with fewer operations, which matters most at
    small batches, where each operation's fixed cost dominates (see
    benchmarks/README.md). Use it after `shrink_model` (or on any plain
    model) for deployment; the folded model no longer normalizes with
    batch statistics, so fine-tune the unfolded model, not this one.

    A BatchNormalization stays, unchanged, when its input is not the
    only output of one of those layers (a model input, an activation, an
    `Add`), when that layer has an activation other than linear, is
    quantized or has LoRA enabled, when that layer's output also goes
    elsewhere (another layer or a model output would then need the
    unnormalized values), when either layer is called more than once or
    is a subclass that changes Keras's computation, or when it normalizes
    an axis other than the channels. Nested models are copied, not
    folded.

    Args:
        model: A Sequential or functional model without kprune wrappers
            (call `kprune.strip_pruning` or `shrink_model` first).

    Returns:
        A new `keras.Model` of the same kind, not compiled; its layers
        keep their names, and each folded BatchNormalization is gone.
        `model` is unchanged.

    Raises:
        ValueError: If `model` is not a Sequential or functional model
            with known inputs, or still holds pruning wrappers.

    Example:

    ```python
    small = kprune.structured.shrink_model(pruned)
    fast = kprune.structured.fold_batchnorm(small)
    fast.save("fast.keras")
    ```
    """
    require_model(model)
    wrappers = collect_pruned_layers(model)
    if wrappers:
        raise ValueError(
            "Argument `model` still holds pruning wrappers, whose weights "
            "are masked at every call. Call `kprune.strip_pruning(model)` "
            "or `kprune.structured.shrink_model(model)` first. Received: "
            f"a model with {len(wrappers)} wrappers"
        )
    graph = _graph(model)
    if graph is None:
        raise ValueError(
            "Argument `model` must be a Sequential or functional model with "
            "known inputs (call it once, or start it with `keras.Input`); a "
            f"subclassed model has no graph to fold. Received: {model!r}"
        )
    pairs = _fold_pairs(graph)
    producers = {p.name: model.get_layer(bn) for bn, p in pairs.items()}

    def clone(layer):
        config = layer.get_config()
        if layer.name in producers:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    if isinstance(model, keras.Sequential):
        kept = [clone(lay) for lay in model.layers if lay.name not in pairs]
        # A Sequential built by calling it on data records that data's
        # batch size; the folded model takes any.
        (spec,) = model.inputs
        inputs = keras.Input(spec.shape[1:], dtype=spec.dtype)
        folded = keras.Sequential([inputs] + kept, name=model.name)
    else:

        def call(layer, *args, **kwargs):
            if layer.name in pairs:
                return args[0]
            return layer(*args, **kwargs)

        folded = keras.models.clone_model(
            model, clone_function=clone, call_function=call
        )
    for new in folded.layers:
        if not new.weights:
            continue
        old = model.get_layer(new.name)
        if new.name not in producers:
            new.set_weights(old.get_weights())
            continue
        # Keras creates the bias last: the new one goes after the others.
        zeros = [] if old.use_bias else [np.zeros(new.bias.shape)]
        new.set_weights(old.get_weights() + zeros)
        attribute, kernel, bias = _folded_weights(old, producers[new.name])
        weight = getattr(new, attribute)
        weight.assign(kernel.astype(weight.dtype))
        new.bias.assign(bias.astype(new.bias.dtype))
    return folded
