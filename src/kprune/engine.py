"""The pruning engine: how masks follow the schedule during training.

One code path on every backend (docs/design.md has the picture). In each
training step:

1. Forward pass. The first training-mode call of a pruned layer in the step
   advances the layer's `pruning_step`, so the first batch is step 1 and a
   layer called twice in one step advances once. The first such call among
   the layers of a mask group computes the masks of the whole group, from
   the weights the step starts with, on the steps the group's schedule
   names, writes them to the mask variables and zeroes the weights outside
   them, so the step's own loss and gradients already see the new masks
   (`tfmot`'s order). The wrapped layer then runs unchanged.
2. Optimizer update. Each pruned weight carries a constraint, which Keras
   optimizers apply right after the update: it sets the weights outside the
   step's mask to zero. Pruned weights are therefore exactly zero after
   every update, which is when callbacks and checkpoints see them.

Why the forward pass: it is the one place where every backend lets a
compiled training step change state other than the weights. JAX training
is a pure function: the optimizer update (`optimizer.stateless_apply`)
returns the trainable and optimizer variables and drops any other write,
while non-trainable variables written in the forward pass are carried to
the next step. Computing masks from the weights before the update is also
what `tfmot` does.

Mask groups are the plug-in point. A schedule names the group its layer
belongs to (`PruningSchedule.mask_group_key`) and builds it
(`PruningSchedule.make_mask_group`); the engine never checks which
algorithm it runs. A layer whose schedule names no group is a group of its
own (`LayerMasks`). A new cross-layer algorithm is a schedule and a
`MaskGroup` subclass in one module.
"""

import threading
import weakref

import keras
from keras import ops

from kprune import _keras_internals
from kprune import masking
from kprune import registry
from kprune.api_export import kprune_export

# JAX cannot write variables inside a `cond` branch (the branch is traced
# on its own), so there the masks leave the `cond` as values and are
# written on every step. Elsewhere they are written only on pruning steps.
_ASSIGN_IN_BRANCH = keras.backend.backend() != "jax"

_MISSING_CALLBACK = (
    "Pruned layer {name!r} is being trained without the "
    "`kprune.UpdatePruningStep` callback, which drives the pruning "
    "schedule. "
)
_CUSTOM_LOOP_ADVICE = (
    " In a custom training loop, create the callback and call "
    "`callback.set_model(model)` and `callback.on_train_begin()` once "
    "before the first step."
)
if keras.backend.backend() == "jax":
    # Keras's JAX `fit` takes the values out of the model's variables
    # before the first step is traced, and puts them back only after a
    # step has run: after this error, they are gone.
    MISSING_CALLBACK_MESSAGE = (
        _MISSING_CALLBACK
        + "On the JAX backend, `fit` had already detached the model's "
        "weights for the compiled step and cannot reattach them after this "
        "error, so this model object can no longer be used, compiled again "
        "or not. Prune the original model again (`prune_low_magnitude` left "
        "it unchanged) or load the saved pruned model again, then fit it "
        "with the callback: "
        "`model.fit(..., callbacks=[kprune.UpdatePruningStep()])`."
        + _CUSTOM_LOOP_ADVICE
    )
else:
    MISSING_CALLBACK_MESSAGE = (
        _MISSING_CALLBACK
        + "No weight was changed: call `fit` again with the callback, "
        "`model.fit(..., callbacks=[kprune.UpdatePruningStep()])` (no need "
        "to compile again)." + _CUSTOM_LOOP_ADVICE
    )

NOT_TRAINING_MESSAGE = (
    "Pruned layer {name!r} was updated by the optimizer without having been "
    "called with `training=True` in the same training step. Masks are "
    "computed in the layer's training-mode call, so every model between "
    "the training step and the pruned layer must pass `training` on: call "
    "the model with `model(x, training=True)` in a custom loop, and give a "
    "subclassed model's `call` a `training=None` argument that it passes "
    "to its layers (`layer(x, training=training)`)."
)

# Pruned layer -> its `_Run`, while a training run drives it.
_RUNS = weakref.WeakKeyDictionary()
# Pruned layers whose training step was traced without the callback.
_UNDRIVEN = weakref.WeakSet()


