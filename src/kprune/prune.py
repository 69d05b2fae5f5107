"""`prune_low_magnitude`, `strip_pruning` and `prune_scope`."""

import keras

from kprune import registry
from kprune.schedules import ConstantSparsity
from kprune.schedules import PolynomialDecay
from kprune.schedules import PruningSchedule
from kprune.wrapper import DEFAULT_SCHEDULE
from kprune.wrapper import PruneLowMagnitude
from kprune.wrapper import validate_pruning_args
from kprune.wrapper import validate_schedule


def _is_model(obj) -> bool:
    return isinstance(obj, keras.Model)


def _clone_graph_model(model, clone_function, what, instead):
    try:
        return keras.models.clone_model(
            model, clone_function=clone_function, recursive=True
        )
    except ValueError as error:
        if isinstance(model, keras.Sequential) or not _is_subclassed(model):
            raise
        raise ValueError(
            f"{what} supports Sequential and functional models; "
            f"{type(model).__name__!r} is a subclassed model. {instead}"
        ) from error


def _is_subclassed(model) -> bool:
    return not isinstance(model, keras.Sequential) and not hasattr(
        model, "_nodes_by_depth"
    )


def _fresh_copy(layer):
    return layer.__class__.from_config(layer.get_config())


def _has_weights_unbuilt(layer) -> bool:
    """For an unbuilt layer: whether building it is likely to add weights."""
    return bool(layer.weights) or (
        type(layer).build is not keras.layers.Layer.build
    )


def _wrap_layer(layer, params):
    if isinstance(layer, PruneLowMagnitude):
        return layer
    if registry.is_prunable(layer):
        return PruneLowMagnitude(layer, **params)
    if registry.has_nothing_to_prune(layer):
        return layer
    if layer.built or _has_weights_unbuilt(layer):
        raise registry.unsupported_layer_error(layer)
    return layer


def _copy_weights(pairs):
    for old, new in pairs:
        if isinstance(new, PruneLowMagnitude) and not isinstance(
            old, PruneLowMagnitude
        ):
            new.layer.set_weights(old.get_weights())
        elif old.weights:
            new.set_weights(old.get_weights())


