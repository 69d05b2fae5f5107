"""Sensitivity analysis: how much each layer can be pruned on its own.

Each prunable layer is pruned alone, one shot (no training), to each of a
range of sparsities by magnitude; the model is evaluated on the user's data
after each, and the weights are put back. Layers whose score barely moves
can take high sparsity; the suggested per-layer targets plug into
`prune_low_magnitude`.
"""

import numpy as np
from keras import ops

from kprune import masking
from kprune import registry
from kprune.allocation import _prunable_layers
from kprune.api_export import kprune_export

DEFAULT_SPARSITIES = (0.25, 0.5, 0.75, 0.9, 0.95)


@kprune_export("kprune.sensitivity")
class SensitivityResult:
    """Scores of a model with each layer pruned alone, per sparsity.

    Attributes:
        metric: Name of the score.
        higher_is_better: Whether larger scores are better (accuracy) or
            worse (loss).
        baseline: Score of the unpruned model.
        sparsities: The sparsities tried, in increasing order.
        scores: Dict of layer name to the list of scores, one per sparsity.

    Example:

    ```python
    result = kprune.sensitivity.sensitivity_analysis(model, x_val, y_val)
    print(result.to_markdown())
    pruned = kprune.prune_low_magnitude(
        model, result.suggest_sparsities(tolerance=0.01)
    )
    ```
    """

    def __init__(self, metric, higher_is_better, baseline, sparsities, scores):
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.baseline = baseline
        self.sparsities = list(sparsities)
        self.scores = scores

    @property
    def table(self) -> list:
        """One dict per (layer, sparsity): `layer`, `sparsity`, `score`,
        `change` (score minus baseline)."""
        return [
            {
                "layer": name,
                "sparsity": sparsity,
                "score": score,
                "change": score - self.baseline,
            }
            for name, scores in self.scores.items()
            for sparsity, score in zip(self.sparsities, scores)
        ]

    def to_markdown(self) -> str:
        """The scores as a Markdown table: one row per layer."""
        header = "| layer | " + " | ".join(f"{s:g}" for s in self.sparsities)
        lines = [
            header + " |",
            "|---" * (len(self.sparsities) + 1) + "|",
            f"| (baseline {self.metric}) | "
            + " | ".join(f"{self.baseline:.4f}" for _ in self.sparsities)
            + " |",
        ]
        for name, scores in self.scores.items():
            lines.append(
                f"| {name} | " + " | ".join(f"{s:.4f}" for s in scores) + " |"
            )
        return "\n".join(lines)

    def suggest_sparsities(
        self, tolerance: float = 0.01, max_sparsity: float | None = None
    ) -> dict:
        """Per layer, the highest sparsity tried that costs at most
        `tolerance`.

        Args:
            tolerance: Largest acceptable loss of score against the
                baseline (a drop for accuracy, a rise for loss), >= 0.
            max_sparsity: Optional upper bound on any suggestion.

        Returns:
            A dict of layer name to sparsity, leaving out layers that no
            sparsity suits. Pass it to `kprune.prune_low_magnitude` (each
            value means `ConstantSparsity(value, 0)`) or through
            `kprune.allocation.per_layer_schedules` for a gradual schedule.
            Layers are tested alone: pruning them together costs more than each
            alone, so check the combined result.
        """
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, (int, float))
            or tolerance < 0
        ):
            raise ValueError(
                "Argument `tolerance` must be a number >= 0. "
                f"Received: tolerance={tolerance!r}"
            )
        result = {}
        for name, scores in self.scores.items():
            best = None
            for sparsity, score in zip(self.sparsities, scores):
                if max_sparsity is not None and sparsity > max_sparsity:
                    break
                cost = (
                    self.baseline - score
                    if self.higher_is_better
                    else score - self.baseline
                )
                if cost > tolerance:
                    break
                best = sparsity
            if best:
                result[name] = best
        return result

    def plot(self, path=None, ax=None):
        """Plots the score against sparsity, one line per layer.

        Needs matplotlib (`pip install matplotlib`).

        Args:
            path: If given, the figure is saved there (PNG, SVG, ...).
            ax: A matplotlib `Axes` to draw on; a new figure otherwise.

        Returns:
            The matplotlib `Figure`.

        Raises:
            ImportError: If matplotlib is not installed.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "`SensitivityResult.plot` needs matplotlib, which is not "
                "installed. Install it with `pip install matplotlib`, or "
                "read the numbers from `result.table`."
            ) from error
        if ax is None:
            figure, ax = plt.subplots(figsize=(7, 4.5))
        else:
            figure = ax.figure
        for name, scores in self.scores.items():
            ax.plot(self.sparsities, scores, marker="o", label=name)
        ax.axhline(
            self.baseline, color="gray", linestyle="--", label="unpruned"
        )
        ax.set_xlabel("sparsity of the layer (others dense)")
        ax.set_ylabel(self.metric)
        ax.set_title("Sensitivity of each layer to pruning")
        ax.legend(fontsize="small")
        if path is not None:
            figure.savefig(path, bbox_inches="tight")
        return figure

    def __repr__(self):
        return (
            f"SensitivityResult(metric={self.metric!r}, "
            f"baseline={self.baseline:.4f}, layers={list(self.scores)}, "
            f"sparsities={self.sparsities})"
        )


def _check_sparsities(sparsities):
    try:
        values = [float(s) for s in sparsities]
    except (TypeError, ValueError):
        values = None
    if not values or any(not 0 < s < 1 for s in values):
        raise ValueError(
            "Argument `sparsities` must be a non-empty list of numbers in "
            f"(0, 1). Received: sparsities={sparsities!r}"
        )
    return sorted(set(values))


@kprune_export("kprune.sensitivity")
def sensitivity_analysis(
    model,
    x=None,
    y=None,
    sparsities=DEFAULT_SPARSITIES,
    layers=None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
    evaluate_fn=None,
    batch_size: int | None = None,
) -> SensitivityResult:
    """Prunes each layer alone at several sparsities and scores the model.

    For each prunable layer (or each of `layers`) and each sparsity, the
    layer's prunable weights are set to their magnitude-pruned values (the
    same exact mask `prune_low_magnitude` computes), the model is
    evaluated, and the weights are restored. No training happens, and the
    model is left as it was.

    Args:
        model: A built Keras model, compiled with the metric to read
            unless `evaluate_fn` is given.
        x: Evaluation inputs (anything `model.evaluate` accepts).
        y: Evaluation targets.
        sparsities: The sparsities to try, each in (0, 1).
        layers: Names of the layers to analyse; default: every prunable
            layer (`kprune.allocation.prunable_layer_names(model)`).
        metric: Key of `model.evaluate(..., return_dict=True)` to read;
            default `"accuracy"` if compiled, else `"loss"`.
        higher_is_better: Whether a larger score is better; default: False
            for names containing "loss" or "error", True otherwise.
        evaluate_fn: Instead of `model.evaluate`: a function
            `evaluate_fn(model) -> float`.
        batch_size: Passed to `model.evaluate`.

    Returns:
        A `kprune.sensitivity.SensitivityResult`.

    Raises:
        ValueError: If an argument is invalid or a layer name is unknown.

    Example:

    ```python
    model.compile(loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    result = kprune.sensitivity.sensitivity_analysis(model, x_val, y_val)
    result.plot("sensitivity.png")
    targets = result.suggest_sparsities(tolerance=0.01)
    pruned = kprune.prune_low_magnitude(model, targets)
    ```
    """
    sparsities = _check_sparsities(sparsities)
    candidates = {layer.name: layer for layer in _prunable_layers(model)}
    if layers is None:
        names = list(candidates)
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in candidates]
        if unknown:
            raise ValueError(
                "Argument `layers` names layers that are not prunable layers "
                f"of the model: {unknown}. Prunable layers: "
                f"{list(candidates)}"
            )
    if evaluate_fn is None:
        if not model.compiled:
            raise ValueError(
                "The model must be compiled (with the loss and metrics to "
                "read) for `sensitivity_analysis` to evaluate it, or pass "
                "`evaluate_fn`."
            )
        if x is None:
            raise ValueError(
                "Argument `x` is required unless `evaluate_fn` is given."
            )
        chosen = {"metric": metric}

        def evaluate_fn(m):
            logs = m.evaluate(
                x, y, batch_size=batch_size, verbose=0, return_dict=True
            )
            if chosen["metric"] is None:
                chosen["metric"] = "accuracy" if "accuracy" in logs else "loss"
            if chosen["metric"] not in logs:
                raise ValueError(
                    f"Argument `metric` must be one of {sorted(logs)} (the "
                    f"keys `evaluate` returns). Received: metric={metric!r}"
                )
            return float(logs[chosen["metric"]])

        baseline = evaluate_fn(model)
        metric = chosen["metric"]
    else:
        baseline = float(evaluate_fn(model))
        metric = metric or "score"
    if higher_is_better is None:
        higher_is_better = not any(w in metric for w in ("loss", "error"))

    scores = {}
    for name in names:
        weights = registry.get_prunable_weights(candidates[name])
        originals = [ops.convert_to_numpy(w) for w in weights]
        row = []
        try:
            for sparsity in sparsities:
                for weight, value in zip(weights, originals):
                    mask, _ = masking.magnitude_mask(
                        ops.convert_to_tensor(value), sparsity
                    )
                    weight.assign(
                        np.where(
                            ops.convert_to_numpy(mask),
                            value,
                            np.zeros((), value.dtype),
                        )
                    )
                row.append(float(evaluate_fn(model)))
        finally:
            for weight, value in zip(weights, originals):
                weight.assign(value)
        scores[name] = row
    return SensitivityResult(
        metric, bool(higher_is_better), baseline, sparsities, scores
    )
