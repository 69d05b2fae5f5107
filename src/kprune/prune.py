"""`prune_low_magnitude`, `strip_pruning` and `prune_scope`."""

import difflib
import inspect
import warnings

import keras

from kprune import _keras_internals
from kprune import api_export
from kprune import registry
from kprune.api_export import kprune_export
from kprune.schedules import ConstantSparsity
from kprune.schedules import PruningSchedule
from kprune.schedules import is_real_number
from kprune.wrapper import DEFAULT_SCHEDULE
from kprune.wrapper import PruneLowMagnitude
from kprune.wrapper import _PruningConstraint
from kprune.wrapper import collect_pruned_layers
from kprune.wrapper import require_model
from kprune.wrapper import validate_pruning_args
from kprune.wrapper import validate_schedule


def _is_model(obj) -> bool:
    return isinstance(obj, keras.Model)


def _is_subclassed(model) -> bool:
    # A functional model, or a subclass of one (a keras-hub task), is a
    # `keras.Function` of its inputs.
    return not isinstance(model, (keras.Sequential, keras.Function))


def _copy_layer(layer):
    """A new layer like `layer`, or `layer` itself if none can be made.

    A built Keras 3 layer cannot be copied as a live object (`copy.deepcopy`
    goes through `.keras` serialization, or fails on the layer's tracked
    state), so the copy is made by the class itself from the layer's
    config: no registration is needed. A layer that its config cannot
    rebuild (an `__init__` without `**kwargs`, a `get_config` missing an
    argument) is reused as it is, as tfmot reuses every layer.
    """
    try:
        return type(layer).from_config(layer.get_config())
    except Exception:
        return layer


def _input_tensors(model):
    """New inputs for a functional clone, named like the model's."""
    names = {
        id(layer.output): layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.InputLayer)
    }
    return keras.tree.map_structure(
        lambda t: keras.Input(
            batch_shape=t.shape,
            dtype=t.dtype,
            sparse=t.sparse,
            name=names.get(id(t), t.name),
        ),
        model.input,
    )


class _SavedAsGraph:
    """Base of the classes of pruned functional subclasses.

    A pruned keras-hub `GPT2CausalLM` must keep its class for its methods,
    but its own `get_config` holds its constructor arguments, from which a
    `.keras` file would rebuild it unpruned. So it saves as its graph, with
    the pruning wrappers, and loads as a functional model of the same class
    name (Keras finds weights in the file by class names), without the
    subclass's methods, in any process that imports kprune.
    """

    def get_config(self):
        config = keras.Model(self.input, self.output, name=self.name)
        config = config.get_config()
        config[_CLASS_NAME_KEY] = type(self).__name__
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        name = config.pop(_CLASS_NAME_KEY, None)
        model = keras.Model.from_config(config, custom_objects=custom_objects)
        if name is not None:
            model.__class__ = _pruned_class(type(model), name)
        return model


_SAVED_AS_GRAPH = "PrunedFunctionalSubclass"
_CLASS_NAME_KEY = "kprune_class_name"
keras.saving.register_keras_serializable("kprune", _SAVED_AS_GRAPH)(
    _SavedAsGraph
)
_PRUNED_CLASSES = {}


def _user_class(cls):
    return getattr(cls, "_kprune_user_class", cls)


def _pruned_class(cls, name=None):
    """`cls` (named `name`), saving as its graph: see `_SavedAsGraph`."""
    name = name or cls.__name__
    if (cls, name) not in _PRUNED_CLASSES:
        pruned = type(
            name,
            (_SavedAsGraph, cls),
            {"__module__": cls.__module__, "_kprune_user_class": cls},
        )
        keras.saving.register_keras_serializable("kprune", _SAVED_AS_GRAPH)(
            pruned
        )
        _PRUNED_CLASSES[cls, name] = pruned
    return _PRUNED_CLASSES[cls, name]


