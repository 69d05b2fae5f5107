"""One-shot pruning: a trained model pruned from a little calibration data.

No training: each prunable layer is pruned once, in the order the model
calls its layers, from statistics of its inputs on calibration data. The
inputs are those the model produces with the layers before already pruned
(as SparseGPT and Wanda do across blocks), so each layer sees the errors
of the ones before it. A model whose layers lie in a chain of blocks
(keras-hub's `sequential_blocks`, a `Sequential` model's layers) is run
block by block, each block on its inputs kept from the block before;
other models are run from their input for each group of layers. Three
methods:

- `"magnitude"`: the weights of smallest absolute value in each layer (the
  baseline; needs no data).
- `"wanda"` (Sun et al., 2023, "A Simple and Effective Pruning Approach
  for Large Language Models"): scores `|W_ij| * ||X_j||_2`, the weight's
  magnitude times the norm of its input over the calibration data,
  compared within each output unit; no weight update.
- `"sparsegpt"` (Frantar & Alistarh, 2023, "SparseGPT: Massive Language
  Models Can Be Accurately Pruned in One-Shot"): layer-wise optimal brain
  surgeon with the Hessian `2 X^T X / n` of the layer's inputs; the kept
  weights are updated to reconstruct the layer's outputs.

The math runs in NumPy, float64, on the host, one layer at a time (the
largest buffer is one `in_features x in_features` Hessian), so it is the
same on every backend. Under a Keras distribution (weights sharded over
devices), the math runs in `keras.ops` on the sharded kernels instead, so
no kernel is gathered.

`quantize_gptq` quantizes a pruned model with GPTQ into Keras's own GPTQ
format, keeping its zeros exactly.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

from kprune import _keras_internals
from kprune import masking
from kprune import registry
from kprune.api_export import kprune_export
from kprune.wrapper import require_model
from kprune.wrapper import validate_pruning_args


def _pruned_count(size: int, sparsity: float) -> int:
    """How many of `size` weights are zeroed: `size - kept_count`."""
    return size - int(ops.convert_to_numpy(masking.kept_count(size, sparsity)))


def _lowest(scores, count):
    """Boolean array, `True` at the `count` lowest entries of `scores`.

    Ties are broken as in `kprune.masking`: among equal scores, the lower
    flat index is kept, so exactly `count` entries are marked.
    """
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")
    pruned = np.zeros(flat.shape, bool)
    pruned[order[flat.size - count :]] = True
    return pruned.reshape(scores.shape)


def _lowest_per_row(scores, counts):
    """Row `r` of the result marks the `counts[r]` lowest of `scores[r]`."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :], axis=1)
    return ranks >= (scores.shape[1] - np.asarray(counts))[:, None]


