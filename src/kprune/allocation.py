"""Sparsity allocation across layers: global magnitude, ERK, per-layer maps.

`tfmot` prunes every layer to the same sparsity. Here a model can instead
be pruned:

- to per-layer targets: `prune_low_magnitude(model, {name: schedule})`,
  with `per_layer_schedules` to derive them from one schedule;
- with ERK targets (`erk_sparsities`, from the RigL paper): sparser large
  layers, denser small ones;
- by global magnitude (`GlobalSparsity`): one threshold over all pruned
  weights, so the model as a whole reaches the target and each layer keeps
  the weights that matter most model-wide.
"""

import keras
import numpy as np
from keras import ops

from kprune import _keras_internals
from kprune import masking
from kprune import registry
from kprune.api_export import kprune_export
from kprune.engine import MaskGroup
from kprune.schedules import ConstantSparsity
from kprune.schedules import PolynomialDecay
from kprune.schedules import PruningSchedule
from kprune.schedules import _AcrossLayersSchedule


def _python_kept_count(size, sparsity):
    """`masking.kept_count` in NumPy, for sizes known before training."""
    dense = np.float32(size) * (np.float32(1.0) - np.float32(sparsity))
    return max(int(np.round(dense)), 1)


def _check_cap(value, name="max_sparsity"):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Argument `{name}` must be None or a number in [0, 1). "
            f"Received: {name}={value!r}"
        )
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"Argument `{name}` must be in [0, 1). Received: {name}={value}"
        )


@kprune_export("kprune.allocation")
class GlobalSparsity(_AcrossLayersSchedule):
    """Prunes a group of layers together, by one magnitude threshold.

    Give it to several layers (usually all, through `prune_low_magnitude`
    on a model): at each step where `schedule` prunes, the layers of the
    group keep together exactly `kept_count(N, sparsity)` of their `N`
    weights, the largest in magnitude over the whole group, ties going to
    the earlier layer and lower index. Layers therefore end at different
    sparsities: those whose weights matter less give up more. Each layer
    keeps at least one weight, and at least `1 - max_sparsity` of its
    weights when `max_sparsity` is set.

    Works with `UpdatePruningStep` (which connects the group when training
    starts), `PruningSummaries`, `strip_pruning` and saving; the group
    is found again from the schedules of a loaded model.

    Args:
        schedule: A `kprune.PruningSchedule` for the group as a whole: when
            to prune and the sparsity over all its weights together.
        max_sparsity: `None`, or the highest sparsity this layer may reach,
            in `[0, 1)`. Pass different instances per layer (in a dict) for
            different caps.
        group: Name of the group: layers whose `GlobalSparsity` has the
            same `group` share the threshold. Their `schedule` must be
            equal.

    Example:

    ```python
    pruned = kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.allocation.GlobalSparsity(
            kprune.PolynomialDecay(0.5, 0.9, begin_step=0, end_step=1000)
        ),
    )
    ```
    """

    def __init__(
        self,
        schedule: PruningSchedule,
        max_sparsity: float | None = None,
        group: str = "global",
    ):
        if (
            not isinstance(schedule, PruningSchedule)
            or schedule.mask_group_key() is not None
        ):
            raise ValueError(
                "Argument `schedule` must be a `kprune.PruningSchedule` such "
                "as `kprune.PolynomialDecay(...)`, not one that prunes "
                f"across layers. Received: schedule={schedule!r}"
            )
        _check_cap(max_sparsity)
        if not isinstance(group, str) or not group:
            raise ValueError(
                "Argument `group` must be a non-empty string. "
                f"Received: group={group!r}"
            )
        self.schedule = schedule
        self.max_sparsity = max_sparsity
        self.group = group

    def get_config(self) -> dict:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "max_sparsity": self.max_sparsity,
            "group": self.group,
        }

    def mask_group_key(self):
        return self.group

    def make_mask_group(self, model, wrappers):
        return GlobalMagnitudeGroup(wrappers)

    def __eq__(self, other):
        return (
            type(self) is type(other)
            and self.schedule == other.schedule
            and self.max_sparsity == other.max_sparsity
            and self.group == other.group
        )

    def __hash__(self):
        return hash((type(self), self.schedule, self.max_sparsity, self.group))

    def __repr__(self):
        return (
            f"GlobalSparsity({self.schedule!r}, "
            f"max_sparsity={self.max_sparsity!r}, group={self.group!r})"
        )


