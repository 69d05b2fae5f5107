"""The sparsity report: `sparsity_report` (a dict) and `summary` (a table)."""

import keras
import numpy as np

from kprune import _keras_internals
from kprune import registry
from kprune.api_export import kprune_export
from kprune.wrapper import PruneLowMagnitude
from kprune.wrapper import collect_pruned_layers

# Patterns looked for in the weights of stripped models, reported only when
# a weight holds at least this many groups or blocks, so that a small
# unstructured weight does not match one by chance.
_MIN_GROUPS = 16
_N_CANDIDATES = (2, 4, 8, 16)
_BLOCK_CANDIDATES = ((1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (4, 4), (8, 1))


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _m_by_n_pattern(values, axis):
    """`(m, n)` if every `n` consecutive weights along `axis` hold exactly
    `m` zeros for some candidate `n`, else None."""
    moved = np.moveaxis(values != 0, axis, -1)
    length = moved.shape[-1]
    zeros_total = moved.size - int(moved.sum())
    for n in _N_CANDIDATES:
        if length % n:
            continue
        groups = moved.reshape(-1, n)
        if len(groups) < _MIN_GROUPS:
            continue
        m = zeros_total // len(groups)
        if not 0 < m < n or m * len(groups) != zeros_total:
            continue
        if np.all(n - groups.sum(axis=1) == m):
            return m, n
    return None


def _block_pattern(values):
    """The largest candidate block shape in which every block of a rank-2
    weight is all zero or all nonzero (None if none, or if dense)."""
    nonzero = values != 0
    if values.ndim != 2 or nonzero.all() or not nonzero.any():
        return None
    found = None
    rows, cols = values.shape
    for bh, bw in _BLOCK_CANDIDATES:
        if rows % bh or cols % bw or rows * cols < _MIN_GROUPS * bh * bw:
            continue
        blocks = nonzero.reshape(rows // bh, bh, cols // bw, bw)
        kept = blocks.sum(axis=(1, 3))
        if np.all((kept == 0) | (kept == bh * bw)) and (
            found is None or bh * bw > found[0] * found[1]
        ):
            found = (bh, bw)
    return found


def _pattern_name(block_size, m_by_n):
    if m_by_n is not None:
        return f"{m_by_n[0]}:{m_by_n[1]}"
    if block_size is not None and tuple(block_size) != (1, 1):
        return f"block {block_size[0]}x{block_size[1]}"
    return None


def _row(variable, values, pruned, pattern):
    parameters = int(values.size)
    nonzeros = int(np.count_nonzero(values))
    return {
        "weight": variable.path,
        "shape": [int(d) for d in values.shape],
        "parameters": parameters,
        "nonzeros": nonzeros,
        "sparsity": (parameters - nonzeros) / parameters if parameters else 0,
        "pruned": pruned,
        "pattern": pattern,
    }


def _totals(rows):
    parameters = sum(r["parameters"] for r in rows)
    nonzeros = sum(r["nonzeros"] for r in rows)
    return {
        "parameters": parameters,
        "nonzeros": nonzeros,
        "sparsity": (parameters - nonzeros) / parameters if parameters else 0,
    }


@kprune_export("kprune.report")
def sparsity_report(model) -> dict:
    """The data of `kprune.report.summary`, as a dict for programs.

    Works on pruned models (the sparsity their masks give, which is what
    `strip_pruning` exports) and on stripped or plain ones (the zeros in
    the weights). The pruning state of wrappers (masks, thresholds, steps)
    is not listed.

    Args:
        model: A Keras model or layer, pruned or not.

    Returns:
        A dict with `"weights"`: one dict per weight, in the order of
        `model.weights` (`weight`: the variable's path, `shape`,
        `parameters`, `nonzeros`, `sparsity`, `pruned`: whether it is
        pruned by a wrapper or, in a plain model, prunable by kprune, and
        `pattern`: `"m:n"`, `"block hxw"` or `None`); `"total"`: the
        totals over all weights (`parameters`, `nonzeros`, `sparsity`); and
        `"pruned_total"`: the same over the pruned weights.

    Example:

    ```python
    report = kprune.report.sparsity_report(model)
    print(report["pruned_total"]["sparsity"])
    ```
    """
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            "Argument `model` must be a Keras model or layer. "
            f"Received: model={model!r}"
        )
    rows = {}
    skip = set()
    wrappers = collect_pruned_layers(model)
    for wrapper in wrappers:
        skip.add(id(wrapper.pruning_step))
        pattern = _pattern_name(wrapper.block_size, wrapper.sparsity_m_by_n)
        for weight, mask, threshold in wrapper.pruning_vars:
            skip.update((id(mask), id(threshold)))
            values = np.where(_numpy(mask), _numpy(weight), 0)
            rows[id(weight)] = _row(weight, values, True, pattern)
    layers = _keras_internals.flatten_layers(model, include_self=True)
    inner = {id(w.layer) for w in wrappers}
    for layer in layers:
        if (
            isinstance(layer, PruneLowMagnitude)
            or id(layer) in inner
            or not layer.built
            or not registry.is_prunable(layer)
        ):
            continue
        try:
            weights = registry.get_prunable_weights(layer)
        except ValueError:
            continue
        for weight in weights:
            axis = registry.weight_input_axis(layer, weight)
            values = _numpy(weight)
            m_by_n = _m_by_n_pattern(values, axis) if values.ndim >= 2 else None
            block = None if m_by_n else _block_pattern(values)
            rows[id(weight)] = _row(
                weight, values, True, _pattern_name(block, m_by_n)
            )
    ordered = []
    for weight in model.weights:
        if id(weight) in skip:
            continue
        row = rows.get(id(weight))
        if row is None:
            row = _row(weight, _numpy(weight), False, None)
        ordered.append(row)
    return {
        "weights": ordered,
        "total": _totals(ordered),
        "pruned_total": _totals([r for r in ordered if r["pruned"]]),
    }


def _format_table(report):
    header = ("Weight", "Shape", "Params", "Nonzeros", "Sparsity", "Pattern")
    lines = [
        (
            r["weight"] + ("" if r["pruned"] else " (dense)"),
            "x".join(str(d) for d in r["shape"]) or "scalar",
            f"{r['parameters']:,}",
            f"{r['nonzeros']:,}",
            f"{r['sparsity']:.2%}",
            r["pattern"] or "-",
        )
        for r in report["weights"]
    ]
    totals = [
        (
            label,
            "",
            f"{t['parameters']:,}",
            f"{t['nonzeros']:,}",
            f"{t['sparsity']:.2%}",
            "",
        )
        for label, t in (
            ("Total", report["total"]),
            ("Total pruned", report["pruned_total"]),
        )
    ]
    widths = [
        max(len(row[i]) for row in [header, *lines, *totals])
        for i in range(len(header))
    ]

    def fmt(row):
        cells = [
            cell.ljust(w) if i in (0, 1, 5) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(header))
    return [fmt(header), rule, *map(fmt, lines), rule, *map(fmt, totals)]


@kprune_export("kprune.report")
def summary(model, print_fn=None) -> None:
    """Prints a per-weight sparsity table of a pruned or stripped model.

    One row per weight: its path, shape, parameters, nonzeros, sparsity and
    pruning pattern (`"2:4"`, `"block 4x1"`; for stripped models the
    pattern is detected in the zeros), then totals over all weights and
    over the pruned ones. Weights that kprune does not prune (biases) are
    marked `(dense)`. `kprune.report.sparsity_report` returns the same data as a
    dict.

    Args:
        model: A Keras model or layer, pruned or not.
        print_fn: Function called with each line; defaults to `print`.

    Example:

    ```python
    kprune.report.summary(pruned_model)
    ```
    """
    print_fn = print_fn or print
    for line in _format_table(sparsity_report(model)):
        print_fn(line)