def _lowest_in_groups(scores, m_by_n):
    """N:M along the columns: in each row, `m` of every `n` consecutive
    columns marked (the lowest scores)."""
    m, n = m_by_n
    rows, columns = scores.shape
    groups = scores.reshape(rows * columns // n, n)
    return _lowest_per_row(groups, np.full(groups.shape[0], m)).reshape(
        rows, columns
    )


def _lowest_in_columns(scores, counts):
    """`_lowest_per_row` of `scores.T`, on a tensor `(in, out)`: column `c`
    marks its `counts[c]` lowest scores. The sorts run along the input
    axis only, so each device sorts the output units it holds."""
    order = ops.argsort(-scores, axis=0)
    ranks = ops.argsort(order, axis=0)
    limit = ops.convert_to_tensor(scores.shape[0] - np.asarray(counts))
    return ranks >= ops.cast(limit, ranks.dtype)[None, :]


def _lowest_in_column_groups(scores, m_by_n):
    """`_lowest_in_groups` of `scores.T`, on a tensor `(in, out)`."""
    m, n = m_by_n
    rows, columns = scores.shape
    groups = ops.reshape(scores, (rows // n, n, columns))
    ranks = ops.argsort(ops.argsort(-groups, axis=1), axis=1)
    return ops.reshape(ranks >= n - m, (rows, columns))


def _lowest_of_tensor(scores, count):
    """`_lowest(scores.T, count).T` on a non-negative float32 tensor
    `(in, out)`, by reductions only: the threshold is found by bisection on
    the scores' bit patterns (non-negative floats order like their bits as
    int32), 31 counts of the scores above a candidate; ties at the
    threshold keep the lowest indices of the `(out, in)` layout, which are
    ranked from per-column counts. Nothing is sorted or gathered: each
    device counts on its own part and only scalars and one value per
    output unit cross devices."""
    keys = ops.view(scores, "int32")
    keep = math.prod(scores.shape) - count
    if keep == 0:
        return ops.ones(scores.shape, "bool")
    low, high = 0, 2**31 - 1
    while low < high:
        # The largest key with at least `keep` keys at or above it.
        middle = (low + high + 1) // 2
        if int(ops.sum(ops.cast(keys >= middle, "int32"))) >= keep:
            low = middle
        else:
            high = middle - 1
    above = keys > low
    tied = ops.cast(keys == low, "int32")
    wanted = keep - int(ops.sum(ops.cast(above, "int32")))
    per_column = ops.sum(tied, axis=0)
    before = ops.cumsum(per_column) - per_column
    rank = before[None, :] + ops.cumsum(tied, axis=0)
    kept_ties = ops.logical_and(tied > 0, rank <= wanted)
    return ops.logical_not(ops.logical_or(above, kept_ties))


def _row_counts(rows, columns, sparsity):
    """Zeros per row so that the layer loses exactly `_pruned_count`.

    Each row loses `floor(total / rows)`, the first `total % rows` rows one
    more: `int(columns * sparsity)` per row, as in Wanda, whenever that
    product is an integer.
    """
    total = _pruned_count(rows * columns, sparsity)
    counts = np.full(rows, total // rows)
    counts[: total % rows] += 1
    return counts


class _Magnitude:
    """The baseline: the weights of smallest magnitude in the layer."""

    needs_data = False

    def __init__(self, columns):
        del columns  # The statistics classes share one signature.

    def prune_tensor(self, kernel, sparsity, m_by_n, **_):
        """`prune` on a float32 `(in, out)` tensor, where it lives."""
        magnitudes = ops.abs(kernel)
        if m_by_n is not None:
            pruned = _lowest_in_column_groups(magnitudes, m_by_n)
        else:
            pruned = _lowest_of_tensor(
                magnitudes, _pruned_count(math.prod(kernel.shape), sparsity)
            )
        return ops.where(pruned, 0.0, kernel)

    def prune(self, weights, sparsity, m_by_n, **_):
        """`weights`: `(out, in)` float64. Returns the pruned copy."""
        if m_by_n is not None:
            pruned = _lowest_in_groups(np.abs(weights), m_by_n)
        else:
            pruned = _lowest(
                np.abs(weights), _pruned_count(weights.size, sparsity)
            )
        return np.where(pruned, 0.0, weights)


class _Wanda:
    """Scores `|W_ij| * ||X_j||_2`, compared within each output unit."""

    needs_data = True

    def __init__(self, columns):
        self.squares = np.zeros(columns)

    def add_batch(self, rows):
        """Accumulates `sum_t x_tj^2` over rows `x_t` of the inputs."""
        self.squares += np.einsum("tj,tj->j", rows, rows)

    def prune_tensor(self, kernel, sparsity, m_by_n, **_):
        """`prune` on a float32 `(in, out)` tensor, where it lives."""
        norms = ops.convert_to_tensor(np.sqrt(self.squares), "float32")
        scores = ops.abs(kernel) * norms[:, None]
        if m_by_n is not None:
            pruned = _lowest_in_column_groups(scores, m_by_n)
        else:
            counts = _row_counts(kernel.shape[1], kernel.shape[0], sparsity)
            pruned = _lowest_in_columns(scores, counts)
        return ops.where(pruned, 0.0, kernel)

    def prune(self, weights, sparsity, m_by_n, **_):
        scores = np.abs(weights) * np.sqrt(self.squares)[None, :]
        if m_by_n is not None:
            pruned = _lowest_in_groups(scores, m_by_n)
        else:
            counts = _row_counts(*weights.shape, sparsity)
            pruned = _lowest_per_row(scores, counts)
        return np.where(pruned, 0.0, weights)


class _SparseGPT:
    """Layer-wise OBS reconstruction with blocked column updates."""

    needs_data = True

    def __init__(self, columns):
        self.hessian = np.zeros((columns, columns))
        self.samples = 0

    def add_batch(self, rows):
        """Keeps `H = 2 X^T X / n` over all rows seen so far."""
        total = self.samples + rows.shape[0]
        self.hessian *= self.samples / total
        self.hessian += (2.0 / total) * (rows.T @ rows)
        self.samples = total

    def _inverse_cholesky(self, weights, damping):
        """The upper Cholesky factor of the dampened `H^-1`; zeroes the
        columns of `weights` whose input is always zero."""
        hessian = self.hessian.copy()
        dead = np.diag(hessian) == 0
        hessian[dead, dead] = 1.0
        weights[:, dead] = 0.0
        diagonal = np.arange(hessian.shape[0])
        hessian[diagonal, diagonal] += damping * np.mean(np.diag(hessian))
        try:
            lower = np.linalg.cholesky(hessian)
            lower_inverse = np.linalg.solve(lower, np.eye(lower.shape[0]))
            inverse = lower_inverse.T @ lower_inverse
            return np.linalg.cholesky(inverse).T
        except np.linalg.LinAlgError as error:
            raise ValueError(
                "The Hessian of the calibration inputs is not positive "
                "definite even after dampening. Use a larger "
                f"`hessian_damping` (received {damping}) or more "
                "calibration data."
            ) from error

    def prune(self, weights, sparsity, m_by_n, blocksize, damping):
        weights = weights.copy()
        rows, columns = weights.shape
        inverse = self._inverse_cholesky(weights, damping)
        total = _pruned_count(weights.size, sparsity)

        def target(column):
            # Zeros in the columns before `column`: each block of columns
            # loses its share, rounded so that the layer loses `total`.
            return (total * column + columns // 2) // columns

        for start in range(0, columns, blocksize):
            end = min(start + blocksize, columns)
            block = weights[:, start:end].copy()
            updated = np.zeros_like(block)
            errors = np.zeros_like(block)
            block_inverse = inverse[start:end, start:end]
            diagonal = np.diag(block_inverse)
            if m_by_n is None:
                scores = block**2 / diagonal[None, :] ** 2
                pruned = _lowest(scores, target(end) - target(start))
            else:
                pruned = np.zeros(block.shape, bool)
            for i in range(end - start):
                if m_by_n is not None and i % m_by_n[1] == 0:
                    group = slice(i, i + m_by_n[1])
                    scores = block[:, group] ** 2 / diagonal[group] ** 2
                    pruned[:, group] = _lowest_in_groups(scores, m_by_n)
                column = block[:, i]
                kept = np.where(pruned[:, i], 0.0, column)
                updated[:, i] = kept
                error = (column - kept) / diagonal[i]
                block[:, i:] -= np.outer(error, block_inverse[i, i:])
                errors[:, i] = error
            weights[:, start:end] = updated
            weights[:, end:] -= errors @ inverse[start:end, end:]
        return weights

    def prune_tensor(self, kernel, sparsity, m_by_n, blocksize, damping):
        """`prune` on a float32 `(in, out)` tensor, where it lives.

        Each output unit's weights are updated on their own given the
        inverse Hessian factor (computed on the host: it is `in x in`), so
        a kernel split by output units is updated where each part lives.
        The unstructured mask of a block is chosen across output units by
        `_lowest_of_tensor` (counts, no sort)."""
        columns, rows = kernel.shape
        placeholder = np.zeros((1, columns))
        inverse = self._inverse_cholesky(placeholder, damping)
        dead = ops.convert_to_tensor(np.diag(self.hessian) == 0)
        kernel = ops.where(dead[:, None], 0.0, kernel)
        factor = ops.convert_to_tensor(inverse, "float32")
        diagonal = np.diag(inverse)
        total = _pruned_count(rows * columns, sparsity)

        def target(column):
            return (total * column + columns // 2) // columns

        done = []
        for start in range(0, columns, blocksize):
            end = min(start + blocksize, columns)
            block = kernel[start:end]
            scale = ops.convert_to_tensor(diagonal[start:end, None], "float32")
            if m_by_n is None:
                pruned = _lowest_of_tensor(
                    block**2 / scale**2, target(end) - target(start)
                )
            else:
                pruned = []
            errors = []
            for i in range(end - start):
                if m_by_n is not None and i % m_by_n[1] == 0:
                    group = slice(i, i + m_by_n[1])
                    pruned.append(
                        _lowest_in_column_groups(
                            block[group] ** 2 / scale[group] ** 2, m_by_n
                        )
                    )
                row_pruned = (
                    pruned[i] if m_by_n is None else pruned[-1][i % m_by_n[1]]
                )
                row = block[i]
                error = (row - ops.where(row_pruned, 0.0, row)) / float(
                    diagonal[start + i]
                )
                # The factor is upper triangular: rows before `i` are not
                # changed.
                block = block - factor[start + i, start:end][:, None] * error
                errors.append(error)
            if m_by_n is not None:
                pruned = ops.concatenate(pruned, axis=0)
            done.append(ops.where(pruned, 0.0, block))
            if end < columns:
                errors = ops.stack(errors, axis=0)
                kernel = ops.concatenate(
                    [
                        kernel[:end],
                        kernel[end:]
                        - ops.matmul(
                            ops.transpose(factor[start:end, end:]), errors
                        ),
                    ],
                    axis=0,
                )
        return ops.concatenate(done, axis=0)


_METHODS = {
    "sparsegpt": _SparseGPT,
    "wanda": _Wanda,
    "magnitude": _Magnitude,
}


class _Linear:
    """A layer seen as `y = x W`: `W` of shape `(in, out)`, its inputs as
    rows of length `in`.

    `kernel` is the variable pruned; `kernel_in` and `kernel_out` are its
    input and output axes, flattened in that order into `W`'s rows and
    columns. `matrix()` returns `W`; `assign(matrix)` writes such a matrix
    back; `rows(x)` turns one call's input tensor into `(-1, in)` rows
    (`to_rows` does it on a float64 NumPy array, as `signature` (a tuple)
    describes).
    """

    def __init__(
        self, layer, kernel, kernel_in, kernel_out, to_rows, signature
    ):
        self.layer = layer
        self.kernel = kernel
        self.permutation = tuple(kernel_in) + tuple(kernel_out)
        shape = tuple(kernel.shape)
        self.in_features = math.prod(shape[a] for a in kernel_in)
        self.out_features = math.prod(shape[a] for a in kernel_out)
        # N:M groups run along the innermost input axis.
        self.channels = shape[kernel_in[-1]]
        self.to_rows = to_rows
        # Equal for layers whose `rows` of the same input are equal.
        self.signature = (self.in_features, *signature)

    def matrix(self):
        kernel = ops.convert_to_numpy(ops.cast(self.kernel, "float32"))
        kernel = np.transpose(kernel.astype(np.float64), self.permutation)
        return kernel.reshape(self.in_features, self.out_features)

    def assign(self, matrix):
        shape = tuple(self.kernel.shape)
        moved = matrix.reshape([shape[a] for a in self.permutation])
        kernel = np.transpose(moved, np.argsort(self.permutation))
        self.kernel.assign(
            ops.cast(kernel.astype(np.float32), self.kernel.dtype)
        )

    def tensor(self):
        """`W` as a float32 tensor `(in, out)` where the kernel lives (on
        its devices, sharded as it is), not copied to the host."""
        kernel = ops.transpose(
            ops.cast(self.kernel, "float32"), self.permutation
        )
        return ops.reshape(kernel, (self.in_features, self.out_features))

    def assign_tensor(self, matrix):
        shape = tuple(self.kernel.shape)
        moved = ops.reshape(matrix, [shape[a] for a in self.permutation])
        kernel = ops.transpose(moved, tuple(np.argsort(self.permutation)))
        self.kernel.assign(ops.cast(kernel, self.kernel.dtype))

    def rows(self, inputs):
        x = ops.convert_to_numpy(ops.cast(inputs, "float32"))
        return self.to_rows(x.astype(np.float64))


def _contract(input_axes, in_features):
    """Rows of the input axes `input_axes`, in that order; the other axes
    index the rows."""

    def to_rows(x):
        axes = [a % x.ndim for a in input_axes]
        others = [a for a in range(x.ndim) if a not in axes]
        return np.transpose(x, others + axes).reshape(-1, in_features)

    return to_rows


def _patches(layer, in_features):
    """im2col of a convolution: each output position's receptive field,
    `(kernel positions..., input channels)` flattened, as one row."""
    rank = len(layer.kernel_size)

    def to_rows(x):
        if layer.data_format == "channels_first":
            x = np.moveaxis(x, 1, -1)
        padding = []
        for size, k, stride, rate in zip(
            x.shape[1:-1], layer.kernel_size, layer.strides, layer.dilation_rate
        ):
            span = (k - 1) * rate + 1
            if layer.padding == "same":
                total = max((-(-size // stride) - 1) * stride + span - size, 0)
                padding.append((total // 2, total - total // 2))
            elif layer.padding == "causal":
                padding.append((span - 1, 0))
            else:
                padding.append((0, 0))
        x = np.pad(x, [(0, 0), *padding, (0, 0)])
        spans = [
            (k - 1) * r + 1
            for k, r in zip(layer.kernel_size, layer.dilation_rate)
        ]
        windows = np.lib.stride_tricks.sliding_window_view(
            x, spans, axis=tuple(range(1, rank + 1))
        )
        # (batch, positions..., channels, window...): keep the strided
        # positions and the dilated taps.
        index = (
            (slice(None),)
            + tuple(slice(None, None, s) for s in layer.strides)
            + (slice(None),)
            + tuple(slice(None, None, r) for r in layer.dilation_rate)
        )
        windows = np.moveaxis(windows[index], rank + 1, -1)
        return windows.reshape(-1, in_features)

    return to_rows


def _einsum_linear(layer):
    """`_Linear` of an `EinsumDense`, or a reason it is not one."""
    equation = layer.equation.replace(" ", "")
    try:
        inputs, rest = equation.split(",")
        kernel, output = rest.split("->")
    except ValueError:
        return f"its equation {equation!r} is not of the form 'x,w->y'"
    if "." in kernel:
        return f"its equation {equation!r} has an ellipsis in the kernel"
    shared = [c for c in kernel if c in inputs and c in output]
    if shared:
        return (
            f"its equation {equation!r} keeps kernel axes {shared} in the "
            "output, so it is several linear maps, not one"
        )
    if any(c not in inputs and c not in output for c in kernel) or any(
        c not in kernel and c not in output for c in inputs if c != "."
    ):
        return f"its equation {equation!r} sums axes out"
    left, _, right = inputs.partition("...")
    has_ellipsis = "..." in inputs

    def input_axis(letter):
        if letter in left:
            return left.index(letter)
        if has_ellipsis:
            return right.index(letter) - len(right)
        return inputs.index(letter)

    kernel_in = registry.einsum_contracted_axes(equation)
    kernel_out = [i for i, c in enumerate(kernel) if c in output]
    input_axes = [input_axis(kernel[i]) for i in kernel_in]
    shape = tuple(layer.kernel.shape)
    in_features = math.prod(shape[a] for a in kernel_in)
    return _Linear(
        layer,
        layer.kernel,
        kernel_in,
        kernel_out,
        _contract(input_axes, in_features),
        ("contract", *input_axes),
    )


_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _linear(layer):
    """`_Linear` of a layer kprune can prune in one shot, or a string
    saying why it cannot (or `None` for a layer that is not linear)."""
    linear_classes = (keras.layers.Dense, keras.layers.EinsumDense)
    if not isinstance(layer, linear_classes + _CONVOLUTIONS):
        return None
    if not layer.built:
        return "it is not built; call the model on a batch first"
    if getattr(layer, "quantization_mode", None) is not None:
        return "it is quantized"
    if getattr(layer, "lora_enabled", False):
        return "it has LoRA enabled"
    if isinstance(layer, keras.layers.EinsumDense):
        return _einsum_linear(layer)
    if isinstance(layer, _CONVOLUTIONS):
        if layer.groups != 1:
            return f"it is a grouped convolution (groups={layer.groups})"
        rank = len(layer.kernel_size)
        in_features = math.prod(layer.kernel.shape[:-1])
        return _Linear(
            layer,
            layer.kernel,
            list(range(rank + 1)),
            [rank + 1],
            _patches(layer, in_features),
            (
                "patches",
                tuple(layer.kernel_size),
                tuple(layer.strides),
                tuple(layer.dilation_rate),
                layer.padding,
                layer.data_format,
            ),
        )
    return _Linear(
        layer,
        layer.kernel,
        [0],
        [1],
        _contract([-1], layer.kernel.shape[0]),
        ("contract", -1),
    )


def _select(model, layers):
    """`([_Linear] to prune, [(name, why) of layers left out])`, in model
    order (not yet call order)."""
    selectors = None if layers is None else list(_as_list(layers))
    for selector in selectors or []:
        if not (
            isinstance(selector, (str, keras.layers.Layer))
            or callable(selector)
        ):
            raise ValueError(
                "Argument `layers` must name the layers to prune: layer "
                "names, layer classes, layers, or functions of a layer "
                f"returning a bool. Received an entry {selector!r}"
            )

    def chosen(layer):
        if selectors is None:
            return True
        for selector in selectors:
            if isinstance(selector, str):
                if layer.name == selector:
                    return True
            elif isinstance(selector, type):
                if isinstance(layer, selector):
                    return True
            elif isinstance(selector, keras.layers.Layer):
                if layer is selector:
                    return True
            elif selector(layer):
                return True
        return False

    found, skipped, seen = [], [], set()
    for layer in _keras_internals.flatten_layers(model):
        if id(layer) in seen or not chosen(layer):
            continue
        seen.add(id(layer))
        linear = _linear(layer)
        if isinstance(linear, _Linear):
            found.append(linear)
        elif isinstance(linear, str) and selectors is None:
            skipped.append((layer.name, linear))
        elif isinstance(linear, str):
            raise ValueError(
                f"Layer {layer.name!r} of class {type(layer).__name__} was "
                f"chosen in `layers` but cannot be pruned in one shot: "
                f"{linear}. Leave it out of `layers`."
            )
    names = {layer.name for layer in _keras_internals.flatten_layers(model)}
    missing = [
        s for s in selectors or [] if isinstance(s, str) and s not in names
    ]
    if missing:
        raise ValueError(
            f"Argument `layers` names layers that model {model.name!r} does "
            f"not have: {missing}. Its layers: {sorted(names)}"
        )
    return found, skipped


def _as_list(value):
    return value if isinstance(value, (list, tuple, set)) else [value]


def _to_numpy(value):
    return keras.tree.map_structure(
        lambda x: (
            ops.convert_to_numpy(x) if ops.is_tensor(x) else np.asarray(x)
        ),
        value,
    )


def _batches(calibration_data, batch_size):
    """The calibration data as a list of batches of NumPy model inputs."""
    data = calibration_data
    if isinstance(data, keras.utils.PyDataset):
        items = [data[i] for i in range(len(data))]
    elif (
        isinstance(data, (np.ndarray, dict, list, tuple))
        or ops.is_tensor(data)
        or hasattr(data, "__array__")
    ):
        flat = keras.tree.flatten(data)
        if not flat:
            raise ValueError(
                "Argument `calibration_data` is empty. Pass the model's "
                "inputs for a few batches."
            )
        lengths = {np.shape(x)[0] if np.ndim(x) else None for x in flat}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(
                "Argument `calibration_data` must hold the model's inputs, "
                "arrays with the same number of samples along their first "
                "axis. Received arrays of shapes "
                f"{[tuple(np.shape(x)) for x in flat]}"
            )
        size = lengths.pop()
        numpy_data = _to_numpy(data)
        return [
            keras.tree.map_structure(
                lambda x, s=start: x[s : s + batch_size], numpy_data
            )
            for start in range(0, size, batch_size)
        ]
    else:
        try:
            items = list(data)
        except TypeError:
            raise ValueError(
                "Argument `calibration_data` must be the model's inputs (an "
                "array, or a dict or list of arrays), or an iterable of "
                "batches (a `tf.data.Dataset`, a `keras.utils.PyDataset`, a "
                f"generator). Received: {type(data).__name__}"
            ) from None
    batches = []
    for item in items:
        if isinstance(item, tuple):
            item, _, _ = keras.utils.unpack_x_y_sample_weight(item)
        batches.append(_to_numpy(item))
    if not batches:
        raise ValueError(
            "Argument `calibration_data` yielded no batches. Pass the "
            "model's inputs for a few batches."
        )
    return batches


def _checked_batches(model, calibration_data, batch_size):
    """The calibration batches, checked against `model`'s inputs; the first
    builds `model` when it is not built yet."""
    batches = _batches(calibration_data, batch_size)
    _check_fits(model, batches[0])
    if not model.built:
        # A subclassed model creates its layers' weights when called.
        _call_checked(model, batches[0])
    return batches


def _check_fits(model, batch):
    """Raises a clear error when `batch` does not fit a graph model's
    inputs."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return
    if not inputs:
        return
    flat = keras.tree.flatten(batch)
    if len(flat) != len(inputs):
        raise ValueError(
            f"Argument `calibration_data` must hold {len(inputs)} input(s) "
            f"for model {model.name!r}. Received {len(flat)}: shapes "
            f"{[tuple(np.shape(x)) for x in flat]}"
        )
    if isinstance(batch, dict):
        by_name = {x.name: x for x in inputs}
        if set(batch) <= set(by_name):
            pairs = [(by_name[k], batch[k]) for k in batch]
        else:
            pairs = []
    else:
        pairs = list(zip(inputs, flat))
    for symbolic, array in pairs:
        expected = tuple(symbolic.shape)
        received = tuple(np.shape(array))
        if len(expected) != len(received) or any(
            e is not None and e != r for e, r in zip(expected, received)
        ):
            raise ValueError(
                "Argument `calibration_data` does not fit the inputs of "
                f"model {model.name!r}: input {symbolic.name!r} has shape "
                f"{expected}, the calibration batch has shape {received}. "
                "Pass data shaped like the model's inputs (the first axis "
                "is the sample axis)."
            )


class _Captured(Exception):
    """Stops a forward pass once the layer of interest has seen its
    input."""


class _Hooks:
    """Temporarily replaces the `call` of some layers.

    `layers` holds `(key, layer)` pairs; within the `with` block, `layer`'s
    `call` is `wrap(key, call)`, its own `call` wrapped. A wrapper may raise
    `_Captured` to end the forward pass there.
    """

    def __init__(self, layers, wrap):
        self.layers = layers
        self.wrap = wrap
        # Layers whose `call` was an instance attribute already -> it.
        self.own_calls = {}

    def __enter__(self):
        for key, layer in self.layers:
            original = layer.call
            if "call" in vars(layer):
                self.own_calls[id(layer)] = original
            layer.call = self.wrap(key, original)
        return self

    def __exit__(self, *exc):
        for _, layer in reversed(self.layers):
            if id(layer) in self.own_calls:
                layer.call = self.own_calls[id(layer)]
            else:
                del layer.call


def _input_hooks(linears, on_call):
    """`_Hooks` that run `on_call(linear, inputs)` before each of the
    layers of `linears` is called on `inputs`."""

    def wrap(linear, original):
        def call(*args, **kwargs):
            on_call(linear, args[0] if args else kwargs["inputs"])
            return original(*args, **kwargs)

        return call

    return _Hooks([(linear, linear.layer) for linear in linears], wrap)


def _call_checked(model, batch):
    """Calls the model on a batch, saying which argument is wrong when it
    fails."""
    try:
        model(batch, training=False)
    except Exception as error:
        raise ValueError(
            f"Model {model.name!r} fails on the calibration data: "
            f"{type(error).__name__}: {error}. Argument "
            "`calibration_data` must hold inputs the model accepts "
            "(`model(batch)` must run)."
        ) from error


def _candidate_blocks(model, structure=None):
    """Layers that may be `model`'s blocks, run one after the other: the
    `sequential_blocks` of `structure` or of
    `model.get_quantization_layer_structure("gptq")` (keras-hub's
    `CausalLM` and `MaskedLM` models name their transformer layers so),
    else the model's own layers (a `Sequential` model's are such a
    chain). `_BlockTrace` checks that they are."""
    # Models of Keras 3.11 and older have no such method.
    if structure is None and hasattr(model, "get_quantization_layer_structure"):
        structure = model.get_quantization_layer_structure("gptq")
    if structure and structure.get("sequential_blocks"):
        return list(structure["sequential_blocks"])
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]


def _same_leaves(a, b):
    """Whether `a` and `b` hold the very same tensors and equal plain
    values (`None`, flags, numbers, strings)."""
    a, b = keras.tree.flatten(a), keras.tree.flatten(b)
    return len(a) == len(b) and all(
        x is y
        or (
            isinstance(x, (bool, int, float, str))
            and type(x) is type(y)
            and x == y
        )
        for x, y in zip(a, b)
    )


class _BlockTrace:
    """Watches some candidate layers ("blocks") during a forward pass, to
    tell whether the model runs them as a chain.

    A chain: each block is called once, none inside another, each on the
    output of the block called before it (the very tensor), and with the
    same other arguments as the first one (padding masks and positions
    computed once before the blocks, the `training` flag). Then the input
    of each block depends on the model's input only through the input of
    the first, and a block can be re-run on its inputs kept from the pass
    before, without the layers before it.
    """

    def __init__(self, blocks):
        self.blocks = blocks
        # (block, args, kwargs, output) in the order they are entered.
        self.calls = []
        # Index in `calls` of the block running, or `None`.
        self.active = None
        self.nested = False

    def hooks(self):
        def wrap(block, original):
            def call(*args, **kwargs):
                if self.active is not None:
                    self.nested = True
                    return original(*args, **kwargs)
                self.active = len(self.calls)
                self.calls.append([block, args, kwargs, None])
                try:
                    self.calls[-1][3] = original(*args, **kwargs)
                finally:
                    self.active = None
                return self.calls[-1][3]

            return call

        return _Hooks([(block, block) for block in self.blocks], wrap)

    def chain(self, groups, places):
        """`None` if the blocks are not a chain or hold no group of
        `groups`, else `(blocks, owners)`: the blocks in call order and,
        per group, the index of the block it lies in, or `None` for a
        group before the first or after the last of those blocks.
        `places[id(linear)]`: the set of `self.active` values seen when
        `linear` was called."""
        calls = self.calls
        if (
            self.nested
            or not calls
            or not calls[0][1]
            or len({id(call[0]) for call in calls}) != len(calls)
        ):
            return None
        _, first_args, first_kwargs, _ = calls[0]
        for before, (_, args, kwargs, _) in zip(calls, calls[1:]):
            if (
                not args
                or args[0] is not before[3]
                or not _same_leaves(args[1:], first_args[1:])
                or set(kwargs) != set(first_kwargs)
                or not _same_leaves(
                    [kwargs[k] for k in sorted(kwargs)],
                    [first_kwargs[k] for k in sorted(first_kwargs)],
                )
            ):
                return None
        owners = []
        for group in groups:
            where = set().union(*(places[id(linear)] for linear in group))
            if len(where) != 1:
                return None
            owners.append(where.pop())
        inside = [i for i, owner in enumerate(owners) if owner is not None]
        if not inside:
            return None
        # Groups outside the blocks come before or after them all, and the
        # groups of each block come together.
        span = owners[inside[0] : inside[-1] + 1]
        if None in span or span != sorted(span):
            return None
        return [call[0] for call in calls], owners


def _call_order(model, linears, batch, blocks=()):
    """Groups of layers, in the order the model first calls them, how
    many times each layer is called per forward pass, and the blocks the
    groups lie in (see `_BlockTrace.chain`; `None` unless the candidate
    `blocks` are a chain).

    Consecutive layers called on the very same input tensor (the query,
    key and value projections of self-attention) form one group: they
    share the statistics of that input, gathered in one pass. Layers never
    called are dropped, with a warning.
    """
    groups, calls = [], {}
    # The input of the current group, held so that its id is not reused.
    current = []
    trace = _BlockTrace(blocks)
    places = {}

    def record(linear, inputs):
        if id(linear) not in calls:
            calls[id(linear)] = 0
            if current and inputs is current[0]:
                groups[-1].append(linear)
            else:
                groups.append([linear])
                current[:] = [inputs]
        calls[id(linear)] += 1
        places.setdefault(id(linear), set()).add(trace.active)

    with _input_hooks(linears, record), trace.hooks():
        _call_checked(model, batch)
    current.clear()
    unused = [x.layer.name for x in linears if id(x) not in calls]
    if unused:
        warnings.warn(
            f"Layers {unused} are not called on the calibration data, so "
            "they are left dense.",
            stacklevel=3,
        )
    # A layer called several times sees other inputs too: it is calibrated
    # alone.
    split = []
    for group in groups:
        if len(group) > 1 and any(calls[id(x)] > 1 for x in group):
            split.extend([x] for x in group)
        else:
            split.append(group)
    return split, calls, trace.chain(split, places)


def _check_sparsity(sparsity):
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float, np.number))
        or not 0.0 <= float(sparsity) < 1.0
    ):
        raise ValueError(
            "Argument `sparsity` must be a number in [0, 1). "
            f"Received: sparsity={sparsity!r}"
        )
    return float(sparsity)


def _check_positive_int(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value <= 0
    ):
        raise ValueError(
            f"Argument `{name}` must be an integer > 0. "
            f"Received: {name}={value!r}"
        )
    return int(value)


@kprune_export("kprune.oneshot")
def oneshot(
    model: keras.Model,
    calibration_data=None,
    sparsity: float = 0.5,
    method: str = "sparsegpt",
    sparsity_m_by_n: tuple | None = None,
    layers=None,
    batch_size: int = 32,
    blocksize: int = 128,
    hessian_damping: float = 0.01,
    verbose: int = 1,
) -> keras.Model:
    """Prunes a trained model in one shot, from a little calibration data.

    Each `Dense`, `EinsumDense` and `Conv1D`/`Conv2D`/`Conv3D` layer
    (those inside attention layers, keras-hub blocks and nested models
    included) is pruned once, in the order the model calls them: the model
    is run on the calibration data with the layers before already pruned,
    the layer's inputs are collected, the layer is pruned, and the next
    one follows. The model is pruned in place, keeps its class, and is
    returned: a plain Keras model whose pruned weights are exact zeros.

    When the model's layers lie in a chain of blocks (the
    `sequential_blocks` of `model.get_quantization_layer_structure("gptq")`,
    which keras-hub's `CausalLM` and `MaskedLM` models define, or a
    `Sequential` model's layers), the model runs once per calibration
    batch up to the first block, then each block runs alone on its inputs
    kept from the block before: the time grows linearly with the number of
    blocks, and one block's inputs are kept. Otherwise, each group of
    layers is calibrated by running the model from its input, stopped after
    the group: the time grows with the square of the depth. Both give the
    same weights.

    Each layer keeps exactly `kept_count(size, sparsity)` weights (the
    count `kprune.ConstantSparsity` keeps), or has exactly `m` zeros in
    every `n` consecutive input channels of each output unit for N:M. A
    SparseGPT layer whose inputs are always zero on the calibration data
    may have more zeros: the weights of those inputs are set to zero.

    Methods:

    - `"sparsegpt"`: the kept weights are updated to reconstruct the
      layer's outputs on the calibration data (Frantar & Alistarh, 2023).
      The mask is chosen per block of `blocksize` input columns.
    - `"wanda"`: zeros the weights of lowest `|W_ij| * ||X_j||_2` within
      each output unit (Sun et al., 2023); no weight update.
    - `"magnitude"`: zeros the weights of lowest magnitude in each layer;
      needs no calibration data.

    A convolution is pruned as the matrix from its receptive field
    (kernel positions x input channels) to its filters, its inputs
    unfolded into one row per output position. Other layers (embeddings,
    depthwise, separable, transposed and grouped convolutions) stay dense.

    Under a Keras distribution (JAX `keras.distribution.ModelParallel`,
    weights sharded over devices), the math runs in `keras.ops` on the
    sharded kernels, in float32, and no kernel is gathered on one device;
    call it with the distribution set.

    Args:
        model: A Keras model: Sequential, functional or subclassed (one
            that is not built is built on the first calibration batch).
        calibration_data: The model's inputs for a few hundred samples: an
            array, a dict or list of arrays (split into batches of
            `batch_size`), or an iterable of batches (`tf.data.Dataset`,
            `keras.utils.PyDataset`, a list of batches); batches that are
            `(x, y)` tuples give their `x`. Optional for `"magnitude"`.
        sparsity: Fraction of each layer's weights set to zero, in
            `[0, 1)`, or a dict of layer name to sparsity: the named layers
            are pruned, each to its own sparsity, the others stay dense.
            Ignored when `sparsity_m_by_n` is set.
        method: `"sparsegpt"`, `"wanda"` or `"magnitude"`.
        sparsity_m_by_n: `None`, or `(m, n)` such as `(2, 4)`: `m` zeros in
            every `n` consecutive input channels of each output unit (the
            pattern `kprune.prune_low_magnitude` prunes to). `n` must divide
            each pruned layer's input channels (for `EinsumDense`, its
            innermost contracted axis).
        layers: Which layers to prune: a list of layer names, layer
            classes, layers, or functions of a layer returning a bool.
            `None` (default): every layer that one-shot pruning covers.
        batch_size: Batch size for array `calibration_data`.
        blocksize: SparseGPT: the unstructured mask is chosen per block of
            `blocksize` input columns, whose updates are applied together.
            With `sparsity_m_by_n`, it is rounded to a multiple of `n`,
            which does not change the result.
        hessian_damping: SparseGPT: `hessian_damping * mean(diag(H))` is
            added to the Hessian's diagonal.
        verbose: 0 for silence, 1 for a progress bar of the blocks done
            (of the layers done for a model without blocks), with the time
            left.

    Returns:
        `model`, pruned.

    Raises:
        ValueError: If an argument is invalid, the calibration data does
            not fit the model, `n` of `sparsity_m_by_n` does not divide a
            layer's input channels, or the model has no layer to prune. The
            model is left unchanged then, and if pruning fails half-way.

    Example:

    ```python
    model = kprune.oneshot.oneshot(
        model, x_train[:256], sparsity=0.5, method="sparsegpt"
    )
    # Or 2:4 with Wanda:
    model = kprune.oneshot.oneshot(
        model, x_train[:256], method="wanda", sparsity_m_by_n=(2, 4)
    )
    ```
    """
    require_model(model)
    if method not in _METHODS:
        raise ValueError(
            f"Argument `method` must be one of {sorted(_METHODS)}. "
            f"Received: method={method!r}"
        )
    if isinstance(sparsity, dict):
        if layers is not None:
            raise ValueError(
                "Pass per-layer sparsities either as a `sparsity` dict or "
                "choose layers with `layers`, not both. Received both."
            )
        if not all(isinstance(name, str) for name in sparsity):
            raise ValueError(
                "A `sparsity` dict maps layer names to sparsities. "
                f"Received keys: {list(sparsity)}"
            )
        sparsities = {n: _check_sparsity(s) for n, s in sparsity.items()}
        layers = list(sparsities)
    else:
        sparsities = None
        sparsity = _check_sparsity(sparsity)
    _, _, m_by_n = validate_pruning_args((1, 1), "AVG", sparsity_m_by_n)
    batch_size = _check_positive_int("batch_size", batch_size)
    blocksize = _check_positive_int("blocksize", blocksize)
    if (
        isinstance(hessian_damping, bool)
        or not isinstance(hessian_damping, (int, float, np.number))
        or not 0.0 <= hessian_damping < math.inf
    ):
        raise ValueError(
            "Argument `hessian_damping` must be a number >= 0. "
            f"Received: hessian_damping={hessian_damping!r}"
        )
    if m_by_n is not None:
        # N:M groups must not straddle blocks. The blocks change only when
        # the updates are applied, not the result, so any multiple of n
        # does.
        blocksize = max(blocksize // m_by_n[1], 1) * m_by_n[1]
    algorithm = _METHODS[method]
    batches = None
    if algorithm.needs_data or calibration_data is not None:
        if calibration_data is None:
            raise ValueError(
                f"Argument `calibration_data` is required for "
                f"method={method!r}: pass the model's inputs for a few "
                "hundred samples."
            )
        batches = _checked_batches(model, calibration_data, batch_size)
    linears, skipped = _select(model, layers)
    if not linears:
        reasons = "".join(
            f" Layer {name!r} is left out: {why}." for name, why in skipped
        )
        raise ValueError(
            f"Model {model.name!r} has no layer that one-shot pruning "
            "covers (Dense, EinsumDense, Conv1D/2D/3D)"
            + ("" if layers is None else " among those chosen in `layers`")
            + "."
            + reasons
        )
    if skipped:
        warnings.warn(
            "These layers are left dense: "
            + "; ".join(f"{name!r}: {why}" for name, why in skipped)
            + ".",
            stacklevel=2,
        )
    if m_by_n is not None:
        bad = [
            f"{x.layer.name} ({x.channels})"
            for x in linears
            if x.channels % m_by_n[1]
        ]
        if bad:
            raise ValueError(
                f"Argument `sparsity_m_by_n` groups n={m_by_n[1]} "
                "consecutive input channels, so n must divide each layer's "
                "input channels (its innermost input axis). It does not "
                f"for these layers (input channels): {bad}. Leave them out "
                "with `layers=`."
            )
    calls = chain = None
    if batches is not None:
        # Magnitude pruning runs no forward pass: blocks are of no use.
        blocks = _candidate_blocks(model) if algorithm.needs_data else ()
        groups, calls, chain = _call_order(model, linears, batches[0], blocks)
    if batches is None:
        groups = [[linear] for linear in linears]

    # Under a Keras distribution (weights sharded over devices), the math
    # runs where the weights are.
    on_device = keras.distribution.distribution() is not None

    def prune(linear, statistics, matrix):
        layer_sparsity = (
            sparsity if sparsities is None else sparsities[linear.layer.name]
        )
        if on_device:
            return statistics.prune_tensor(
                matrix,
                layer_sparsity,
                m_by_n,
                blocksize=blocksize,
                damping=float(hessian_damping),
            )
        return statistics.prune(
            matrix.T,
            layer_sparsity,
            m_by_n,
            blocksize=blocksize,
            damping=float(hessian_damping),
        ).T

    _sequential(
        model,
        groups,
        algorithm,
        batches,
        calls,
        prune,
        verbose,
        chain=chain,
        on_device=on_device,
    )
    return model


def _sequential(
    model,
    groups,
    algorithm,
    batches,
    calls,
    transform,
    verbose,
    chain=None,
    on_device=False,
):
    """Replaces each layer's matrix by `transform(linear, statistics,
    matrix)`, group after group in call order, each group calibrated on
    the outputs of the groups already transformed. If anything fails, every
    layer transformed so far gets its matrix back before the error is
    raised. The matrix is `(in, out)`: a float64 NumPy copy on the host, or
    with `on_device` a float32 tensor where the kernel lives.

    With a `chain` (from `_call_order`), the groups inside its blocks are
    calibrated by running only their block, on its inputs kept from the
    block before (`_by_blocks`); otherwise each group is calibrated by
    running the model from its input on every batch, up to the group."""
    read, write = (
        (_Linear.tensor, _Linear.assign_tensor)
        if on_device
        else (_Linear.matrix, _Linear.assign)
    )
    originals = []

    def calibrate(run, group, items):
        """Collects `group`'s statistics from `run(item)` for each item
        (a forward pass), then transforms its layers."""
        statistics = {}
        for linear in group:
            if linear.signature not in statistics:
                statistics[linear.signature] = algorithm(linear.in_features)
        if algorithm.needs_data:
            _collect(run, group, statistics, items, calls)
        for linear in group:
            matrix = read(linear)
            originals.append((linear, matrix))
            write(
                linear,
                transform(linear, statistics[linear.signature], matrix),
            )

    def whole(batch):
        model(batch, training=False)

    try:
        if chain is not None and algorithm.needs_data:
            _by_blocks(model, chain, groups, batches, calibrate, whole, verbose)
            return
        progress = keras.utils.Progbar(
            sum(len(group) for group in groups),
            verbose=verbose,
            unit_name="layer",
        )
        done = 0
        for group in groups:
            calibrate(whole, group, batches)
            done += len(group)
            progress.update(done)
    except BaseException:
        for linear, matrix in originals:
            write(linear, matrix)
        raise


def _by_blocks(model, chain, groups, batches, calibrate, whole, verbose):
    """`_sequential`'s loop for a model whose groups lie in a chain of
    blocks (`_call_order`): the model runs once per batch up to the first
    block that holds a group, and its inputs are kept; then, block after
    block, each group of the block is calibrated by running the block
    alone on the kept inputs (stopping once the group has been called),
    and the transformed block is run on them to give the next block's
    inputs, which replace them. Only one block's inputs (and the other
    arguments every block takes, such as padding masks) are kept. Groups
    before or after the blocks are calibrated with `whole`, the model
    from its input."""
    blocks, owners = chain
    inside = [i for i, owner in enumerate(owners) if owner is not None]
    for group in groups[: inside[0]]:
        calibrate(whole, group, batches)
    first, last = owners[inside[0]], owners[inside[-1]]
    hidden, others = [], []
    for args, kwargs in _block_inputs(model, blocks[first], batches):
        hidden.append(_detached(args[0]))
        others.append((args[1:], kwargs))
    by_block = {}
    for group, owner in zip(groups, owners):
        if owner is not None:
            by_block.setdefault(owner, []).append(group)
    progress = keras.utils.Progbar(
        len(by_block), verbose=verbose, unit_name="block"
    )
    progress.update(0)
    for index in range(first, last + 1):
        block = blocks[index]

        def run(item, block=block):
            args, kwargs = others[item]
            return block(hidden[item], *args, **kwargs)

        for group in by_block.get(index, []):
            calibrate(run, group, range(len(batches)))
        if index < last:
            for item in range(len(batches)):
                hidden[item] = _detached(run(item))
        if index in by_block:
            progress.update(sorted(by_block).index(index) + 1)
    hidden.clear()
    for group in groups[inside[-1] + 1 :]:
        calibrate(whole, group, batches)


def _detached(value):
    """`value` cut from the autograd graph that made it (on torch, kept
    activations would otherwise hold those of every block before)."""
    return keras.tree.map_structure(
        lambda x: ops.stop_gradient(x) if ops.is_tensor(x) else x, value
    )


def _block_inputs(model, block, batches):
    """The `(args, kwargs)` that `block`'s `call` gets when the model runs
    on each batch; each forward pass stops there."""
    inputs = []

    def wrap(_, original):
        def call(*args, **kwargs):
            inputs.append((args, kwargs))
            raise _Captured()

        return call

    with _Hooks([(block, block)], wrap):
        for index, batch in enumerate(batches):
            try:
                model(batch, training=False)
            except _Captured:
                pass
            if len(inputs) != index + 1:
                raise ValueError(
                    f"Model {model.name!r} calls layer {block.name!r} on "
                    "the first calibration batch but not on batch "
                    f"{index}. Pass calibration batches the model runs "
                    "the same way."
                )
    return inputs


def _collect(run, group, statistics, items, calls):
    """Runs `run(item)` (a forward pass) for each item and feeds the
    inputs of `group`'s layers to `statistics[layer's signature]
    .add_batch`. The layers of a group of several share one input tensor,
    so each signature's rows are added once per pass, and the pass stops
    once every layer has been called; a lone layer may be called several
    times, on different inputs, and takes them all."""
    once = all(calls[id(linear)] == 1 for linear in group)
    seen = []

    def record(linear, inputs):
        if len(group) == 1 or all(
            x.signature != linear.signature for x in seen
        ):
            statistics[linear.signature].add_batch(linear.rows(inputs))
        seen.append(linear)
        if once and len(seen) == len(group):
            raise _Captured()

    with _input_hooks(group, record):
        for item in items:
            seen.clear()
            try:
                run(item)
            except _Captured:
                pass


class _MaskedGPTQ(_SparseGPT):
    """GPTQ (Frantar et al., 2023) that keeps every zero weight at zero.

    GPTQ quantizes the columns one after the other and spreads each
    column's quantization error over the columns not yet quantized, which
    moves zero weights away from zero. Here a weight that is zero before
    quantizing is quantized to the zero point (so it dequantizes to exactly
    0) whatever the updates made of it, and its own error is spread like
    any other: SparseGPT's joint sparsification and quantization with the
    mask fixed.
    """

    def quantize(
        self, weights, bits, group_size, symmetric, blocksize, damping
    ):
        """`weights`: `(out, in)` float64. Returns the dequantized weights
        and Keras's GPTQ encoding of them: integer levels `(out, in)`,
        scales and zero points `(out, groups)`."""
        weights = weights.copy()
        zero_weights = weights == 0
        inverse = self._inverse_cholesky(weights, damping)
        rows, columns = weights.shape
        group = columns if group_size == -1 else group_size
        maxq = 2**bits - 1
        levels = np.zeros(weights.shape, np.int64)
        scales, zeros = [], []
        for start in range(0, columns, blocksize):
            end = min(start + blocksize, columns)
            block = weights[:, start:end].copy()
            errors = np.zeros_like(block)
            block_inverse = inverse[start:end, start:end]
            for i in range(end - start):
                column = start + i
                if column % group == 0:
                    # Parameters of the group as updated so far, its zeros
                    # kept in: the range holds 0 exactly (as in GPTQ's
                    # reference code), so zero weights have a level.
                    stop = min(column + group, columns)
                    later = max(stop, end)
                    pending = (
                        errors[:, :i] @ inverse[start : start + i, end:later]
                    )
                    current = np.concatenate(
                        [block[:, i:], weights[:, end:later] - pending], axis=1
                    )[:, : stop - column]
                    current = np.where(
                        zero_weights[:, column:stop], 0.0, current
                    )
                    scale, zero = _quantization_parameters(
                        current, maxq, symmetric
                    )
                    scales.append(scale)
                    zeros.append(zero)
                level = np.clip(np.round(block[:, i] / scale + zero), 0, maxq)
                level = np.where(zero_weights[:, column], zero, level)
                levels[:, column] = level
                dequantized = scale * (level - zero)
                error = (block[:, i] - dequantized) / block_inverse[i, i]
                block[:, i:] -= np.outer(error, block_inverse[i, i:])
                block[:, i] = dequantized
                errors[:, i] = error
            weights[:, start:end] = block
            weights[:, end:] -= errors @ inverse[start:end, end:]
        return (
            weights,
            levels,
            np.stack(scales, axis=1),
            np.stack(zeros, axis=1),
        )


def _quantization_parameters(weights, maxq, symmetric):
    """Per row of `weights`: the scale (a float32 value) and the integer
    zero point of `maxq + 1` levels spanning `[min(w, 0), max(w, 0)]`, as
    Keras's `compute_quantization_parameters` computes them for a range
    that holds 0."""
    low = np.minimum(weights.min(axis=1), 0.0)
    high = np.maximum(weights.max(axis=1), 0.0)
    if symmetric:
        high = np.maximum(-low, high)
        low = np.where(low < 0, -high, low)
    empty = low == high
    low = np.where(empty, low - 1, low)
    high = np.where(empty, high + 1, high)
    scale = ((high - low) / maxq).astype(np.float32).astype(np.float64)
    scale = np.where(scale <= 0, 1e-8, scale)
    if symmetric:
        zero = np.full(scale.shape, (maxq + 1) // 2, np.float64)
    else:
        zero = np.clip(np.round(-low / scale), 0, maxq)
    return scale, zero


def _gptq_layout(linear):
    """`None` if Keras's GPTQ stores `linear`'s kernel as the matrix kprune
    calibrates, else why not. Keras reshapes a 3-D `EinsumDense` kernel to
    `(rows, columns)` by where its largest axis is; kprune needs that split
    to be the layer's own input/output split."""
    layer = linear.layer
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        return "Keras's GPTQ quantizes Dense and EinsumDense layers only"
    shape = list(layer.kernel.shape)
    if isinstance(layer, keras.layers.Dense) or len(shape) == 2:
        rows = 1
    elif len(shape) == 3:
        rows = 1 if shape.index(max(shape)) == 0 else 2
    else:
        return f"Keras's GPTQ does not quantize {len(shape)}-D kernels"
    if linear.permutation != tuple(range(len(shape))) or (
        math.prod(shape[:rows]) != linear.in_features
    ):
        return (
            "Keras's GPTQ would read its kernel of shape "
            f"{tuple(shape)} with other input axes than its equation"
        )
    return None


@kprune_export("kprune.oneshot")
def quantize_gptq(
    model: keras.Model,
    calibration_data,
    config: keras.quantizers.GPTQConfig | None = None,
    layers=None,
    batch_size: int = 32,
    blocksize: int = 128,
    verbose: int = 1,
) -> keras.Model:
    """Quantizes a (pruned) model with GPTQ, keeping its zeros exactly.

    The result is what `model.quantize("gptq", config=config)` gives: each
    `Dense` and `EinsumDense` layer in Keras's GPTQ mode, its kernel
    stored as `config.weight_bits`-bit levels (4-bit ones packed two per
    byte) with a scale and zero point per group of `config.group_size`
    inputs. Two differences:

    - Every weight that is zero before quantizing dequantizes to exactly
      zero (Keras's GPTQ spreads each column's error over the columns
      after it, zeros included, so some zeros of a pruned model become
      small nonzero weights). This is SparseGPT's joint 50% + 4-bit
      recipe: prune with `kprune.oneshot.oneshot`, then call this.
    - The calibration data are the model's own inputs, as for
      `kprune.oneshot.oneshot` (any model and input type, no tokenizer),
      and the layers are calibrated one after the other, in call order,
      each on the outputs of the layers before it already quantized,
      block by block as in `kprune.oneshot.oneshot` when the model's
      layers lie in a chain of blocks.

    Per layer this is GPTQ (Frantar et al., 2023) with the upper Cholesky
    factor of the dampened inverse Hessian, blocks of `blocksize` columns,
    a group's scale and zero point computed from its weights as updated
    when the group is reached, over a range that holds 0 (as in the GPTQ
    authors' code), and zero weights quantized to the zero point.

    Args:
        model: A built Keras model (a pruned one, typically).
        calibration_data: The model's inputs for a few hundred samples, as
            for `kprune.oneshot.oneshot`.
        config: A `keras.quantizers.GPTQConfig`; its `weight_bits`,
            `group_size`, `symmetric` and `hessian_damping` are used, and
            the `sequential_blocks` of its `quantization_layer_structure`
            (if set, else the model's own) are the blocks run one after
            the other; its `dataset`, `tokenizer`, `num_samples` and
            `sequence_length` are not used (pass `None` for them).
            `per_channel=False` and `activation_order=True` are not
            supported. Default: `GPTQConfig(None, None)` (4 bits, groups
            of 128, asymmetric).
        layers: Which layers to quantize, as in `kprune.oneshot.oneshot`.
            `None` (default): every `Dense` and `EinsumDense` layer Keras's
            GPTQ can quantize; others stay as they are, with a warning.
        batch_size: Batch size for array `calibration_data`.
        blocksize: Columns whose updates are applied together (this
            changes the speed, not the result).
        verbose: 0 for silence, 1 for a progress bar of the blocks (or
            layers) done, with the time left.

    Returns:
        `model`, quantized in place.

    Raises:
        ValueError: If an argument is invalid, the calibration data do not
            fit the model, or the model has no layer to quantize. The model
            is left unchanged then.

    Example:

    ```python
    model = kprune.oneshot.oneshot(model, x_calibration, sparsity=0.5)
    model = kprune.oneshot.quantize_gptq(
        model,
        x_calibration,
        keras.quantizers.GPTQConfig(None, None, weight_bits=4, group_size=64),
    )
    ```
    """
    require_model(model)
    if config is None:
        config = keras.quantizers.GPTQConfig(dataset=None, tokenizer=None)
    if not isinstance(config, keras.quantizers.GPTQConfig):
        raise ValueError(
            "Argument `config` must be a `keras.quantizers.GPTQConfig`. "
            f"Received: config={config!r}"
        )
    if not config.per_channel or config.activation_order:
        raise ValueError(
            "`kprune.oneshot.quantize_gptq` supports "
            "`GPTQConfig(per_channel=True, activation_order=False)` only. "
            f"Received: per_channel={config.per_channel}, "
            f"activation_order={config.activation_order}"
        )
    batch_size = _check_positive_int("batch_size", batch_size)
    blocksize = _check_positive_int("blocksize", blocksize)
    if calibration_data is None:
        raise ValueError(
            "Argument `calibration_data` is required: pass the model's "
            "inputs for a few hundred samples."
        )
    batches = _checked_batches(model, calibration_data, batch_size)
    linears, skipped = _select(model, layers)
    chosen = []
    for linear in linears:
        why = _gptq_layout(linear)
        if why is None:
            chosen.append(linear)
        elif layers is None:
            skipped.append((linear.layer.name, why))
        else:
            raise ValueError(
                f"Layer {linear.layer.name!r} was chosen in `layers` but "
                f"cannot be quantized with GPTQ: {why}. Leave it out of "
                "`layers`."
            )
    if not chosen:
        raise ValueError(
            f"Model {model.name!r} has no layer that GPTQ quantizes "
            "(Dense, EinsumDense)."
            + "".join(f" Layer {n!r} is left out: {w}." for n, w in skipped)
        )
    if skipped:
        warnings.warn(
            "These layers are not quantized: "
            + "; ".join(f"{name!r}: {why}" for name, why in skipped)
            + ".",
            stacklevel=2,
        )
    groups, calls, chain = _call_order(
        model,
        chosen,
        batches[0],
        _candidate_blocks(model, config.quantization_layer_structure),
    )
    encodings = {}

    def quantize(linear, statistics, matrix):
        weights, *encodings[id(linear)] = statistics.quantize(
            matrix.T,
            config.weight_bits,
            config.group_size,
            config.symmetric,
            blocksize,
            float(config.hessian_damping),
        )
        return weights.T

    _sequential(
        model,
        groups,
        _MaskedGPTQ,
        batches,
        calls,
        quantize,
        verbose,
        chain=chain,
    )
    for group in groups:
        for linear in group:
            levels, scales, zeros = encodings[id(linear)]
            columns = levels.shape[1]
            group_size = (
                columns if config.group_size == -1 else config.group_size
            )
            levels = ops.convert_to_tensor(levels.astype(np.uint8))
            if config.weight_bits == 4:
                levels, _, _ = keras.quantizers.pack_int4(
                    levels, axis=0, dtype="uint8"
                )
            _keras_internals.set_gptq_encoding(
                linear.layer,
                config,
                levels,
                scales.astype(np.float32),
                zeros.astype(np.uint8),
                (np.arange(columns) // group_size).astype(np.float32),
            )
    _keras_internals.after_quantize(model)
    return model