class GlobalMagnitudeGroup(MaskGroup):
    """Computes the masks of a `GlobalSparsity` group: one top-k over all.

    Each weight first keeps its own `floor` largest entries (1, or the
    count its `max_sparsity` allows); the remaining kept slots go to the
    largest magnitudes of the whole group.
    """

    def __init__(self, wrappers):
        super().__init__(wrappers)
        schedules = [w.pruning_schedule for w in self.wrappers]
        first = schedules[0]
        for wrapper, schedule in zip(self.wrappers, schedules):
            if schedule.schedule != first.schedule:
                raise ValueError(
                    f"Layers of the global pruning group {first.group!r} "
                    "must share one schedule, but layer "
                    f"{self.wrappers[0].name!r} has {first.schedule!r} and "
                    f"layer {wrapper.name!r} has {schedule.schedule!r}. Use "
                    "one schedule, or different `group` names."
                )
        self.floors = []
        for wrapper, index in self.entries:
            weight = wrapper.pruning_vars[index][0]
            cap = wrapper.pruning_schedule.max_sparsity
            size = int(np.prod(weight.shape))
            self.floors.append(
                _python_kept_count(size, 1.0 if cap is None else cap)
            )

    def compute_masks(self, weights, sparsity):
        return global_magnitude_masks(weights, sparsity, self.floors)


def global_magnitude_masks(weights, sparsity, floors):
    """Masks of several weights pruned together by one magnitude threshold.

    Args:
        weights: List of float tensors.
        sparsity: Scalar target sparsity over all their entries together.
        floors: Per weight, how many of its largest entries it keeps
            whatever the others hold (>= 1).

    Returns:
        `(masks, thresholds)`: boolean masks shaped like `weights`, and per
        weight the smallest kept magnitude. Exactly
        `max(kept_count(N, sparsity), sum(floors))` entries are kept.
    """
    scores = [
        ops.reshape(ops.abs(ops.cast(w, "float32")), (-1,)) for w in weights
    ]
    sizes = [s.shape[0] for s in scores]
    boosted = []
    for score, floor in zip(scores, floors):
        protected, _ = masking.top_k_mask(score, floor)
        boosted.append(ops.where(protected, float("inf"), score))
    total = sum(sizes)
    k = ops.maximum(masking.kept_count(total, sparsity), sum(floors))
    keep, _ = masking.top_k_mask(ops.concatenate(boosted), k)
    masks, thresholds = [], []
    start = 0
    for weight, score, size in zip(weights, scores, sizes):
        part = keep[start : start + size]
        start += size
        masks.append(ops.reshape(part, weight.shape))
        thresholds.append(ops.min(ops.where(part, score, float("inf"))))
    return masks, thresholds


def _prunable_layers(model):
    if isinstance(model, keras.layers.Layer) and not isinstance(
        model, keras.Model
    ):
        raise ValueError(
            "Argument `model` must be a Keras model. Received a layer: "
            f"{model!r}"
        )
    layers = [
        layer
        for layer in _keras_internals.flatten_layers(model)
        if registry.is_prunable(layer)
    ]
    names = [layer.name for layer in layers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            "Layer names must be unique to give layers their own targets. "
            f"Repeated names: {duplicates}"
        )
    return layers


@kprune_export("kprune.allocation")
def prunable_layer_names(model) -> list:
    """Names of the layers of `model` that `prune_low_magnitude` prunes.

    In model order, nested models included. Use it to build per-layer
    targets, for example to leave the first and last layers dense.

    Args:
        model: A Keras model.

    Returns:
        A list of layer names.

    Example:

    ```python
    names = kprune.allocation.prunable_layer_names(model)
    schedule = kprune.allocation.GlobalSparsity(kprune.ConstantSparsity(0.9, 0))
    pruned = kprune.prune_low_magnitude(
        model, {name: schedule for name in names[1:-1]}
    )
    ```
    """
    return [layer.name for layer in _prunable_layers(model)]