def _clone_graph_model(model, clone_function, pruning=True):
    """Clones `model` level by level, uncompiled, keeping its class."""
    memo = {}

    def clone(layer):
        if id(layer) not in memo:
            if _is_model(layer) and not _is_subclassed(layer):
                memo[id(layer)] = _clone_one(layer)
            else:
                memo[id(layer)] = clone_function(layer)
        return memo[id(layer)]

    def _clone_one(graph):
        compiled = graph.compiled
        try:
            # `clone_model` compiles the clone of a compiled model; like
            # tfmot's, the result is not compiled (it has no optimizer).
            graph.compiled = False
            if isinstance(graph, keras.Sequential):
                new = keras.models.clone_model(graph, clone_function=clone)
            else:
                new = keras.models.clone_model(
                    graph,
                    input_tensors=_input_tensors(graph),
                    clone_function=clone,
                )
        finally:
            graph.compiled = compiled
        if compiled:
            new.optimizer = None  # as tfmot's: the optimizer is removed
        cls = _user_class(type(graph))
        if cls is not type(new):
            cls = _pruned_class(cls) if pruning else cls
            _keep_class(graph, new, cls, memo)
        return new

    return _clone_one(model)


def _keep_class(model, new, cls, memo):
    """Gives the clone `new` the class `cls` and the attributes of `model`.

    `clone_model` returns a plain `Functional` for a functional subclass
    (a keras-hub task model or backbone); its methods (`generate`) and
    attributes (`backbone.transformer_layers`) are restored here, with
    every layer attribute pointing at the clone's layer.
    """
    try:
        new.__class__ = cls
    except TypeError:
        return

    def convert(value):
        if isinstance(value, keras.layers.Layer):
            if id(value) in memo:
                return memo[id(value)]
            return value  # not in the graph: a preprocessor, say
        if isinstance(value, list):
            return [convert(v) for v in value]
        if type(value) is tuple:
            return tuple(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    own = vars(new)
    for name, value in vars(model).items():
        if name not in own:
            # These layers are tracked already through the clone's graph.
            _keras_internals.set_untracked(new, name, convert(value))


def _wrap_layer(layer, params, alone=False):
    if isinstance(layer, PruneLowMagnitude):
        changed = _changed_arguments(layer, params)
        if changed and alone:
            raise ValueError(
                f"Layer {layer.name!r} is already pruned, with "
                f"{_describe(layer, changed)}; `prune_low_magnitude` does "
                "not wrap it again, so this call's "
                f"{_describe(params, changed)} would be ignored. To prune "
                "it with the new arguments, prune the layer it wraps: "
                "`kprune.prune_low_magnitude(layer.layer, ...)`."
            )
        return layer
    status = registry.status(layer)
    if status == registry.PRUNABLE:
        return PruneLowMagnitude(layer, **params)
    if status == registry.NOTHING_TO_PRUNE:
        return layer
    raise registry.unsupported_layer_error(layer)


def _copy_weights(pairs):
    for old, new in pairs:
        if new is old:
            continue
        if isinstance(new, PruneLowMagnitude) and not isinstance(
            old, PruneLowMagnitude
        ):
            if new.layer is not old:
                new.layer.set_weights(old.get_weights())
        elif isinstance(new, PruneLowMagnitude):
            if new.layer is not old.layer:
                new.layer.set_weights(old.layer.get_weights())
            for (_, mask, threshold), (_, m, t) in zip(
                new.pruning_vars, old.pruning_vars
            ):
                mask.assign(m)
                threshold.assign(t)
            new.pruning_step.assign(old.pruning_step)
        elif old.weights:
            new.set_weights(old.get_weights())


# The arguments a wrapper keeps, and their defaults: an argument left at
# its default was not asked for.
_DEFAULTS = {
    "pruning_schedule": DEFAULT_SCHEDULE,
    "block_size": (1, 1),
    "block_pooling_type": "AVG",
    "sparsity_m_by_n": None,
}


def _changed_arguments(wrapper, params):
    """The arguments in `params`, given (not defaults), that `wrapper`
    was not built with."""
    changed = []
    for name, default in _DEFAULTS.items():
        value = params[name]
        given = (
            value is not default
            if name == "pruning_schedule"
            else value != default
        )
        if given and value != getattr(wrapper, name):
            changed.append(name)
    return changed


def _describe(source, names):
    values = source if isinstance(source, dict) else vars(source)
    return ", ".join(f"{name}={values[name]!r}" for name in names)


def _warn_kept_wrappers(pairs, advice, stacklevel):
    """Warns about wrappers kept with arguments other than those asked.

    Args:
        pairs: `(wrapper, params asked for it or None)`.
    """
    kept = {}
    for wrapper, params in pairs:
        changed = params and _changed_arguments(wrapper, params)
        if changed:
            what = (
                f"keep {_describe(wrapper, changed)}, not "
                f"{_describe(params, changed)}"
            )
            kept.setdefault(what, []).append(wrapper.name)
    if kept:
        listed = "; ".join(f"{names} {what}" for what, names in kept.items())
        warnings.warn(
            "Layers already pruned are kept as they are, with their own "
            f"pruning arguments: {listed}. {advice}",
            stacklevel=stacklevel + 1,
        )


def _graph_model_names(model):
    """The names of `model` and of the Sequential or functional models
    inside it: their layers are pruned one by one, so naming them selects
    nothing."""
    return {model.name} | {
        layer.name
        for layer in _keras_internals.flatten_layers(model)
        if _is_model(layer) and not _is_subclassed(layer)
    }


def _check_not_models(model, names, argument):
    models = sorted(set(names) & _graph_model_names(model))
    if not models:
        return
    what = (
        f"the model itself ({models[0]!r})"
        if models == [model.name]
        else f"models, not layers: {models}"
    )
    raise ValueError(
        f"Argument `{argument}` names {what}. Their layers are pruned one "
        "by one, so a model's name selects nothing. Name the layers to "
        "prune, select them by class (`layers=[keras.layers.Dense]`) or "
        "with a function of a layer, or leave `layers=None` to prune every "
        "prunable layer."
    )


def _warn_idle_structured(model, explicit):
    """Warns when `StructuredSparsity` leaves layers given it dense."""
    from kprune import structured

    names = [
        wrapper.layer.name
        for wrapper in collect_pruned_layers(model)
        if isinstance(wrapper.pruning_schedule, structured.StructuredSparsity)
    ]
    if not names:
        return
    idle = structured.idle_layers(model)
    if not idle or (not explicit and len(idle) < len(names)):
        # Given to the whole model, some layers (the model's outputs,
        # say) always keep their units; warn only when the model would
        # stay dense.
        return
    listed = "; ".join(f"{name!r}: {why}" for name, why in idle.items())
    warnings.warn(
        "`kprune.structured.StructuredSparsity` will prune nothing in these "
        "layers "
        f"(they keep all their units and inputs): {listed}. A unit is "
        "removed only together with the weights that read it: every layer "
        "that reads a structured layer must be pruned with the same "
        "`StructuredSparsity` too (give it to the whole model, "
        "`pruning_schedule=kprune.structured.StructuredSparsity(...)`, or to "
        "those layers as well) and reach it through layers kprune can rewire "
        "(docs/structured.md). `kprune.structured.structured_plan(pruned)` "
        "says which layers shrink and why the others do not.",
        stacklevel=4,
    )


# `keras.layers.Layer` arguments a wrapper takes through `**kwargs`.
_LAYER_ARGUMENTS = tuple(
    name
    for name, p in inspect.signature(
        keras.layers.Layer.__init__
    ).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
) + ("input_shape", "input_dim")


def _check_keywords(kwargs, to_prune):
    own = list(inspect.signature(prune_low_magnitude).parameters)[:-1]
    is_model = _is_model(to_prune)
    for name in kwargs:
        if name in _LAYER_ARGUMENTS and not is_model:
            continue
        if name in _LAYER_ARGUMENTS:
            raise ValueError(
                f"Argument `{name}` is a `keras.layers.Layer` argument, "
                "passed to each wrapper when pruning a layer or a list of "
                "layers, not a model. Received: "
                f"{name}={kwargs[name]!r}"
            )
        known = own + ([] if is_model else list(_LAYER_ARGUMENTS))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        layer_note = (
            ""
            if is_model
            else ", and for a layer `keras.layers.Layer` arguments such as "
            "`name`"
        )
        raise ValueError(
            f"Unknown argument `{name}` for `kprune.prune_low_magnitude`."
            f"{hint} It takes {own}{layer_note}. Received: "
            f"{name}={kwargs[name]!r}"
        )


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
        elif is_real_number(value):
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


class _Selection:
    """Which layers to prune, and with which arguments (`layers=`)."""

    def __init__(self, layers, params, pruning_policy):
        self.params = params
        self.policy = pruning_policy
        self.all = layers is None
        if layers is None:
            entries = []
        elif isinstance(layers, dict):
            entries = list(layers.items())
        elif isinstance(layers, (list, tuple, set)):
            entries = [(selector, {}) for selector in layers]
        else:
            entries = [(layers, {})]
        self.entries = []
        for selector, overrides in entries:
            if not (
                isinstance(selector, str)
                or callable(selector)
                or isinstance(selector, keras.layers.Layer)
            ):
                raise ValueError(
                    "Argument `layers` must name the layers to prune: layer "
                    "names, layer classes, layers, or functions of a layer "
                    "returning a bool, in a list or as keys of a dict of "
                    "per-layer arguments. Received an entry "
                    f"{selector!r}"
                )
            overrides = dict(overrides or {})
            unknown = set(overrides) - set(params)
            if unknown:
                raise ValueError(
                    "Per-layer arguments in `layers` may set only "
                    f"{sorted(params)}. Received: {sorted(unknown)} for "
                    f"{selector!r}"
                )
            merged = {**params, **overrides}
            validate_schedule(merged["pruning_schedule"])
            (
                merged["block_size"],
                merged["block_pooling_type"],
                merged["sparsity_m_by_n"],
            ) = validate_pruning_args(
                merged["block_size"],
                merged["block_pooling_type"],
                merged["sparsity_m_by_n"],
            )
            self.entries.append((selector, merged))

    @staticmethod
    def _matches(selector, layer):
        if isinstance(selector, str):
            return layer.name == selector
        if isinstance(selector, type):
            return isinstance(layer, selector)
        if isinstance(selector, keras.layers.Layer):
            return layer is selector
        return bool(selector(layer))

    def chosen(self, layer):
        """The arguments to prune `layer` with, or None to keep it dense."""
        if self.policy is not None and not self.policy.allow_pruning(layer):
            return None
        if self.all:
            return self.params
        for selector, merged in self.entries:
            if self._matches(selector, layer):
                return merged
        return None

    def check_names(self, model):
        _check_not_models(
            model,
            [s for s, _ in self.entries if isinstance(s, str)],
            "layers",
        )
        if any(s is model for s, _ in self.entries):
            _check_not_models(model, [model.name], "layers")
        names = {
            layer.name
            for layer in _keras_internals.flatten_layers(
                model, include_self=True
            )
        }
        missing = [
            s for s, _ in self.entries if isinstance(s, str) and s not in names
        ]
        if missing:
            raise ValueError(
                f"Argument `layers` names layers that model {model.name!r} "
                f"does not have: {missing}. Its layers: {sorted(names)}"
            )


def _prune_graph_model(model, selection):
    pairs = []

    def clone(layer):
        # Called on each original layer before its copy is built, so a
        # layer that does not suit the arguments fails the call at once,
        # and the input model is never touched.
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless operation, such as a `GetItem`
        if isinstance(layer, PruneLowMagnitude):
            new = PruneLowMagnitude(
                _copy_layer(layer.layer),
                pruning_schedule=layer.pruning_schedule,
                block_size=layer.block_size,
                block_pooling_type=layer.block_pooling_type,
                sparsity_m_by_n=layer.sparsity_m_by_n,
                name=layer.name,
            )
            pairs.append((layer, new))
            return new
        params = selection.chosen(layer)
        status = registry.status(layer)
        if params is not None and status == registry.PRUNABLE:
            if layer.built:
                PruneLowMagnitude._check_weights(
                    layer,
                    registry.get_prunable_weights(layer),
                    params["block_size"],
                    params["sparsity_m_by_n"],
                )
            new = PruneLowMagnitude(_copy_layer(layer), **params)
        elif (
            status in (registry.PRUNABLE, registry.NOTHING_TO_PRUNE)
            or params is None  # not selected, or refused by the policy
            or (status == registry.UNKNOWN and not layer.weights)
        ):
            new = _copy_layer(layer)
        else:
            raise registry.unsupported_layer_error(layer)
        pairs.append((layer, new))
        return new

    try:
        pruned = _clone_graph_model(model, clone)
    except Exception:
        # A layer its config cannot rebuild is wrapped as it is, and its
        # wrapper, once built, constrained its weights: the input model
        # must come back unchanged when a later layer fails.
        for old, new in pairs:
            if isinstance(new, PruneLowMagnitude) and new.layer is old:
                _restore_constraints(new)
        raise
    _copy_weights(pairs)
    _warn_shared(pairs)
    return pruned


def _warn_shared(pairs):
    """Says which layers with weights the clone shares with the input."""
    shared = []
    for old, new in pairs:
        inner = new.layer if isinstance(new, PruneLowMagnitude) else new
        if inner is old and old.weights:
            shared.append(f"{old.name!r} ({type(old).__name__})")
    if shared:
        warnings.warn(
            f"Layers {', '.join(shared)} cannot be rebuilt from their config "
            "(`type(layer).from_config(layer.get_config())` failed, as it "
            "does for an `__init__` without `**kwargs`), so the pruned "
            "model shares them with the input model, as tfmot shares every "
            "layer: training the pruned model also changes them, and prunes "
            "them, in the input model. To keep the input model as it is, "
            "give those classes a `get_config` returning their `__init__` "
            "arguments and accept `**kwargs`, or evaluate the input model "
            "before pruning.",
            stacklevel=5,
        )


def _prune_subclassed(model, selection):
    """Prunes the direct sublayers of a subclassed model, in place."""
    selection.check_names(model)
    plan = []
    # Everything is decided and checked before the model is changed.
    for child in _keras_internals.sublayers(model):
        if isinstance(child, PruneLowMagnitude):
            continue
        if _is_model(child) and not _is_subclassed(child):
            if any(True for _ in _prunable_inside(child, selection)):
                plan.append((child, _prune_graph_model(child, selection)))
            continue
        params = selection.chosen(child)
        status = registry.status(child)
        if params is None:
            if selection.all and status in (
                registry.UNKNOWN,
                registry.REJECTED,
            ):
                raise registry.unsupported_layer_error(child)
            continue
        if status in (registry.UNKNOWN, registry.REJECTED):
            raise registry.unsupported_layer_error(child)
        if status != registry.PRUNABLE:
            continue
        if child.built:
            PruneLowMagnitude._check_weights(
                child,
                registry.get_prunable_weights(child),
                params["block_size"],
                params["sparsity_m_by_n"],
            )
        plan.append((child, PruneLowMagnitude(child, **params)))
    for old, new in plan:
        if isinstance(new, PruneLowMagnitude) and old.built:
            build = old.get_build_config() or {}
            new.build(build.get("input_shape"))
        _keras_internals.replace_sublayer(model, old, new)
    # A training step traced before pruning would not prune.
    _forget_traced_steps(model)
    return model


def _prunable_inside(model, selection):
    for layer in _keras_internals.flatten_layers(model):
        if selection.chosen(layer) is not None and registry.is_prunable(layer):
            yield layer


def _prune_model(model, params, pruning_policy, layers=None):
    if pruning_policy is not None:
        pruning_policy.ensure_model_supports_pruning(model)
    selection = _Selection(layers, params, pruning_policy)
    selection.check_names(model)
    _warn_kept_wrappers(
        [
            (w, selection.chosen(w.layer) or selection.chosen(w))
            for w in collect_pruned_layers(model)
        ],
        "To prune them with the new arguments, strip the pruning first: "
        "`kprune.prune_low_magnitude(kprune.strip_pruning(model), ...)` "
        "(the stripped weights keep their zeros).",
        stacklevel=3,
    )
    if _is_subclassed(model):
        pruned = _prune_subclassed(model, selection)
    else:
        pruned = _prune_graph_model(model, selection)
    _warn_idle_structured(pruned, explicit=layers is not None)
    return pruned


@kprune_export("kprune")
def prune_low_magnitude(
    to_prune,
    pruning_schedule: PruningSchedule = DEFAULT_SCHEDULE,
    block_size=(1, 1),
    block_pooling_type: str = "AVG",
    sparsity_m_by_n=None,
    pruning_policy=None,
    layers=None,
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
      weights and the input model is left unchanged. Each layer is copied
      by its own class from its config (no registration needed); a layer
      whose config cannot rebuild it (an `__init__` without `**kwargs`) is
      not copied but reused, as tfmot reuses every layer: the two models
      then share it and its weights, and if it is pruned, the input
      model's layer is pruned too (until `strip_pruning`); a warning
      names such layers. The clone keeps
      the model's class and attributes (a keras-hub `GPT2CausalLM` keeps
      `generate`, and `backbone.transformer_layers` are the pruned
      layers); saved, it loads as a functional model with that class's
      name but not its methods. Like tfmot's, it is not compiled: compile
      it to train it.
    - A subclassed model (a `keras.Model` subclass with its own `call`)
      cannot be cloned: it is pruned in place and returned. Its sublayers
      (attributes, lists, dicts) are replaced by wrappers once every one
      has been checked, so a call that fails changes nothing. It keeps its
      compile settings, but its optimizer has not seen the new layers:
      compile it after pruning.
    - A custom layer or a subclassed model used as a layer is pruned as one
      unit: one wrapper, with a mask for each prunable weight of every
      layer inside it (`MultiHeadAttention`, `LSTM`, `Bidirectional`...
      are pruned the same way).
    - Layers already wrapped are kept as they are (not wrapped twice),
      with their own schedule and pattern; a warning says so when this
      call asks for others (an error for a lone wrapper).
    - Layers without weights, and layers whose weights are not worth
      pruning (normalization layers), are kept dense.

    Args:
        to_prune: A Keras layer, a list of layers, or a model.
        pruning_schedule: A `kprune.PruningSchedule`: when to prune and to
            which sparsity.
            For a model, it may also be a dict of layer name to schedule
            (or to a sparsity `s`, meaning `ConstantSparsity(s, 0)`): each
            named layer gets its own schedule and the layers not named stay
            dense; see `kprune.allocation.per_layer_schedules`.
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
        layers: Models only: which layers to prune; the others stay dense.
            A list of selectors, or a dict from selectors to per-layer
            arguments (`pruning_schedule`, `block_size`,
            `block_pooling_type`, `sparsity_m_by_n`) that replace this
            call's for those layers; the first matching entry wins. A
            selector is a layer name, a layer class (subclasses match), a
            layer of the model, or a function of a layer returning a bool.
            `None` (default): every prunable layer.
        **kwargs: Passed to each `PruneLowMagnitude` wrapper (layers only).

    Returns:
        The wrapped layer, the list of wrapped layers, or the pruned model.

    Raises:
        ValueError: If an argument is invalid or unknown, `layers` or a
            per-layer `pruning_schedule` names a model instead of layers,
            a layer's weights do not suit the block or N:M pattern, or a
            layer has weights that kprune does not know how to prune.
            Nothing is modified then.

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
    _check_keywords(kwargs, to_prune)
    if isinstance(pruning_schedule, dict):
        if not _is_model(to_prune):
            raise ValueError(
                "A per-layer `pruning_schedule` dict applies to whole models "
                f"only. Received a {type(to_prune).__name__}: pass a "
                "schedule instead."
            )
        if layers is not None:
            raise ValueError(
                "Pass per-layer schedules either as a `pruning_schedule` "
                "dict or through `layers`, not both. Received both."
            )
        schedules = _schedule_map(pruning_schedule)
        _check_not_models(to_prune, schedules, "pruning_schedule")
        prunable = {
            layer.name
            for layer in _keras_internals.flatten_layers(
                to_prune, include_self=True
            )
            if registry.status(layer) == registry.PRUNABLE
        }
        unknown = sorted(set(schedules) - prunable)
        if unknown:
            raise ValueError(
                "Argument `pruning_schedule` names layers that are not "
                f"prunable layers of the model: {unknown}. Prunable layers: "
                f"{sorted(prunable)}"
            )
        layers = {
            name: {"pruning_schedule": schedule}
            for name, schedule in schedules.items()
        }
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
        return _prune_model(to_prune, params, pruning_policy, layers)
    if layers is not None:
        raise ValueError(
            "Argument `layers` applies to whole models only; pass the "
            "layers themselves as `to_prune`. Received a "
            f"{type(to_prune).__name__}."
        )
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
        wrapped = [_wrap_layer(layer, params) for layer in to_prune]
        _warn_kept_wrappers(
            [
                (layer, params)
                for layer in to_prune
                if isinstance(layer, PruneLowMagnitude)
            ],
            "To prune one with this call's arguments, pass the layer it "
            "wraps (`layer.layer`).",
            stacklevel=2,
        )
        return wrapped
    if isinstance(to_prune, keras.layers.Layer):
        return _wrap_layer(to_prune, params, alone=True)
    raise ValueError(
        "Argument `to_prune` must be a Keras layer, a list of layers, or a "
        f"Sequential or functional model. Received: {to_prune!r}"
    )


@kprune_export("kprune")
def strip_pruning(model):
    """Returns a plain model from a pruned one, for export.

    Every `PruneLowMagnitude` wrapper is replaced by the layer it wraps,
    holding the masked (sparse) weights. The result contains no kprune
    objects: it saves and loads with plain `keras.saving`, and its
    predictions equal the pruned model's.

    - A Sequential or functional model is cloned as `prune_low_magnitude`
      clones it: a new model of the same class and attributes, with the
      input layers' names, so its `get_config()` equals the unpruned
      model's. Like `tfmot`'s, it is not compiled, so that a saved export
      holds no optimizer state; compile it to evaluate it. The pruned model
      is unchanged and keeps training. A wrapped layer whose config cannot
      rebuild it is unwrapped instead of copied: the stripped model shares
      it with the pruned model, and its weights get back their own
      constraints, so the pruned model no longer prunes it.
    - A subclassed model, pruned in place, is stripped in place: its
      wrappers are replaced by the layers they wrap (the same objects,
      holding the masked weights, with their own constraints back), and the
      same object, of the same class, is returned; it no longer prunes,
      and keeps its compile settings (it trains on as a plain model).

    Args:
        model: A Keras model, pruned or not.

    Returns:
        The model without pruning wrappers.

    Raises:
        ValueError: If `model` is not a Keras model.

    Example:

    ```python
    final = kprune.strip_pruning(pruned)
    final.save("pruned.keras")
    ```
    """
    require_model(model)
    if _is_subclassed(model):
        return _strip_subclassed(model)
    pairs = []

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer
        source = layer.layer if isinstance(layer, PruneLowMagnitude) else layer
        new = _copy_layer(source)
        pairs.append((layer, new))
        return new

    stripped = _clone_graph_model(model, clone, pruning=False)
    # The pruned model is changed only once the clone is complete.
    for old, new in pairs:
        if isinstance(old, PruneLowMagnitude):
            if new is old.layer:
                _unwrap(old)
            else:
                new.set_weights(old.masked_layer_weights())
        elif old.weights and new is not old:
            new.set_weights(old.get_weights())
    return stripped


def _unwrap(wrapper):
    """The wrapped layer, with its weights masked and own constraints."""
    layer = wrapper.layer
    layer.set_weights(wrapper.masked_layer_weights())
    _restore_constraints(wrapper)
    return layer


def _restore_constraints(wrapper):
    """Gives the wrapped weights back their own constraints."""
    for weight, _, _ in wrapper.pruning_vars:
        constraint = weight.constraint
        if isinstance(constraint, _PruningConstraint):
            weight.constraint = constraint.original


def _strip_subclassed(model):
    """Strips a subclassed model in place, as it was pruned."""
    plan = []
    for child in _keras_internals.sublayers(model):
        if isinstance(child, PruneLowMagnitude):
            plan.append((child, None))
        elif (
            _is_model(child)
            and not _is_subclassed(child)
            and collect_pruned_layers(child)
        ):
            plan.append((child, strip_pruning(child)))
    # Everything is copied before the model is changed.
    for old, new in plan:
        _keras_internals.replace_sublayer(
            model, old, _unwrap(old) if new is None else new
        )
    # Training steps traced with the wrappers would still call them.
    _forget_traced_steps(model)
    return model


def _forget_traced_steps(model):
    """Drops the training, test and predict steps `model` has traced, so
    the next call traces its new layers."""
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


@kprune_export("kprune")
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
    return keras.saving.custom_object_scope(api_export.custom_objects())