@kprune_export("kprune.engine")
class MaskGroup:
    """Pruned layers whose masks are computed together.

    The engine calls `schedule` and, on pruning steps, `compute_masks`,
    inside the compiled training step: both must use `keras.ops` only.
    Subclass it, with a `kprune.PruningSchedule` whose `mask_group_key`
    and `make_mask_group` name and build the group, to add a pruning
    algorithm.

    Args:
        wrappers: The `kprune.PruneLowMagnitude` layers of the group, in
            model order.

    Example:

    ```python
    class ScaledGlobal(kprune.PruningSchedule):
        def mask_group_key(self):
            return "scaled"

        def make_mask_group(self, model, wrappers):
            return ScaledGroup(wrappers)

    class ScaledGroup(kprune.engine.MaskGroup):
        def compute_masks(self, weights, sparsity):
            ...  # one mask and one threshold per weight
    ```

    Attributes:
        entries: `(wrapper, index)` per pruned weight of the group, in the
            order `compute_masks` receives the weights and returns masks;
            `wrapper.pruning_vars[index]` is `(weight, mask, threshold)`.
    """

    def __init__(self, wrappers):
        self.wrappers = list(wrappers)
        self.entries = [
            (wrapper, index)
            for wrapper in self.wrappers
            for index in range(len(wrapper.pruning_vars))
        ]
        # The training step being traced or run, per thread: TensorFlow's
        # `MirroredStrategy` traces each replica's step in its own thread.
        self._steps = threading.local()

    def schedule(self, step):
        """`(should_prune, sparsity)` at `step` (a scalar int tensor).

        The first layer's schedule, by default.
        """
        return self.wrappers[0].pruning_schedule(step)

    def compute_masks(self, weights, sparsity):
        """The new masks of the group.

        Args:
            weights: One float tensor per entry of `self.entries`, the
                weights the training step starts with.
            sparsity: Scalar float tensor, the schedule's target.

        Returns:
            `(masks, thresholds)`: one boolean mask shaped like its weight
            and one scalar threshold (the smallest kept score) per entry.
        """
        raise NotImplementedError


class LayerMasks(MaskGroup):
    """The masks of one layer on its own: magnitude, block or N:M."""

    def __init__(self, wrapper):
        super().__init__([wrapper])
        self.wrapper = wrapper
        # N:M groups run along each weight's own input axis: the weights
        # of an attention layer belong to its projections.
        self.input_axes = [
            registry.weight_input_axis(wrapper.layer, weight)
            for weight, _, _ in wrapper.pruning_vars
        ]

    def schedule(self, step):
        should_prune, sparsity = super().schedule(step)
        if self.wrapper.sparsity_m_by_n is not None:
            # N:M masks are also computed at step 1, as in `tfmot`: the
            # pattern is in force from the first update, whatever the
            # schedule.
            should_prune = ops.logical_or(should_prune, ops.equal(step, 1))
        return should_prune, sparsity

    def compute_masks(self, weights, sparsity):
        wrapper = self.wrapper
        pairs = [
            masking.compute_mask(
                weight,
                sparsity,
                block_size=wrapper.block_size,
                pooling_type=wrapper.block_pooling_type,
                m_by_n=wrapper.sparsity_m_by_n,
                m_by_n_axis=axis,
            )
            for weight, axis in zip(weights, self.input_axes)
        ]
        return [mask for mask, _ in pairs], [t for _, t in pairs]


class _Step:
    """What one training step has done so far for one group."""

    def __init__(self):
        # Ids of the layers whose step this training step has advanced.
        self.advanced = set()
        # The group's masks for this step, once computed, by
        # `(id(wrapper), index)`.
        self.masks = None
        # Set by the first constraint: the forward pass is over, and the
        # next training-mode call starts a new step.
        self.closed = False


class _Run:
    """The pruned layers of a model in one training run, and their groups.

    Groups are built when all their layers are built: at once for a built
    model, at the first training step for a model built by it.
    """

    def __init__(self, model, wrappers):
        self.model = model
        self.wrappers = list(wrappers)
        # id(wrapper) -> its group, once built.
        self.groups = {}

    def _members(self, wrapper):
        schedule = wrapper.pruning_schedule
        key = schedule.mask_group_key()
        if key is None:
            return None
        return [
            w
            for w in self.wrappers
            if type(w.pruning_schedule) is type(schedule)
            and w.pruning_schedule.mask_group_key() == key
        ]

    def build(self, wrapper):
        """Builds the group of `wrapper` (built) if its layers are built."""
        members = self._members(wrapper)
        if members is None:
            group = LayerMasks(wrapper)
        else:
            unbuilt = [w.name for w in members if not w.built]
            if unbuilt:
                return None
            group = wrapper.pruning_schedule.make_mask_group(
                self.model, members
            )
        for member in group.wrappers:
            self.groups[id(member)] = group
        return group

    def group(self, wrapper):
        group = self.groups.get(id(wrapper)) or self.build(wrapper)
        if group is None:
            unbuilt = [w.name for w in self._members(wrapper) if not w.built]
            raise RuntimeError(
                f"Pruned layer {wrapper.name!r} computes its masks together "
                f"with layers that are not built yet: {unbuilt}. Build the "
                "model before training it, for example by giving it a "
                "`keras.Input` or calling `model.build(input_shape)`."
            )
        return group


def connect(model, wrappers) -> bool:
    """Readies `wrappers` (the pruned layers of `model`) for training.

    Groups them by their schedules' `mask_group_key` and builds each group
    with `make_mask_group` (at the first training step for layers not built
    yet). Called by `UpdatePruningStep.on_train_begin`.

    Returns:
        True when a training step of one of them was traced without the
        callback, so the caller must have it traced again.

    Raises:
        ValueError: If a group cannot be built (for example, its layers
            disagree on the schedule). No layer is connected then.
    """
    run = _Run(model, wrappers)
    for wrapper in run.wrappers:
        if wrapper.built and id(wrapper) not in run.groups:
            run.build(wrapper)
    for wrapper in run.wrappers:
        _RUNS[wrapper] = run
    retrace = False
    for wrapper in run.wrappers:
        retrace = retrace or wrapper in _UNDRIVEN
        _UNDRIVEN.discard(wrapper)
    return retrace


def disconnect(wrappers):
    """Ends the training run of `wrappers`: training them now raises."""
    for wrapper in wrappers:
        _RUNS.pop(wrapper, None)


def new_batch(wrappers):
    """Starts a new training step for `wrappers`, in this thread.

    Steps also end by themselves, at the first constraint; this covers
    steps whose update never ran (a `LossScaleOptimizer` skipping
    non-finite gradients in eager execution).
    """
    for wrapper in wrappers:
        run = _RUNS.get(wrapper)
        group = run and run.groups.get(id(wrapper))
        if group is not None:
            group._steps.current = None


def _group(wrapper):
    run = _RUNS.get(wrapper)
    if run is None:
        _UNDRIVEN.add(wrapper)
        raise RuntimeError(MISSING_CALLBACK_MESSAGE.format(name=wrapper.name))
    return run.group(wrapper)


def _trains(wrapper):
    """Whether the optimizer updates any pruned weight of `wrapper`."""
    trainable = {id(v) for v in wrapper.trainable_weights}
    return any(id(weight) in trainable for weight, _, _ in wrapper.pruning_vars)


def training_call(wrapper):
    """Runs the engine's part of `wrapper`'s training-mode call.

    Advances `wrapper`'s step once per training step and, at the group's
    first call in the step, updates the group's masks.

    Raises:
        RuntimeError: If no `UpdatePruningStep` drives `wrapper`.
    """
    group = _group(wrapper)
    if not _trains(wrapper):
        # A frozen layer keeps its masks and step, as it keeps its weights.
        return
    step = getattr(group._steps, "current", None)
    if step is None or step.closed:
        step = group._steps.current = _Step()
    if id(wrapper) in step.advanced:
        return
    step.advanced.add(id(wrapper))
    value = ops.maximum(ops.convert_to_tensor(wrapper.pruning_step), 0) + 1
    wrapper.pruning_step.assign(value)
    if step.masks is None:
        step.masks = _update_masks(group, value)


def _update_masks(group, step):
    """Recomputes the group's masks when its schedule says so; returns the
    masks in force for this step, by `(id(wrapper), index)`."""
    should_prune, sparsity = group.schedule(step)
    variables = [wrapper.pruning_vars[i] for wrapper, i in group.entries]

    def compute():
        # The mask math has no gradient.
        # Read in the weights' own dtype: a mixed-precision layer's reads
        # are cast to float16.
        weights = [
            ops.stop_gradient(_keras_internals.raw_value(weight))
            for weight, _, _ in variables
        ]
        masks, thresholds = group.compute_masks(weights, sparsity)
        return list(masks), [ops.cast(t, "float32") for t in thresholds]

    def current_masks():
        return [ops.convert_to_tensor(mask) for _, mask, _ in variables]

    def current():
        return (
            current_masks(),
            [ops.convert_to_tensor(t) for _, _, t in variables],
        )

    def assign(masks, thresholds):
        for (weight, mask_var, threshold_var), mask, threshold in zip(
            variables, masks, thresholds
        ):
            mask_var.assign(mask)
            threshold_var.assign(threshold)
            # tfmot's order: the pruning step's own forward pass and
            # gradients already see the new masks.
            value = _keras_internals.raw_value(weight)
            weight.assign(ops.where(mask, value, ops.zeros((), value.dtype)))

    if _ASSIGN_IN_BRANCH:

        def update():
            assign(*compute())
            return ops.ones((), "bool")

        ops.cond(should_prune, update, lambda: ops.zeros((), "bool"))
    else:
        # Outside a pruning step the weights are already zero outside the
        # masks, so zeroing them again changes nothing.
        assign(*ops.cond(should_prune, compute, current))
    # Read back: where the masks were assigned in a branch, these reads
    # come after it; on JAX they are the assigned values. Keyed by entry,
    # for the constraints.
    return {
        (id(wrapper), index): mask
        for (wrapper, index), mask in zip(group.entries, current_masks())
    }


def current_mask(wrapper, index):
    """The mask of `wrapper.pruning_vars[index]` in this training step.

    Called by the weight's constraint, after the optimizer update.

    Raises:
        RuntimeError: If no `UpdatePruningStep` drives `wrapper`, or if the
            layer was not called in training mode in this step.
    """
    group = _group(wrapper)
    step = getattr(group._steps, "current", None)
    if step is None or step.masks is None:
        raise RuntimeError(NOT_TRAINING_MESSAGE.format(name=wrapper.name))
    step.closed = True
    return step.masks[(id(wrapper), index)]