def _caps(max_sparsity, names):
    if isinstance(max_sparsity, dict):
        unknown = sorted(set(max_sparsity) - set(names))
        if unknown:
            raise ValueError(
                "Argument `max_sparsity` names layers that are not "
                f"prunable layers of the model: {unknown}. Prunable layers: "
                f"{names}"
            )
        for name, value in max_sparsity.items():
            _check_cap(value, f"max_sparsity[{name!r}]")
        return {name: max_sparsity.get(name) for name in names}
    _check_cap(max_sparsity)
    return dict.fromkeys(names, max_sparsity)


@kprune_export("kprune.allocation")
def erk_sparsities(
    model,
    target_sparsity: float,
    max_sparsity=None,
    dense_layers=(),
    power_scale: float = 1.0,
) -> dict:
    """Per-layer sparsities by Erdos-Renyi-Kernel (ERK), as in RigL.

    Each layer's density (fraction kept) is proportional to
    `(sum of its kernel dimensions / product of them) ** power_scale`:
    `(fan_in + fan_out) / (fan_in * fan_out)` for a Dense kernel,
    `(h + w + in + out) / (h * w * in * out)` for a 2-D convolution. The
    densities are scaled so that the pruned layers together keep
    `1 - target_sparsity` of their weights; a layer whose density would
    exceed 1 (or `1 - max_sparsity`) is capped there and the rest is
    redistributed over the others, as in RigL. Layers with several pruned
    weights (separable convolutions) get one density, the size-weighted
    mean of their weights'.

    Args:
        model: A built Keras model (not yet pruned).
        target_sparsity: Sparsity over all weights of the layers pruned, in
            `[0, 1)`.
        max_sparsity: `None`, a cap in `[0, 1)` for every layer, or a dict
            of layer name to cap.
        dense_layers: Names of prunable layers to leave dense; they are
            left out of the result and of the target's count.
        power_scale: Exponent of the ERK ratio; 0 gives uniform sparsity.

    Returns:
        A dict of layer name to sparsity, in model order, ready for
        `per_layer_schedules` (or directly for `prune_low_magnitude`).

    Raises:
        ValueError: If an argument is invalid, a name is unknown, or the
            caps keep more weights than the target allows.

    Example:

    ```python
    names = kprune.allocation.prunable_layer_names(model)
    targets = kprune.allocation.erk_sparsities(
        model, 0.9, dense_layers=[names[0]]
    )
    pruned = kprune.prune_low_magnitude(
        model,
        kprune.allocation.per_layer_schedules(
            targets, kprune.PolynomialDecay(0.5, 0.9, 0, 1000)
        ),
    )
    ```
    """
    PruningSchedule._validate_sparsity(target_sparsity, "target_sparsity")
    if isinstance(power_scale, bool) or not isinstance(
        power_scale, (int, float)
    ):
        raise ValueError(
            "Argument `power_scale` must be a number. "
            f"Received: power_scale={power_scale!r}"
        )
    layers = _prunable_layers(model)
    all_names = [layer.name for layer in layers]
    if isinstance(dense_layers, str):
        dense_layers = [dense_layers]
    unknown = sorted(set(dense_layers) - set(all_names))
    if unknown:
        raise ValueError(
            "Argument `dense_layers` names layers that are not prunable "
            f"layers of the model: {unknown}. Prunable layers: {all_names}"
        )
    layers = [layer for layer in layers if layer.name not in dense_layers]
    if not layers:
        raise ValueError(
            "There is no layer left to prune: the model has no prunable "
            f"layer outside `dense_layers`. Prunable layers: {all_names}"
        )
    names = [layer.name for layer in layers]
    caps = _caps(max_sparsity, names)
    sizes, ratios = [], []
    for layer in layers:
        if not layer.built:
            raise ValueError(
                f"Layer {layer.name!r} is not built, so its weight shapes "
                "are unknown. Build the model first (give it an `Input`, "
                "or call it on data)."
            )
        weights = registry.get_prunable_weights(layer)
        counts = [int(np.prod(w.shape)) for w in weights]
        raw = [
            (sum(w.shape) / np.prod(w.shape, dtype=np.float64)) ** power_scale
            for w in weights
        ]
        sizes.append(sum(counts))
        ratios.append(np.dot(counts, raw) / sum(counts))
    sizes = np.asarray(sizes, np.float64)
    ratios = np.asarray(ratios, np.float64)
    low = np.asarray(
        [0.0 if caps[n] is None else 1.0 - caps[n] for n in names], np.float64
    )
    kept = (1.0 - target_sparsity) * sizes.sum()

    def kept_at(eps):
        return float(np.dot(sizes, np.clip(eps * ratios, low, 1.0)))

    if kept_at(0.0) > kept * (1 + 1e-9):
        raise ValueError(
            f"The `max_sparsity` caps keep at least {kept_at(0.0):.0f} of "
            f"the {sizes.sum():.0f} weights, more than target_sparsity="
            f"{target_sparsity} allows ({kept:.0f}). Raise the caps or "
            "lower the target."
        )
    # Kept weights grow monotonically with the scale eps: bisect on it.
    lo, hi = 0.0, 1.0 / ratios.min()
    for _ in range(200):
        mid = (lo + hi) / 2
        if kept_at(mid) < kept:
            lo = mid
        else:
            hi = mid
    densities = np.clip(hi * ratios, low, 1.0)
    return {name: float(1.0 - d) for name, d in zip(names, densities)}


