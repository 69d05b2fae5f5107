"""A compact file format for sparse models: `save_compact`, `load_compact`.

A stripped model saved by Keras stores every zero of its sparse weights:
the file is as large as the dense model's until it is zipped. This format
stores each sparse tensor as its nonzero values plus a bitmask of their
positions, both compressed, so the file is close to the information in the
weights.

Layout (HDF5 written with h5py, format version 1):

- Root attributes: `kprune_format` = "compact", `kprune_format_version`,
  `keras_version`, `quantize` ("none" or "int8").
- `model_config`: the model's JSON config, so that `load_compact` can
  rebuild the model; absent for models without a config.
- `index`: a JSON list with one entry per entry of `model.weights`, in
  order: `path`, `shape`, `dtype`, `encoding`, `crc32` (of the restored
  array's bytes, checked on load) and where its parts lie: `values`
  (`[dtype name, offset, count]` in dataset `values/<dtype name>`), `mask`
  (`[offset, bytes]` in `masks`) and `scales` (`[offset, count]` in
  `scales`). `model_config` and `index` are gzip-compressed UTF-8 bytes.
- `masks` (uint8), `values/float32`, `values/int8`, ... and `scales`
  (float32): the parts of all tensors, concatenated, gzip level 9, values
  byte-shuffled first. Few datasets keep HDF5's metadata small.

Encodings:

- `"dense"`: the tensor's values in C order, as they are.
- `"sparse"`: one "value stored" bit per entry, packed 8 per byte with
  `np.packbits`, and the stored values. Both list entries channel by
  channel: in the C order of `np.moveaxis(w, -1, 0)` for tensors of rank
  >= 2 (so runs of pruned input features are contiguous and compress
  better), in C order otherwise. Float tensors with zeros use it; values
  are kept bit for bit (an entry is stored when its bit pattern is not all
  zero, so -0.0 survives).
- `"int8"`: like "sparse", but the values are int8 codes `q`, with one
  float32 scale per index of the last axis (the output channels of Dense
  and convolution kernels): `scale = max|w| / 127` over that channel and
  `q = round(w / scale)`, so the restored `q * scale` is within
  `scale / 2` of `w` (up to float32 rounding). Entries whose code is 0 are
  not stored.
"""

import gzip
import json
import os
import secrets
import zlib

import h5py
import keras
import numpy as np

from kprune.api_export import kprune_export
from kprune.wrapper import collect_pruned_layers
from kprune.wrapper import require_model

FORMAT_NAME = "compact"
FORMAT_VERSION = 1
QUANTIZE_OPTIONS = (None, "int8")

# One chunk holds up to this many elements: large enough that gzip sees
# long runs, small enough to stay far below HDF5's 4 GiB chunk limit.
_MAX_CHUNK = 1 << 22


def _chunks(size):
    return (max(1, min(size, _MAX_CHUNK)),)


def _crc32(array):
    return zlib.crc32(np.ascontiguousarray(array).tobytes()) & 0xFFFFFFFF


def _is_float(array):
    return np.issubdtype(array.dtype, np.floating)


def _stored_positions(array):
    """True where a float's bit pattern is not all zero (keeps -0.0)."""
    bits = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
    return bits != 0


def quantize_int8(array):
    """Per-channel symmetric int8 codes of a float array.

    Args:
        array: A float NumPy array of rank >= 1.

    Returns:
        `(codes, scales)`: int8 codes of `array`'s shape and float32 scales,
        one per index of the last axis, with
        `|array - codes * scales| <= scales / 2` up to float32 rounding.
    """
    values = np.asarray(array, np.float32)
    reduce_axes = tuple(range(values.ndim - 1))
    peak = np.max(np.abs(values), axis=reduce_axes) if values.size else 0
    scales = np.asarray(peak, np.float32) / np.float32(127)
    # An all-zero channel gets scale 1 (its codes are all 0 anyway).
    scales = np.where(scales > 0, scales, np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(values / scales), -127, 127).astype(np.int8)
    return codes, scales


def dequantize_int8(codes, scales, dtype="float32"):
    """Float values of int8 codes: `codes * scales` along the last axis."""
    values = codes.astype(np.float32) * np.asarray(scales, np.float32)
    return values.astype(dtype)


def _channel_major(array):
    """`array` with its last axis first (rank >= 2), the order of storage."""
    return np.moveaxis(array, -1, 0) if array.ndim >= 2 else array


def _from_channel_major(flat, shape):
    if len(shape) < 2:
        return flat.reshape(shape)
    stored = flat.reshape((shape[-1], *shape[:-1]))
    return np.ascontiguousarray(np.moveaxis(stored, 0, -1))