def _schedule_map(schedules):
    """Validates a dict of layer name to schedule (or sparsity)."""
    result = {}
    for name, value in schedules.items():
        if not isinstance(name, str):
            raise ValueError(
                "The keys of a per-layer `pruning_schedule` dict must be "
                f"layer names. Received the key {name!r}."
            )
        if isinstance(value, PruningSchedule):
            result[name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            PruningSchedule._validate_sparsity(
                value, f"pruning_schedule[{name!r}]"
            )
            result[name] = ConstantSparsity(float(value), begin_step=0)
        else:
            raise ValueError(
                f"Argument `pruning_schedule[{name!r}]` must be a "
                "`kprune.PruningSchedule` or a sparsity in [0, 1). "
                f"Received: {value!r}"
            )
    return result


def _prune_model(model, params, pruning_policy, schedules=None):
    if pruning_policy is not None:
        pruning_policy.ensure_model_supports_pruning(model)
    pairs = []
    seen = set()

    def clone(layer):
        # Called on each original layer before its copy is built, so a
        # layer that does not suit the arguments fails the call at once,
        # and the input model is never touched.
        if registry.is_prunable(layer):
            seen.add(layer.name)
        if isinstance(layer, PruneLowMagnitude):
            new = _fresh_copy(layer)
        elif (
            registry.is_prunable(layer)
            and (schedules is None or layer.name in schedules)
            and (pruning_policy is None or pruning_policy.allow_pruning(layer))
        ):
            layer_params = params
            if schedules is not None:
                layer_params = {
                    **params,
                    "pruning_schedule": schedules[layer.name],
                }
            if layer.built:
                PruneLowMagnitude._check_weights(
                    layer,
                    registry.get_prunable_weights(layer),
                    params["block_size"],
                    params["sparsity_m_by_n"],
                )
            new = PruneLowMagnitude(_fresh_copy(layer), **layer_params)
        elif (
            registry.has_nothing_to_prune(layer)
            or registry.is_prunable(layer)
            or not layer.weights
        ):
            new = _fresh_copy(layer)
        else:
            raise registry.unsupported_layer_error(layer)
        pairs.append((layer, new))
        return new

    pruned = _clone_graph_model(
        model,
        clone,
        "`prune_low_magnitude`",
        "Prune the layers inside it instead: wrap them with "
        "`kprune.prune_low_magnitude(layer)` where the model creates them.",
    )
    if schedules is not None:
        unknown = sorted(set(schedules) - seen)
        if unknown:
            raise ValueError(
                "Argument `pruning_schedule` names layers that are not "
                f"prunable layers of the model: {unknown}. Prunable layers: "
                f"{sorted(seen)}"
            )
    _copy_weights(pairs)
    return pruned


def prune_low_magnitude(
    to_prune,
    pruning_schedule: PruningSchedule = DEFAULT_SCHEDULE,
    block_size=(1, 1),
    block_pooling_type: str = "AVG",
    sparsity_m_by_n=None,
    pruning_policy=None,
    **kwargs,
):
    """Makes a layer, a list of layers or a model prune during training.

    Each prunable layer is wrapped in a `kprune.PruneLowMagnitude` whose
    masks follow `pruning_schedule`: at the steps the schedule names, the
    weights of smallest magnitude are set to zero, and they stay exactly
    zero after every optimizer update. Train with the
    `kprune.UpdatePruningStep` callback, then call `kprune.strip_pruning`
    to export a plain model.

    - A layer, or each layer of a list, is wrapped in place: the wrapper
      owns that very layer object.
    - A `keras.Sequential` or functional model is cloned, nested models and
      shared layers included; the clone starts from the model's current
      weights and the input model is left unchanged.
    - Layers already wrapped are kept as they are (not wrapped twice).
    - Layers without weights, and layers whose weights are not worth
      pruning (normalization layers), are kept dense.

    Args:
        to_prune: A Keras layer, a list of layers, or a Sequential or
            functional model.
        pruning_schedule: A `kprune.PruningSchedule`: when to prune and to
            which sparsity.
            For a model, it may also be a dict of layer name to schedule
            (or to a sparsity `s`, meaning `ConstantSparsity(s, 0)`): each
            named layer gets its own schedule and the layers not named stay
            dense; see `kprune.per_layer_schedules`.
        block_size: `(height, width)` of blocks of a rank-2 weight pruned
            together; `(1, 1)` (default) prunes single weights.
        block_pooling_type: `"AVG"` or `"MAX"`: how a block's magnitudes
            are pooled into its score.
        sparsity_m_by_n: `None`, or `(m, n)` such as `(2, 4)`: `m` zeros in
            every `n` consecutive weights along the input channels. Masks
            are recomputed when the schedule says to prune; its sparsity
            value is ignored since the pattern fixes it.
        pruning_policy: A `kprune.PruningPolicy` deciding which layers of a
            model may be pruned (models only).
        **kwargs: Passed to each `PruneLowMagnitude` wrapper (layers only).

    Returns:
        The wrapped layer, the list of wrapped layers, or the pruned model.

    Raises:
        ValueError: If an argument is invalid, a layer's weights do not
            suit the block or N:M pattern, or a layer has weights that
            kprune does not know how to prune. Nothing is modified then.

    Example:

    ```python
    pruned = kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.PolynomialDecay(
            initial_sparsity=0.5, final_sparsity=0.8,
            begin_step=0, end_step=1000,
        ),
    )
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, y, callbacks=[kprune.UpdatePruningStep()])
    ```
    """
    schedules = None
    if isinstance(pruning_schedule, dict):
        if not _is_model(to_prune):
            raise ValueError(
                "A per-layer `pruning_schedule` dict applies to whole models "
                f"only. Received a {type(to_prune).__name__}: pass a "
                "schedule instead."
            )
        schedules = _schedule_map(pruning_schedule)
        pruning_schedule = DEFAULT_SCHEDULE
    validate_schedule(pruning_schedule)
    block_size, block_pooling_type, sparsity_m_by_n = validate_pruning_args(
        block_size, block_pooling_type, sparsity_m_by_n
    )
    params = {
        "pruning_schedule": pruning_schedule,
        "block_size": block_size,
        "block_pooling_type": block_pooling_type,
        "sparsity_m_by_n": sparsity_m_by_n,
    }
    if _is_model(to_prune):
        if kwargs:
            raise ValueError(
                "Extra keyword arguments are only accepted when pruning a "
                "layer or a list of layers, not a model. Received: "
                f"{sorted(kwargs)}"
            )
        return _prune_model(to_prune, params, pruning_policy, schedules)
    if pruning_policy is not None:
        raise ValueError(
            "Argument `pruning_policy` applies to whole models only. "
            f"Received a {type(to_prune).__name__}."
        )
    params.update(kwargs)
    if isinstance(to_prune, (list, tuple)):
        bad = [x for x in to_prune if not isinstance(x, keras.layers.Layer)]
        if bad:
            raise ValueError(
                "Argument `to_prune` must be a layer, a list of layers or a "
                f"model. Received a list containing: {bad[0]!r}"
            )
        return [_wrap_layer(layer, params) for layer in to_prune]
    if isinstance(to_prune, keras.layers.Layer):
        return _wrap_layer(to_prune, params)
    raise ValueError(
        "Argument `to_prune` must be a Keras layer, a list of layers, or a "
        f"Sequential or functional model. Received: {to_prune!r}"
    )


def strip_pruning(model):
    """Returns a plain copy of a pruned model, for export.

    Every `PruneLowMagnitude` wrapper is replaced by a copy of the layer it
    wraps, holding the masked (sparse) weights. The result contains no
    kprune objects: it saves and loads with plain `keras.saving`, and its
    predictions equal the pruned model's. Like `tfmot`'s, it is not
    compiled, so that a saved export holds no optimizer state; compile it
    to evaluate it. The pruned model is unchanged.

    Args:
        model: A Sequential or functional model, pruned or not.

    Returns:
        A new model of the same architecture without pruning wrappers.

    Raises:
        ValueError: If `model` is not a Keras model.

    Example:

    ```python
    final = kprune.strip_pruning(pruned)
    final.save("pruned.keras")
    ```
    """
    if not _is_model(model):
        raise ValueError(
            "Argument `model` must be a Keras model (Sequential or "
            f"functional). Received: {model!r}"
        )
    pairs = []

    def clone(layer):
        new = _fresh_copy(
            layer.layer if isinstance(layer, PruneLowMagnitude) else layer
        )
        pairs.append((layer, new))
        return new

    stripped = _clone_graph_model(
        model,
        clone,
        "`strip_pruning`",
        "Read the sparse weights of each `kprune.PruneLowMagnitude` inside "
        "it with `layer.masked_layer_weights()`.",
    )
    for old, new in pairs:
        if isinstance(old, PruneLowMagnitude):
            new.set_weights(old.masked_layer_weights())
        elif old.weights:
            new.set_weights(old.get_weights())
    if stripped.compiled:
        # `clone_model` recompiles the copy with a new optimizer whose
        # state would be saved with it; an export needs only the weights.
        plain = stripped.__class__.from_config(stripped.get_config())
        plain.set_weights(stripped.get_weights())
        return plain
    return stripped


_CUSTOM_OBJECTS = {
    "PruneLowMagnitude": PruneLowMagnitude,
    "ConstantSparsity": ConstantSparsity,
    "PolynomialDecay": PolynomialDecay,
}


def prune_scope():
    """Scope in which pruned models deserialize, for `tfmot` code.

    kprune registers its classes with Keras, so `keras.saving.load_model`
    needs no scope; this exists so that code written for `tfmot` runs
    unchanged.

    Returns:
        A `keras.saving.custom_object_scope` context manager.

    Example:

    ```python
    with kprune.prune_scope():
        model = keras.saving.load_model("pruned.keras")
    ```
    """
    return keras.saving.custom_object_scope(_CUSTOM_OBJECTS)