@kprune_export("kprune.allocation")
def per_layer_schedules(sparsities: dict, schedule: PruningSchedule) -> dict:
    """One schedule per layer, shaped like `schedule`, ending at its target.

    For each layer, a copy of `schedule` whose final sparsity is the
    layer's: `ConstantSparsity` takes it as `target_sparsity`;
    `PolynomialDecay` scales both `initial_sparsity` and `final_sparsity`
    by `target / final_sparsity`, so at every step each layer's sparsity is
    the same fraction of its target and the model's overall sparsity
    follows the schedule's. Layers with target 0 are left out (they stay
    dense).

    Args:
        sparsities: Dict of layer name to final sparsity in `[0, 1)`, such
            as the output of `erk_sparsities` or
            `SensitivityResult.suggest_sparsities`.
        schedule: A `kprune.ConstantSparsity` or `kprune.PolynomialDecay`.

    Returns:
        A dict of layer name to schedule, for `prune_low_magnitude`.

    Raises:
        ValueError: If a sparsity is out of range or `schedule` is of
            another class.

    Example:

    ```python
    schedules = kprune.allocation.per_layer_schedules(
        {"conv": 0.5, "dense": 0.9},
        kprune.PolynomialDecay(0.2, 0.8, begin_step=0, end_step=1000),
    )
    pruned = kprune.prune_low_magnitude(model, schedules)
    ```
    """
    if not isinstance(sparsities, dict):
        raise ValueError(
            "Argument `sparsities` must be a dict of layer name to sparsity. "
            f"Received: sparsities={sparsities!r}"
        )
    for name, value in sparsities.items():
        PruningSchedule._validate_sparsity(value, f"sparsities[{name!r}]")
    config = (
        schedule.get_config() if isinstance(schedule, PruningSchedule) else None
    )
    result = {}
    for name, target in sparsities.items():
        if target == 0:
            continue
        if isinstance(schedule, ConstantSparsity):
            result[name] = ConstantSparsity(
                **{**config, "target_sparsity": target}
            )
        elif isinstance(schedule, PolynomialDecay):
            final = schedule.final_sparsity
            scale = target / final if final > 0 else 0.0
            result[name] = PolynomialDecay(
                **{
                    **config,
                    "initial_sparsity": min(
                        schedule.initial_sparsity * scale, target
                    ),
                    "final_sparsity": target,
                }
            )
        else:
            raise ValueError(
                "Argument `schedule` must be a `kprune.ConstantSparsity` or "
                f"`kprune.PolynomialDecay`. Received: schedule={schedule!r}"
            )
    return result
