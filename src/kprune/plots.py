"""Plots of sparsity, schedules and masks (needs matplotlib).

Install matplotlib with the `plots` extra: `pip install "kprune[plots]"`.
Each function returns a `matplotlib.figure.Figure` and, given a `filepath`,
also saves it there. No pyplot state is used, so plotting from a script
or a notebook cell does not change the user's current figure.
"""

import os

import keras
import numpy as np

from kprune.api_export import kprune_export
from kprune.report import sparsity_report
from kprune.schedules import PruningSchedule


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "kprune's plots need matplotlib. Install it with "
            '`pip install "kprune[plots]"` (or `pip install matplotlib`).'
        ) from None
    return Figure(**kwargs)


def _finish(figure, filepath):
    figure.tight_layout()
    if filepath is not None:
        figure.savefig(os.fspath(filepath), dpi=120)
    return figure


@kprune_export("kprune.plots")
def plot_sparsity(model, filepath=None):
    """Bar chart of the sparsity of each pruned weight of a model.

    Args:
        model: A Keras model, pruned or stripped (as for
            `kprune.report.sparsity_report`).
        filepath: Optional path (`.png`, `.svg`, `.pdf`) to save the figure.

    Returns:
        A `matplotlib.figure.Figure`.

    Example:

    ```python
    kprune.plots.plot_sparsity(pruned_model, "sparsity.png")
    ```
    """
    rows = [r for r in sparsity_report(model)["weights"] if r["pruned"]]
    names = [r["weight"] for r in rows]
    values = [100 * r["sparsity"] for r in rows]
    labels = [
        f"{value:.1f}% of {row['parameters']:,}"
        for value, row in zip(values, rows)
    ]
    # The labels are tick labels (weight names left, sparsity right), which
    # `tight_layout` makes room for; the figure widens with their length.
    longest = max((len(text) for text in names + labels), default=0)
    figure = _figure(
        figsize=(5 + 0.14 * longest, 1.5 + 0.4 * max(len(rows), 1))
    )
    axes = figure.add_subplot()
    positions = np.arange(len(rows))
    axes.barh(positions, values, color="tab:blue")
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("sparsity (% of weights that are zero)")
    right = axes.twinx()
    right.set_ylim(axes.get_ylim())
    right.set_yticks(positions, labels)
    right.tick_params(length=0)
    axes.set_title("Sparsity per pruned weight")
    return _finish(figure, filepath)


@kprune_export("kprune.plots")
def plot_schedule(schedule: PruningSchedule, end_step: int, filepath=None):
    """Target sparsity of a pruning schedule over training steps.

    Draws the sparsity the schedule returns at each step from 1 to
    `end_step` and marks the steps at which masks are recomputed.

    Args:
        schedule: A `kprune.PruningSchedule`.
        end_step: The last training step to draw (>= 1).
        filepath: Optional path to save the figure.

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: If `schedule` is not a schedule or `end_step` < 1.

    Example:

    ```python
    schedule = kprune.PolynomialDecay(0.5, 0.9, begin_step=0, end_step=1000)
    kprune.plots.plot_schedule(schedule, end_step=1200, filepath="schedule.png")
    ```
    """
    if not isinstance(schedule, PruningSchedule):
        raise ValueError(
            "Argument `schedule` must be a `kprune.PruningSchedule`. "
            f"Received: schedule={schedule!r}"
        )
    if isinstance(end_step, bool) or not isinstance(end_step, int):
        raise ValueError(
            "Argument `end_step` must be an integer >= 1. "
            f"Received: end_step={end_step!r}"
        )
    if end_step < 1:
        raise ValueError(
            f"Argument `end_step` must be >= 1. Received: end_step={end_step}"
        )
    steps, targets, prune_steps, prune_targets = [], [], [], []
    for step in range(1, end_step + 1):
        should_prune, sparsity = schedule(
            keras.ops.convert_to_tensor(step, "int64")
        )
        value = float(keras.ops.convert_to_numpy(sparsity))
        steps.append(step)
        targets.append(100 * value)
        if bool(keras.ops.convert_to_numpy(should_prune)):
            prune_steps.append(step)
            prune_targets.append(100 * value)
    figure = _figure(figsize=(7, 3.5))
    axes = figure.add_subplot()
    axes.plot(steps, targets, color="tab:blue", label="target sparsity")
    axes.plot(
        prune_steps,
        prune_targets,
        "o",
        color="tab:red",
        markersize=3,
        label="masks recomputed",
    )
    axes.set_xlabel("training step")
    axes.set_ylabel("sparsity (%)")
    axes.set_ylim(0, 100)
    axes.legend(loc="lower right")
    axes.set_title(type(schedule).__name__)
    return _finish(figure, filepath)


@kprune_export("kprune.plots")
def plot_mask(weight, filepath=None, title=None):
    """Black-and-white image of which entries of a weight are nonzero.

    Black is a kept (nonzero) weight, white a pruned one. Weights of rank
    > 2 are shown as a 2-D matrix with the last axis (output channels) as
    columns; a rank-1 weight as a single row.

    Args:
        weight: A Keras variable or array, such as a stripped model's
            `layer.kernel`.
        filepath: Optional path to save the figure.
        title: Optional title; defaults to the variable's path and its
            sparsity.

    Returns:
        A `matplotlib.figure.Figure`.

    Example:

    ```python
    kprune.plots.plot_mask(stripped_model.layers[-1].kernel, "mask.png")
    ```
    """
    values = np.asarray(keras.ops.convert_to_numpy(weight))
    if values.ndim == 0:
        raise ValueError(
            "Argument `weight` must have rank >= 1. Received a scalar."
        )
    matrix = values.reshape(-1, values.shape[-1]) != 0
    if values.ndim == 1:
        matrix = matrix.reshape(1, -1)
    rows, cols = matrix.shape
    aspect = rows / max(cols, 1)
    width = 6.0
    height = float(np.clip(width * aspect, 1.5, 8.0))
    figure = _figure(figsize=(width, height + 0.6))
    axes = figure.add_subplot()
    axes.imshow(
        matrix,
        cmap="gray_r",
        vmin=0,
        vmax=1,
        interpolation="nearest",
        aspect="auto",
    )
    sparsity = 1.0 - matrix.mean() if matrix.size else 0.0
    name = getattr(weight, "path", None) or "weight"
    axes.set_title(title or f"{name}: {sparsity:.1%} zeros (white)")
    axes.set_xlabel(f"{cols} columns (last axis)")
    axes.set_ylabel(f"{rows} rows")
    # Entries are whole rows and columns: no ticks between them.
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    return _finish(figure, filepath)