def _compressed(group, name, data, shuffle=False):
    data = np.ascontiguousarray(data)
    if not data.size:
        return group.create_dataset(name, data=data)
    return group.create_dataset(
        name,
        data=data,
        chunks=_chunks(data.size),
        shuffle=shuffle and data.dtype.itemsize > 1,
        compression="gzip",
        compression_opts=9,
    )


class _Packer:
    """Concatenates every tensor's parts into a few datasets: one HDF5
    dataset costs about 0.5 KB of metadata, and one gzip stream per kind of
    data compresses better than many short ones."""

    def __init__(self):
        self.masks = []
        self.mask_bytes = 0
        self.values = {}
        self.scales = []
        self.scale_count = 0
        self.index = []

    def _add_values(self, values):
        name = values.dtype.name
        parts, count = self.values.get(name, ([], 0))
        parts.append(values.ravel())
        self.values[name] = (parts, count + values.size)
        return [name, count, int(values.size)]

    def _add_mask(self, mask):
        packed = np.packbits(mask.ravel())
        self.masks.append(packed)
        self.mask_bytes += packed.size
        return [self.mask_bytes - packed.size, int(packed.size)]

    def add(self, path, array, quantize):
        entry = {
            "path": path,
            "shape": [int(d) for d in array.shape],
            "dtype": array.dtype.str,
        }
        if quantize == "int8" and _is_float(array) and array.ndim >= 2:
            codes, scales = quantize_int8(array)
            entry["encoding"] = "int8"
            entry["crc32"] = _crc32(dequantize_int8(codes, scales, array.dtype))
            codes = _channel_major(codes)
            mask = codes != 0
            entry["mask"] = self._add_mask(mask)
            entry["values"] = self._add_values(codes[mask])
            entry["scales"] = [self.scale_count, int(scales.size)]
            self.scales.append(scales)
            self.scale_count += scales.size
        else:
            entry["crc32"] = _crc32(array)
            ordered = _channel_major(array)
            mask = _stored_positions(ordered) if _is_float(array) else None
            if mask is not None and array.size and not mask.all():
                entry["encoding"] = "sparse"
                entry["mask"] = self._add_mask(mask)
                entry["values"] = self._add_values(ordered[mask])
            else:
                entry["encoding"] = "dense"
                entry["values"] = self._add_values(np.ascontiguousarray(array))
        self.index.append(entry)

    def write(self, f):
        _compressed(f, "index", _gzip_bytes(json.dumps(self.index)))
        _compressed(
            f, "masks", np.concatenate([np.zeros(0, np.uint8)] + self.masks)
        )
        group = f.create_group("values")
        for name, (parts, _) in self.values.items():
            _compressed(group, name, np.concatenate(parts), shuffle=True)
        _compressed(
            f, "scales", np.concatenate([np.zeros(0, np.float32)] + self.scales)
        )


def _gzip_bytes(text):
    return np.frombuffer(gzip.compress(text.encode("utf-8"), 9), np.uint8)


def _model_weights(model):
    """`(path, NumPy array)` of each entry of `model.weights`."""
    return [
        (w.path, np.asarray(keras.ops.convert_to_numpy(w)))
        for w in model.weights
    ]


def _model_json(model):
    try:
        return model.to_json()
    except Exception:  # subclassed models without `get_config`
        return None


def _check_quantize(quantize):
    if quantize not in QUANTIZE_OPTIONS:
        raise ValueError(
            'Argument `quantize` must be None or "int8". '
            f"Received: quantize={quantize!r}"
        )


def _plain_model(model):
    """The model to store: pruned models are stripped first."""
    require_model(model)
    if collect_pruned_layers(model):
        from kprune.prune import strip_pruning

        return strip_pruning(model)
    return model


def _new_temp_file(directory):
    """Creates an empty file in `directory` with the permissions of any new
    file (0o666 less the umask; `tempfile.mkstemp` would give 0o600)."""
    while True:
        path = os.path.join(directory, f".kprune-{secrets.token_hex(8)}.h5.tmp")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path


@kprune_export("kprune.compression")
def save_compact(model, filepath, quantize: str | None = None) -> None:
    """Saves a model's weights in kprune's compact sparse format (HDF5).

    Each weight tensor with zeros is stored as its nonzero values plus a
    compressed bitmask of their positions; the others are stored as they
    are. Pruned models (with `PruneLowMagnitude` wrappers) are stripped
    first, so the file always holds the plain architecture. The model's
    config is stored too, so `kprune.compression.load_compact(filepath)` can
    rebuild it. The file is written next to `filepath` and moved into place
    at the end, so a failed save leaves any existing file untouched.

    Args:
        model: A Keras model, pruned or stripped.
        filepath: Path of the `.h5` file to write.
        quantize: `None` to store values exactly, or `"int8"` to store the
            values of float weights of rank >= 2 (kernels, embeddings) as
            per-channel symmetric int8: one float32
            `scale = max|w| / 127` per index of the last axis, and codes
            `q = round(w / scale)`. Restored weights `q * scale` are then
            within `scale / 2` of the originals; biases and other rank-1
            weights stay exact.

    Raises:
        ValueError: If `model` is not a Keras model or `quantize` is not
            `None` or `"int8"`.

    Example:

    ```python
    kprune.compression.save_compact(pruned_model, "model.h5")
    model = kprune.compression.load_compact("model.h5")
    ```
    """
    _check_quantize(quantize)
    model = _plain_model(model)
    packer = _Packer()
    for path, array in _model_weights(model):
        packer.add(path, array, quantize)
    config = _model_json(model)
    filepath = os.fspath(filepath)
    directory = os.path.dirname(os.path.abspath(filepath))
    temp_path = _new_temp_file(directory)
    try:
        # HDF5 1.10 metadata is a few times smaller than the default
        # (1.8-compatible) layout's.
        with h5py.File(temp_path, "w", libver="v110") as f:
            # Fixed-length strings: variable-length ones would take a 4 KB
            # global heap.
            f.attrs["kprune_format"] = np.bytes_(FORMAT_NAME)
            f.attrs["kprune_format_version"] = FORMAT_VERSION
            f.attrs["keras_version"] = np.bytes_(keras.__version__)
            f.attrs["quantize"] = np.bytes_(quantize or "none")
            if config is not None:
                _compressed(f, "model_config", _gzip_bytes(config))
            packer.write(f)
        os.replace(temp_path, filepath)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def _not_compact_error(filepath, detail):
    return ValueError(
        f"File {filepath!r} is not in kprune's compact format: {detail}. "
        "Write such files with "
        "`kprune.compression.save_compact(model, filepath)`; "
        "load Keras weight files with `model.load_weights(filepath)`."
    )


def _corrupt_error(filepath, detail):
    return ValueError(
        f"File {filepath!r} is damaged (truncated or modified after "
        f"writing): {detail}. Write it again with "
        "`kprune.compression.save_compact`. "
        "No model was changed."
    )


def _slice(data, span, what, path, filepath):
    offset, count = (int(v) for v in span)
    if offset < 0 or count < 0 or offset + count > data.size:
        raise _corrupt_error(
            filepath, f"the {what} of weight {path!r} lie outside the file"
        )
    return data[offset : offset + count]


def _read_weight(entry, masks, values, scales, filepath):
    path = entry["path"]
    shape = tuple(int(d) for d in entry["shape"])
    dtype = np.dtype(entry["dtype"])
    encoding = entry["encoding"]
    size = int(np.prod(shape))
    name, offset, count = entry["values"]
    if name not in values:
        raise _corrupt_error(filepath, f"no values of dtype {name!r}")
    stored = _slice(values[name], (offset, count), "values", path, filepath)
    if encoding == "dense":
        if count != size:
            raise _corrupt_error(
                filepath, f"weight {path!r} has {count} values, not {size}"
            )
        array = stored
    elif encoding in ("sparse", "int8"):
        packed = _slice(masks, entry["mask"], "mask", path, filepath)
        if packed.size != (size + 7) // 8:
            raise _corrupt_error(
                filepath, f"the mask of weight {path!r} has the wrong length"
            )
        mask = np.unpackbits(packed, count=size).astype(bool)
        if int(mask.sum()) != stored.size:
            raise _corrupt_error(
                filepath,
                f"weight {path!r} has {int(mask.sum())} positions but "
                f"{stored.size} values",
            )
        flat = np.zeros(size, stored.dtype)
        flat[mask] = stored
        array = _from_channel_major(flat, shape)
        if encoding == "int8":
            channel_scales = _slice(
                scales, entry["scales"], "scales", path, filepath
            )
            array = dequantize_int8(array, channel_scales, dtype)
    else:
        raise _corrupt_error(
            filepath, f"weight {path!r} has unknown encoding {encoding!r}"
        )
    array = np.asarray(array, dtype).reshape(shape)
    if _crc32(array) != int(entry["crc32"]):
        raise _corrupt_error(
            filepath, f"weight {path!r} fails its CRC-32 check"
        )
    return path, array


def _gunzip_json(dataset):
    return gzip.decompress(dataset[()].tobytes()).decode("utf-8")


def read_compact(filepath):
    """Reads and checks a compact file without touching any model.

    Args:
        filepath: Path of a file written by `kprune.compression.save_compact`.

    Returns:
        `(weights, config_json, attrs)`: a list of `(path, array)` in the
        order of `model.weights`, the model's JSON config (or `None`) and
        the file's root attributes as a dict.

    Raises:
        FileNotFoundError: If `filepath` does not exist.
        ValueError: If the file is not in the compact format or damaged.
    """
    filepath = os.fspath(filepath)
    if not os.path.exists(filepath):
        raise FileNotFoundError(f"No such file: {filepath!r}")
    try:
        f = h5py.File(filepath, "r")
    except OSError as error:
        if h5py.is_hdf5(filepath):
            raise _corrupt_error(filepath, str(error)) from None
        raise _not_compact_error(filepath, "it is not an HDF5 file") from None
    try:
        with f:
            attrs = {
                key: value.decode() if isinstance(value, bytes) else value
                for key, value in f.attrs.items()
            }
            if attrs.get("kprune_format") != FORMAT_NAME:
                raise _not_compact_error(
                    filepath, "it has no `kprune_format` attribute"
                )
            version = int(attrs.get("kprune_format_version", -1))
            if version != FORMAT_VERSION:
                raise ValueError(
                    f"File {filepath!r} uses version {version} of kprune's "
                    f"compact format; this kprune reads version "
                    f"{FORMAT_VERSION}. Upgrade kprune to read it."
                )
            config = None
            if "model_config" in f:
                config = _gunzip_json(f["model_config"])
            index = json.loads(_gunzip_json(f["index"]))
            masks = f["masks"][()]
            scales = f["scales"][()]
            values = {name: f["values"][name][()] for name in f["values"]}
            weights = [
                _read_weight(entry, masks, values, scales, filepath)
                for entry in index
            ]
    except (
        OSError,
        KeyError,
        TypeError,
        EOFError,
        zlib.error,
        json.JSONDecodeError,
    ) as error:
        raise _corrupt_error(
            filepath, f"{type(error).__name__}: {error}"
        ) from error
    return weights, config, attrs


def _check_architecture(model, weights, filepath):
    targets = model.weights
    hint = ""
    if collect_pruned_layers(model):
        hint = (
            " The model has pruning wrappers; load into the stripped "
            "architecture (`kprune.strip_pruning(model)`) instead."
        )
    if len(targets) != len(weights):
        raise ValueError(
            f"File {filepath!r} holds {len(weights)} weights but the model "
            f"has {len(targets)}: it was saved from a different "
            f"architecture. No weight was changed.{hint}"
        )
    for i, (variable, (path, array)) in enumerate(zip(targets, weights)):
        shape = tuple(variable.shape)
        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
        if shape != array.shape or dtype != array.dtype:
            raise ValueError(
                f"Weight {i} of file {filepath!r} ({path!r}) has shape "
                f"{array.shape} and dtype {array.dtype}, but the model's "
                f"weight {i} ({variable.path!r}) has shape {shape} and "
                f"dtype {dtype}: the file was saved from a different "
                f"architecture. No weight was changed.{hint}"
            )


@kprune_export("kprune.compression")
def load_compact(filepath, model=None):
    """Loads a file written by `kprune.compression.save_compact`.

    Everything is read, decompressed and checked (format, CRC-32 of each
    tensor, shapes against the model) before any weight is assigned, so a
    bad file raises and leaves `model` as it was. Float weights come back
    bit for bit; int8 ones within `scale / 2` of the saved values.

    Args:
        filepath: Path of the compact `.h5` file.
        model: Optional Keras model of the saved architecture to load the
            weights into. If `None`, the model is rebuilt from the config
            stored in the file.

    Returns:
        The model holding the loaded weights (`model` itself if given).

    Raises:
        FileNotFoundError: If `filepath` does not exist.
        ValueError: If the file is not in the compact format, is damaged
            or truncated, or does not match `model`'s weights.

    Example:

    ```python
    model = kprune.compression.load_compact("model.h5")
    ```
    """
    filepath = os.fspath(filepath)
    weights, config, _ = read_compact(filepath)
    if model is None:
        if config is None:
            raise ValueError(
                f"File {filepath!r} stores no model config (the model had "
                "none). Pass the model to load into: "
                "`kprune.compression.load_compact(filepath, model)`."
            )
        model = keras.models.model_from_json(config)
    _check_architecture(model, weights, filepath)
    model.set_weights([array for _, array in weights])
    return model
