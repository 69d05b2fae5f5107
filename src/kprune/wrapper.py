"""`PruneLowMagnitude`: the layer wrapper that holds masks and prunes.

How pruning runs inside training: each pruned weight gets a constraint,
which Keras optimizers apply right after every update. The constraint
advances the layer's step, recomputes the mask when the schedule says so,
and sets the weights outside the mask to zero. So masks change inside the
compiled training step (no host round trip), and pruned weights are exactly
zero after every optimizer update, which is when callbacks and checkpoints
see them. The forward pass is the wrapped layer's own, with no extra work.

On JAX the optimizer update is a pure function of the trainable and
optimizer variables (`optimizer.stateless_apply`): state assigned there is
dropped, and other variables read there are constants of the compiled step.
So on JAX the layer's training-mode call advances the step and recomputes
masks (from the weights as the step starts; non-trainable state changed in
a call is what JAX training threads through), and the constraint zeros the
updated weights with those masks, which the call handed it within the same
trace.
"""

import inspect

import keras
import numpy as np
from keras import ops

from kprune import _keras_internals
from kprune import masking
from kprune import registry
from kprune.schedules import ConstantSparsity
from kprune.schedules import PruningSchedule
from kprune.schedules import integral_value

# Where the step advances: in the layer's training call (JAX), or in the
# constraint, right after the optimizer update (TensorFlow, torch).
STEP_IN_CALL = keras.backend.backend() == "jax"

# tfmot's default; schedules are immutable, so one instance is shared.
DEFAULT_SCHEDULE = ConstantSparsity(0.5, 0)

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
if STEP_IN_CALL:
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
    "called with `training=True` in the same training step. On the JAX "
    "backend the pruning step advances in the layer's training-mode call, "
    "so every model between `fit` and the pruned layer must pass `training` "
    "on: give a subclassed model's `call` a `training=None` argument and "
    "call its layers with `training=training`."
)


def validate_pruning_args(block_size, block_pooling_type, sparsity_m_by_n):
    """Checks the pruning pattern arguments and returns them normalized.

    Returns:
        `(block_size, block_pooling_type, sparsity_m_by_n)` as
        `(tuple, str, tuple or None)`.

    Raises:
        ValueError: If an argument is malformed or the combination is
            unsupported.
    """
    try:
        block = tuple(integral_value(b) for b in block_size)
    except TypeError:
        block = None
    if block is None or len(block) != 2 or None in block or min(block) < 1:
        raise ValueError(
            "Argument `block_size` must be a tuple of 2 integers >= 1, such "
            f"as (1, 1) or (4, 1). Received: block_size={block_size!r}"
        )
    if block_pooling_type not in ("AVG", "MAX"):
        raise ValueError(
            'Argument `block_pooling_type` must be "AVG" or "MAX". '
            f"Received: block_pooling_type={block_pooling_type!r}"
        )
    m_by_n = None
    if sparsity_m_by_n is not None:
        try:
            m_by_n = tuple(integral_value(v) for v in sparsity_m_by_n)
        except TypeError:
            m_by_n = ()
        if len(m_by_n) != 2 or None in m_by_n or not 0 < m_by_n[0] < m_by_n[1]:
            raise ValueError(
                "Argument `sparsity_m_by_n` must be a tuple (m, n) of "
                "integers with 0 < m < n: m zeros in every n consecutive "
                f"weights, such as (2, 4). Received: "
                f"sparsity_m_by_n={sparsity_m_by_n!r}"
            )
        if block != (1, 1):
            raise ValueError(
                "Arguments `sparsity_m_by_n` and `block_size` cannot be "
                "combined: choose N:M sparsity or block sparsity. Received: "
                f"sparsity_m_by_n={sparsity_m_by_n!r}, "
                f"block_size={block_size!r}"
            )
    return block, block_pooling_type, m_by_n


def validate_schedule(pruning_schedule):
    if not isinstance(pruning_schedule, PruningSchedule):
        raise ValueError(
            "Argument `pruning_schedule` must be a `kprune.PruningSchedule` "
            "such as `kprune.ConstantSparsity(0.5, begin_step=0)`. "
            f"Received: pruning_schedule={pruning_schedule!r}"
        )


def _symbolic(value):
    if isinstance(value, keras.KerasTensor) or not (
        keras.ops.is_tensor(value) or isinstance(value, np.ndarray)
    ):
        return value
    return keras.KerasTensor(
        value.shape, dtype=keras.backend.standardize_dtype(value.dtype)
    )


def _new_mask(wrapper, weight, sparsity):
    return masking.compute_mask(
        weight,
        sparsity,
        block_size=wrapper.block_size,
        pooling_type=wrapper.block_pooling_type,
        m_by_n=wrapper.sparsity_m_by_n,
        m_by_n_axis=registry.input_channel_axis(wrapper.layer),
    )


def _schedule(wrapper, step):
    """`(should_prune, sparsity)` of `wrapper` at `step`. N:M masks are also
    computed at step 1, as in `tfmot`: the pattern is in force from the
    first update, whatever the schedule."""
    should_prune, sparsity = wrapper.pruning_schedule(step)
    if wrapper.sparsity_m_by_n is not None:
        should_prune = ops.logical_or(should_prune, ops.equal(step, 1))
    return should_prune, sparsity


def _update_mask(wrapper, index, weight, should_prune, sparsity):
    """Returns the mask for `weight`, recomputed when `should_prune`."""
    _, mask_var, threshold_var = wrapper.pruning_vars[index]

    # Masks are written only on pruning steps: on the others the cost is
    # one masked select of the weight.
    def update():
        mask, threshold = _new_mask(wrapper, weight, sparsity)
        mask_var.assign(mask)
        threshold_var.assign(ops.cast(threshold, threshold_var.dtype))
        return mask

    def keep():
        return ops.convert_to_tensor(mask_var)

    return ops.cond(should_prune, update, keep)


def _update_mask_functional(wrapper, index, weight, should_prune, sparsity):
    """`_update_mask` for JAX, which cannot assign inside a `cond` branch."""
    _, mask_var, threshold_var = wrapper.pruning_vars[index]

    def update():
        mask, threshold = _new_mask(wrapper, weight, sparsity)
        return mask, ops.cast(threshold, "float32")

    def keep():
        return (
            ops.convert_to_tensor(mask_var),
            ops.convert_to_tensor(threshold_var),
        )

    mask, threshold = ops.cond(should_prune, update, keep)
    mask_var.assign(mask)
    threshold_var.assign(threshold)
    return mask


class _PruningConstraint:
    """Applied by the optimizer to a pruned weight after each update."""

    def __init__(self, wrapper, index, original, advances_step, last=True):
        self.wrapper = wrapper
        self.index = index
        self.original = original
        self.advances_step = advances_step
        # The last constraint the optimizer applies for this layer.
        self.last = last

    def __call__(self, weight):
        wrapper = self.wrapper
        if not wrapper._step_driven:
            raise RuntimeError(
                MISSING_CALLBACK_MESSAGE.format(name=wrapper.name)
            )
        if self.original is not None:
            weight = self.original(weight)
        weight = ops.convert_to_tensor(weight)
        if STEP_IN_CALL:
            mask = wrapper._current_mask(self.index, done=self.last)
            return ops.where(mask, weight, ops.zeros((), weight.dtype))
        if self.advances_step:
            # -1 (never trained) also becomes 1: the first batch is step 1.
            wrapper.pruning_step.assign(
                ops.maximum(wrapper.pruning_step, 0) + 1
            )
        if wrapper._mask_group is not None:
            # Masks that depend on other layers' weights (global magnitude,
            # structured pruning) are computed by the group.
            return wrapper._mask_group.constrain(self, weight)
        if getattr(wrapper.pruning_schedule, "needs_group", False):
            raise RuntimeError(
                f"Pruned layer {wrapper.name!r} uses "
                f"{type(wrapper.pruning_schedule).__name__}, whose masks are "
                "computed across layers, but it was not connected to its "
                "group. `kprune.UpdatePruningStep().on_train_begin()` "
                "connects it: use the callback in `fit`, or call "
                "`set_model(model)` and `on_train_begin()` in a custom loop."
            )
        should_prune, sparsity = _schedule(wrapper, wrapper.pruning_step)
        mask = _update_mask(wrapper, self.index, weight, should_prune, sparsity)
        return ops.where(mask, weight, ops.zeros((), weight.dtype))


@keras.saving.register_keras_serializable(package="kprune")
class PruneLowMagnitude(keras.layers.Wrapper):
    """Wraps a layer so that its weights are pruned by magnitude in training.

    For each pruned weight the wrapper holds a boolean mask (1 byte per
    weight) and the last threshold, plus one `pruning_step` counter. Use
    `kprune.prune_low_magnitude` rather than this class directly; the
    arguments are the same. The wrapper is called exactly as the layer it
    wraps (keywords, masks, `training`, extra arguments). A layer with
    nothing to prune, such as `Dropout`, may be wrapped: it gets no mask.

    Args:
        layer: The Keras layer to prune.
        pruning_schedule: A `kprune.PruningSchedule`.
        block_size: `(height, width)` of blocks pruned together, for rank-2
            weights; `(1, 1)` prunes single weights.
        block_pooling_type: `"AVG"` or `"MAX"`: how a block is scored.
        sparsity_m_by_n: `None`, or `(m, n)`: `m` zeros in every `n`
            consecutive input channels.
        **kwargs: Passed to `keras.layers.Layer`, such as `name`.

    Raises:
        ValueError: If an argument is invalid, or if the layer's weights do
            not suit the pattern (block sparsity needs rank-2 weights, N:M
            needs rank >= 2).
    """

    def __init__(
        self,
        layer,
        pruning_schedule=DEFAULT_SCHEDULE,
        block_size=(1, 1),
        block_pooling_type="AVG",
        sparsity_m_by_n=None,
        **kwargs,
    ):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                "Argument `layer` must be a `keras.layers.Layer`. "
                f"Received: layer={layer!r}"
            )
        validate_schedule(pruning_schedule)
        block_size, block_pooling_type, sparsity_m_by_n = validate_pruning_args(
            block_size, block_pooling_type, sparsity_m_by_n
        )
        status = registry.status(layer)
        # An unbuilt container (a custom layer that creates its sublayers
        # in `build`) is checked when built. A layer with nothing to prune
        # (Dropout, a normalization) is wrapped with no masks, as in tfmot.
        if status == registry.REJECTED or (
            status == registry.UNKNOWN and layer.built
        ):
            raise registry.unsupported_layer_error(layer)
        if layer.built:
            self._check_weights(
                layer,
                registry.get_prunable_weights(layer),
                block_size,
                sparsity_m_by_n,
            )
        kwargs.setdefault("name", f"prune_low_magnitude_{layer.name}")
        # Under mixed precision the wrapper computes in the variables' dtype,
        # so masks come from the float32 weights; the wrapped layer still
        # computes in float16 or bfloat16.
        kwargs.setdefault("dtype", layer.dtype_policy.variable_dtype)
        super().__init__(layer, **kwargs)
        self.pruning_schedule = pruning_schedule
        self.block_size = block_size
        self.block_pooling_type = block_pooling_type
        self.sparsity_m_by_n = sparsity_m_by_n
        self.pruning_vars = []
        # Set by `UpdatePruningStep`; checked when training starts.
        self._step_driven = False
        # Set when a training step was traced without the callback; read
        # by `UpdatePruningStep`, which then has that trace discarded.
        self._traced_without_callback = False
        # Set by `UpdatePruningStep` for layers whose masks are computed
        # together with other layers' (see `kprune.groups`).
        self._mask_group = None
        # JAX: (step, masks) of the training step being traced.
        self._step_state = None
        # tfmot code writes `Sequential([prune_low_magnitude(Dense(2,
        # input_shape=...))])`; Sequential reads the legacy input shape from
        # its first layer, which is now the wrapper.
        if "input_shape" not in kwargs:
            _keras_internals.copy_legacy_input_shape(layer, self)
        self._mirror_call_signature()

    def _mirror_call_signature(self):
        """Makes Keras see the wrapped layer's `call` signature here.

        Keras binds a call's arguments to the layer's `call` signature to
        find its tensors, fill in masks (`mask`, or `query_mask` for an
        input `query`) and `training`. With the wrapped layer's signature,
        keyword calls such as `mha(query=x, value=x)`, extra arguments
        such as keras-hub's `cache=` and masks reach the wrapped layer
        exactly as they would unwrapped.
        """
        layer = self.layer
        signature = inspect.signature(layer.call)
        params = list(signature.parameters.values())
        # The wrapper needs `training` even when the wrapped layer does not
        # take it (it then reads it from the call context).
        self._inner_takes_training = "training" in signature.parameters
        if not self._inner_takes_training:
            position = len(params)
            if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
                position -= 1
            params.insert(
                position,
                inspect.Parameter(
                    "training", inspect.Parameter.KEYWORD_ONLY, default=None
                ),
            )
            signature = signature.replace(parameters=params)
        _keras_internals.set_call_signature(self, signature, like=layer)
        self.supports_masking = layer.supports_masking

    def _inner_kwargs(self, kwargs):
        """`kwargs` without the `training` the wrapped layer does not take."""
        if self._inner_takes_training or "training" not in kwargs:
            return kwargs
        return {k: v for k, v in kwargs.items() if k != "training"}

    @staticmethod
    def _check_weights(layer, weights, block_size, sparsity_m_by_n):
        for weight in weights:
            rank = len(weight.shape)
            if block_size != (1, 1) and rank != 2:
                raise ValueError(
                    f"Block sparsity needs rank-2 weights, but weight "
                    f"{weight.path!r} of layer {layer.name!r} has shape "
                    f"{tuple(weight.shape)}. Use block_size=(1, 1) for this "
                    "layer."
                )
            if sparsity_m_by_n is not None and rank < 2:
                raise ValueError(
                    f"N:M sparsity needs weights of rank >= 2 (it groups "
                    f"input channels), but weight {weight.path!r} of layer "
                    f"{layer.name!r} has shape {tuple(weight.shape)}."
                )

    def build(self, input_shape=None):
        super().build(input_shape)
        weights = registry.get_prunable_weights(self.layer)
        self._check_weights(
            self.layer, weights, self.block_size, self.sparsity_m_by_n
        )
        pruning_vars = []
        for weight in weights:
            mask = self.add_weight(
                name=f"{weight.name}_mask",
                shape=weight.shape,
                dtype="bool",
                initializer="ones",
                trainable=False,
            )
            threshold = self.add_weight(
                name=f"{weight.name}_threshold",
                shape=(),
                dtype="float32",
                initializer="zeros",
                trainable=False,
            )
            pruning_vars.append((weight, mask, threshold))
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            dtype="int64",
            initializer=keras.initializers.Constant(-1),
            trainable=False,
        )
        self.pruning_vars = pruning_vars
        self._install_constraints()

    def _install_constraints(self):
        # The optimizer visits variables in the layer's trainable order; the
        # first pruned weight in that order advances the step, so the step
        # moves once per update even when the layer is called several times.
        trainable = [id(v) for v in self.layer.trainable_weights]
        order = sorted(
            (trainable.index(id(w)), i)
            for i, (w, _, _) in enumerate(self.pruning_vars)
            if id(w) in trainable
        )
        clock = order[0][1] if order else None
        last = order[-1][1] if order else None
        for i, (weight, _, _) in enumerate(self.pruning_vars):
            original = weight.constraint
            if isinstance(original, _PruningConstraint):
                original = original.original
            weight.constraint = _PruningConstraint(
                self, i, original, advances_step=(i == clock), last=(i == last)
            )

    def call(self, *args, **kwargs):
        # Keras has bound the arguments to the wrapped layer's signature
        # (see `_mirror_call_signature`), and added `training` and masks.
        training = kwargs.get("training")
        # Checked when the training step is traced, so a missing callback
        # stops `fit` before any update (on JAX, after `fit` has detached
        # the weights: see `MISSING_CALLBACK_MESSAGE`).
        if training and not self._step_driven:
            self._traced_without_callback = True
            raise RuntimeError(MISSING_CALLBACK_MESSAGE.format(name=self.name))
        if training and STEP_IN_CALL:
            self._advance_step()
        # A `training` the wrapped layer does not take goes to its call
        # context, where its own sublayers read it.
        return self.layer(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not self.built and not self.layer.built:
            # Build the wrapped layer from the full call, as Keras would:
            # `build(input_shape)` sees only the first input, which is not
            # enough for layers such as `MultiHeadAttention`.
            kwargs_ = {k: v for k, v in kwargs.items() if k != "training"}
            self.layer(
                *keras.tree.map_structure(_symbolic, args),
                **keras.tree.map_structure(_symbolic, kwargs_),
            )
        return super().__call__(*args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        # The wrapped layer's own spec: it handles inputs of any number and
        # kind (attention), and layers whose `call` cannot be traced with
        # unknown dimensions on JAX (keras-hub's `PositionEmbedding`).
        return self.layer.compute_output_spec(
            *args, **self._inner_kwargs(kwargs)
        )

    def get_build_config(self):
        config = dict(super().get_build_config() or {})
        inner = self.layer.get_build_config()
        if inner:
            config["layer_build_config"] = inner
        return config

    def build_from_config(self, config):
        config = dict(config)
        inner = config.pop("layer_build_config", None)
        if inner and not self.layer.built:
            self.layer.build_from_config(inner)
        super().build_from_config(config)

    def load_own_variables(self, store):
        # The variables Keras's own `load_own_variables` assigns, in order.
        own = _keras_internals.own_variables(self)
        found = [tuple(store[str(i)].shape) for i in range(len(store.keys()))]
        needed = [tuple(v.shape) for v in own]
        if found != needed:
            # Checked before anything is assigned, so this layer is left
            # as it was.
            raise ValueError(
                f"Cannot load the pruning state of layer {self.name!r}: it "
                f"needs {len(needed)} variables (masks, thresholds, step) of "
                f"shapes {needed}, and the file holds {len(found)} of shapes "
                f"{found}. The file was saved from a model that is not "
                "pruned, pruned differently, or of another architecture. To "
                "start pruning from a plain model's weights, load them into "
                "the plain model, then call `kprune.prune_low_magnitude`. "
                "Nothing was loaded into this layer."
            )
        super().load_own_variables(store)

    def _advance_step(self):
        """Advances the step and updates masks, once per training step."""
        current = self.pruning_step.value
        # A layer called twice in one step sees the step it assigned.
        if self._step_state is not None and self._step_state[0] is current:
            return
        step = ops.maximum(current, 0) + 1
        self.pruning_step.assign(step)
        should_prune, sparsity = _schedule(self, step)
        masks = [
            # The mask math has no gradient, so its results belong to the
            # enclosing compiled step, where the constraint uses them.
            _update_mask_functional(
                self,
                i,
                ops.stop_gradient(ops.convert_to_tensor(weight)),
                should_prune,
                sparsity,
            )
            for i, (weight, _, _) in enumerate(self.pruning_vars)
        ]
        self._step_state = (self.pruning_step.value, masks)

    def _current_mask(self, index, done):
        """The mask this training step's call computed (JAX)."""
        state = self._step_state
        if done:
            # The next call starts a new step, even if it sees the same
            # step value (eager training passes values through unchanged).
            self._step_state = None
        if state is None:
            raise RuntimeError(NOT_TRAINING_MESSAGE.format(name=self.name))
        return state[1][index]

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def masked_layer_weights(self) -> list:
        """The wrapped layer's weights as NumPy arrays, with masks applied.

        Returns:
            A list in the order of `self.layer.weights`, ready for
            `set_weights` on a plain copy of the layer.
        """
        values = [ops.convert_to_numpy(v) for v in self.layer.weights]
        positions = {id(v): i for i, v in enumerate(self.layer.weights)}
        for weight, mask, _ in self.pruning_vars:
            i = positions[id(weight)]
            # A select, not a product: `-w * 0` is -0.0, which compresses
            # worse than 0.0.
            values[i] = np.where(
                ops.convert_to_numpy(mask),
                values[i],
                np.zeros((), values[i].dtype),
            )
        return values

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pruning_schedule": keras.saving.serialize_keras_object(
                    self.pruning_schedule
                ),
                "block_size": list(self.block_size),
                "block_pooling_type": self.block_pooling_type,
                "sparsity_m_by_n": (
                    None
                    if self.sparsity_m_by_n is None
                    else list(self.sparsity_m_by_n)
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["pruning_schedule"] = keras.saving.deserialize_keras_object(
            config["pruning_schedule"], custom_objects=custom_objects
        )
        return super().from_config(config, custom_objects=custom_objects)


def collect_pruned_layers(model) -> list:
    """All `PruneLowMagnitude` layers in `model`, nested ones included."""
    if isinstance(model, PruneLowMagnitude):
        return [model]
    return [
        layer
        for layer in _keras_internals.flatten_layers(model)
        if isinstance(layer, PruneLowMagnitude)
    ]
