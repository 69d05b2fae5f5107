"""Pruning schedules: when to prune and to which sparsity, per training step.

The step is the number of training batches seen so far, counted from 1 (the
first batch of training sees step 1), exactly as in
`tfmot.sparsity.keras`, so `begin_step`/`end_step` values carry over.
"""

import abc
import json
import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops

from kprune.api_export import kprune_export


def _plain(value):
    """`value` as a Python scalar when it is a NumPy scalar, a 0-d array or
    a 0-d tensor (NumPy steps such as `np.ceil(n / b).astype(np.int32)`);
    otherwise `value` itself."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) or ops.is_tensor(value):
        if tuple(value.shape) == ():
            return ops.convert_to_numpy(value).item()
    return value


def is_real_number(value) -> bool:
    """True for a real number in any form (Python, NumPy, 0-d array or
    tensor), bools excepted."""
    value = _plain(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integral_value(value):
    """`value` as a Python int if it is an integral number in any form
    (`10`, `np.int32(10)`, `10.0`, a 0-d array), else `None`."""
    value = _plain(value)
    if (
        not is_real_number(value)
        or not math.isfinite(value)
        or int(value) != value
    ):
        return None
    return int(value)


def _to_int(name: str, value, minimum=None) -> int:
    """Returns `value` as a Python int if it is an integral number, else
    raises."""
    plain = integral_value(value)
    if plain is None:
        raise ValueError(
            f"Argument `{name}` must be an integer. Received: {name}={value!r}"
        )
    if minimum is not None and plain < minimum:
        raise ValueError(
            f"Argument `{name}` must be >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    return plain


def _to_float(name: str, value) -> float:
    """Returns `value` as a Python float if it is a finite real number."""
    plain = _plain(value)
    if not is_real_number(plain) or not math.isfinite(plain):
        raise ValueError(
            f"Argument `{name}` must be a finite number. "
            f"Received: {name}={value!r}"
        )
    return float(plain)


def _unnest(config: dict) -> dict:
    """The arguments in `config`, also when it has tfmot's shape
    `{"class_name": ..., "config": {...}}`."""
    if (
        isinstance(config, dict)
        and set(config) == {"class_name", "config"}
        and isinstance(config["config"], dict)
    ):
        return config["config"]
    return config


@kprune_export("kprune")
class PruningSchedule(abc.ABC):
    """Base class of pruning schedules.

    A schedule is called with the current training step and returns a pair of
    tensors `(should_prune, sparsity)`: whether the masks are recomputed at
    this step, and the fraction of weights that are zero after it.

    Subclass it to write your own schedule: implement `__call__` (with
    `keras.ops`, so that it runs inside the compiled training step) and
    `get_config`. Register the subclass with
    `keras.saving.register_keras_serializable()` so that models using it
    save and load.

    Example:

    ```python
    @keras.saving.register_keras_serializable(package="my_project")
    class EveryStep(kprune.PruningSchedule):
        def __init__(self, sparsity):
            self.sparsity = sparsity

        def __call__(self, step):
            return (
                keras.ops.greater_equal(step, 1),
                keras.ops.convert_to_tensor(self.sparsity, "float32"),
            )

        def get_config(self):
            return {"sparsity": self.sparsity}
    ```
    """

    @abc.abstractmethod
    def __call__(self, step):
        """Returns `(should_prune, sparsity)` for `step`.

        Args:
            step: The training step (int or integer tensor), counted from 1.

        Returns:
            A tuple of a scalar boolean tensor and a scalar float32 tensor.
        """

    @abc.abstractmethod
    def get_config(self) -> dict:
        """Returns the arguments that recreate this schedule."""

    @classmethod
    def from_config(cls, config: dict):
        """Creates a schedule from the output of `get_config()`.

        Accepts both a flat dict of `__init__` arguments (Keras's shape) and
        `{"class_name": ..., "config": {...}}` (`tfmot`'s shape).
        """
        return cls(**_unnest(config))

    def mask_group_key(self):
        """Names the group of layers whose masks are computed together.

        `None` (the default) prunes each layer on its own. A schedule that
        prunes across layers (`kprune.allocation.GlobalSparsity`) returns a
        hashable key: when training starts, the layers whose schedules are
        of the same class and return equal keys form one group, built by
        `make_mask_group`.

        Returns:
            `None`, or a hashable key.
        """
        return None

    def make_mask_group(self, model, wrappers):
        """Builds the mask group of `wrappers`, for `mask_group_key`.

        Args:
            model: The model being trained.
            wrappers: The `kprune.PruneLowMagnitude` layers of the group,
                in model order; this schedule is the first one's.

        Returns:
            A `kprune.engine.MaskGroup`.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.mask_group_key() names a group, so it "
            "must also implement `make_mask_group(model, wrappers)`."
        )

    def __eq__(self, other):
        return type(self) is type(other) and (
            self.get_config() == other.get_config()
        )

    def __hash__(self):
        config = json.dumps(self.get_config(), sort_keys=True, default=repr)
        return hash((type(self), config))

    def __repr__(self):
        config = _unnest(self.get_config())
        args = ", ".join(f"{k}={v!r}" for k, v in config.items())
        return f"{type(self).__name__}({args})"

    @staticmethod
    def _should_prune_in_step(step, begin_step, end_step, frequency):
        """True when `step` is in `[begin_step, end_step]` and on a multiple
        of `frequency` from `begin_step`; `end_step=-1` never ends."""
        step = ops.cast(step, "int64")
        in_range = ops.logical_and(
            ops.greater_equal(step, begin_step),
            ops.logical_or(
                ops.less_equal(step, end_step),
                ops.convert_to_tensor(end_step < 0),
            ),
        )
        on_turn = ops.equal(ops.mod(step - begin_step, frequency), 0)
        return ops.logical_and(in_range, on_turn)

    @staticmethod
    def _validate_step(begin_step, end_step, frequency, allow_end_step_minus_1):
        """Checks the step arguments; returns them as Python ints.

        Any integral number is accepted (`np.int32`, `10.0`, a 0-d array).
        """
        begin_step = _to_int("begin_step", begin_step, minimum=0)
        end_step = _to_int("end_step", end_step)
        frequency = _to_int("frequency", frequency)
        if end_step == -1 and not allow_end_step_minus_1:
            raise ValueError(
                "Argument `end_step` must be >= `begin_step` for this "
                "schedule, which needs an end to decay towards. "
                f"Received: end_step={end_step}"
            )
        if end_step != -1 and end_step < begin_step:
            raise ValueError(
                "Argument `end_step` must be -1 (never end) or >= "
                f"`begin_step`. Received: begin_step={begin_step}, "
                f"end_step={end_step}"
            )
        if frequency <= 0:
            raise ValueError(
                "Argument `frequency` must be > 0. "
                f"Received: frequency={frequency}"
            )
        return begin_step, end_step, frequency

    @staticmethod
    def _warn_if_never_prunes(begin_step, end_step, frequency):
        """Warns when no training step (counted from 1) is a pruning step
        inside `[begin_step, end_step]`: such a schedule never prunes.

        A warning, not an error: `tfmot` accepts these schedules, and its
        own tests build some (`begin_step=0, end_step=0`).
        """
        # Training steps count from 1, so `begin_step=0` first prunes at
        # `frequency`.
        first = begin_step if begin_step >= 1 else frequency
        if end_step != -1 and first > end_step:
            warnings.warn(
                f"This pruning schedule never prunes: with "
                f"begin_step={begin_step} and frequency={frequency}, the "
                f"first step at which it prunes is {first} (training steps "
                f"count from 1), after end_step={end_step}, so the model "
                "stays dense. Use an `end_step` of at least "
                f"{first}, a smaller `frequency`, or `end_step=-1`.",
                stacklevel=3,
            )

    @staticmethod
    def _validate_sparsity(value, name):
        """Checks a sparsity; returns it as a Python float in [0, 1)."""
        plain = _plain(value)
        if not is_real_number(plain) or not 0.0 <= plain < 1.0:
            raise ValueError(
                f"Argument `{name}` must be a number in [0, 1). "
                f"Received: {name}={value!r}"
            )
        return float(plain)


class _AcrossLayersSchedule(PruningSchedule):
    """Base of schedules that follow an inner schedule's steps and targets
    but compute masks across layers (`kprune.allocation.GlobalSparsity`,
    `kprune.structured.StructuredSparsity`). Subclasses set
    `self.schedule`, list their other arguments in `get_config`, and
    implement `mask_group_key` and `make_mask_group`."""

    def __call__(self, step):
        return self.schedule(step)

    @classmethod
    def from_config(cls, config: dict):
        config = dict(_unnest(config))
        config["schedule"] = keras.saving.deserialize_keras_object(
            config["schedule"]
        )
        return cls(**config)


@kprune_export("kprune")
class ConstantSparsity(PruningSchedule):
    """Prunes to a constant sparsity every `frequency` steps.

    Masks are recomputed at steps `begin_step`, `begin_step + frequency`, ...
    up to `end_step` (`-1`: until training ends), always at
    `target_sparsity`.

    Args:
        target_sparsity: Fraction of weights set to zero, in `[0, 1)`.
        begin_step: First step at which to prune (>= 0).
        end_step: Last step at which to prune, or `-1` to never stop.
        frequency: Prune every `frequency` steps (> 0).

    Raises:
        ValueError: If an argument is outside its range.

    Example:

    ```python
    schedule = kprune.ConstantSparsity(0.8, begin_step=0, frequency=100)
    should_prune, sparsity = schedule(200)  # True, 0.8
    ```
    """

    def __init__(
        self,
        target_sparsity: float,
        begin_step: int,
        end_step: int = -1,
        frequency: int = 100,
    ):
        begin_step, end_step, frequency = self._validate_step(
            begin_step, end_step, frequency, True
        )
        self.target_sparsity = self._validate_sparsity(
            target_sparsity, "target_sparsity"
        )
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency
        self._warn_if_never_prunes(begin_step, end_step, frequency)

    def __call__(self, step):
        return (
            self._should_prune_in_step(
                step, self.begin_step, self.end_step, self.frequency
            ),
            ops.convert_to_tensor(self.target_sparsity, dtype="float32"),
        )

    def get_config(self) -> dict:
        return {
            "target_sparsity": self.target_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


@kprune_export("kprune")
class PolynomialDecay(PruningSchedule):
    """Raises sparsity from `initial_sparsity` to `final_sparsity`.

    At step `t` the target is
    `final + (initial - final) * (1 - p) ** power` with
    `p = clip((t - begin_step) / (end_step - begin_step), 0, 1)`: sparsity
    grows fast at first and levels off at `final_sparsity` by `end_step`
    (Zhu & Gupta, 2017). Masks are recomputed every `frequency` steps
    inside `[begin_step, end_step]`.

    Args:
        initial_sparsity: Sparsity at `begin_step`, in `[0, 1)`.
        final_sparsity: Sparsity at and after `end_step`, in `[0, 1)`.
        begin_step: First step at which to prune (>= 0).
        end_step: Last step at which to prune (>= `begin_step`; `-1` is not
            allowed since the decay needs an end).
        power: Exponent of the decay.
        frequency: Prune every `frequency` steps (> 0).

    Raises:
        ValueError: If an argument is outside its range.

    Example:

    ```python
    schedule = kprune.PolynomialDecay(
        initial_sparsity=0.5, final_sparsity=0.8, begin_step=0, end_step=1000
    )
    should_prune, sparsity = schedule(1000)  # True, 0.8
    ```
    """

    def __init__(
        self,
        initial_sparsity: float,
        final_sparsity: float,
        begin_step: int,
        end_step: int,
        power: float = 3,
        frequency: int = 100,
    ):
        begin_step, end_step, frequency = self._validate_step(
            begin_step, end_step, frequency, False
        )
        self.initial_sparsity = self._validate_sparsity(
            initial_sparsity, "initial_sparsity"
        )
        self.final_sparsity = self._validate_sparsity(
            final_sparsity, "final_sparsity"
        )
        plain_power = _to_float("power", power)
        if plain_power <= 0:
            raise ValueError(
                f"Argument `power` must be > 0. Received: power={power!r}"
            )
        # An integral power stays an int, as written (`power=3`).
        if isinstance(_plain(power), numbers.Integral):
            plain_power = int(plain_power)
        self.begin_step = begin_step
        self.end_step = end_step
        self.power = plain_power
        self.frequency = frequency
        self._warn_if_never_prunes(begin_step, end_step, frequency)

    def __call__(self, step):
        should_prune = self._should_prune_in_step(
            step, self.begin_step, self.end_step, self.frequency
        )
        step = ops.cast(step, "float32")
        span = self.end_step - self.begin_step
        if span == 0:
            # A zero-length decay jumps straight to the final sparsity.
            progress = ops.cast(
                ops.greater_equal(step, self.begin_step), "float32"
            )
        else:
            progress = ops.clip((step - self.begin_step) / span, 0.0, 1.0)
        sparsity = self.final_sparsity + (
            self.initial_sparsity - self.final_sparsity
        ) * ops.power(1.0 - progress, self.power)
        return should_prune, ops.cast(sparsity, "float32")

    def get_config(self) -> dict:
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }
