"""`PruneLowMagnitude`: the layer wrapper that holds masks and prunes.

For each pruned weight the wrapper holds a boolean mask and the last
threshold, plus one `pruning_step` counter, and gives the weight a
constraint. How masks follow the schedule in training is the engine's
(`kprune.engine`): the wrapper's training-mode call hands over to it, and
the constraint applies the step's mask right after each optimizer update.
The forward pass is the wrapped layer's own, with no extra work.
"""

import inspect

import keras
import numpy as np
from keras import ops

from kprune import _keras_internals
from kprune import engine
from kprune import registry
from kprune.api_export import kprune_export
from kprune.schedules import ConstantSparsity
from kprune.schedules import PruningSchedule
from kprune.schedules import integral_value

# tfmot's default; schedules are immutable, so one instance is shared.
DEFAULT_SCHEDULE = ConstantSparsity(0.5, 0)


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


class _PruningConstraint:
    """Applied by the optimizer to a pruned weight after each update: keeps
    the weight's own constraint, then zeroes it outside the step's mask."""

    def __init__(self, wrapper, index, original):
        self.wrapper = wrapper
        self.index = index
        self.original = original

    def __call__(self, weight):
        mask = engine.current_mask(self.wrapper, self.index)
        if self.original is not None:
            weight = self.original(weight)
        weight = ops.convert_to_tensor(weight)
        return ops.where(mask, weight, ops.zeros((), weight.dtype))


@kprune_export("kprune")
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
        for i, (weight, _, _) in enumerate(self.pruning_vars):
            original = weight.constraint
            if isinstance(original, _PruningConstraint):
                original = original.original
            weight.constraint = _PruningConstraint(self, i, original)

    def call(self, *args, **kwargs):
        # Keras has bound the arguments to the wrapped layer's signature
        # (see `_mirror_call_signature`), and added `training` and masks.
        if kwargs.get("training"):
            # Raises when no callback drives this layer, as the training
            # step is traced: before any update.
            engine.training_call(self)
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


def require_model(model):
    """Raises the error every public function that takes a model gives for
    anything else (a layer, a list of layers, a path)."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Argument `model` must be a Keras model. Received: model={model!r}"
        )


def collect_pruned_layers(model) -> list:
    """All `PruneLowMagnitude` layers in `model`, nested ones included."""
    if isinstance(model, PruneLowMagnitude):
        return [model]
    return [
        layer
        for layer in _keras_internals.flatten_layers(model)
        if isinstance(layer, PruneLowMagnitude)
    ]
