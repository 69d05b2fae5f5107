"""Pruning schedules: when to prune and to which sparsity, per training step.

The step is the number of training batches seen so far, counted from 1 (the
first batch of training sees step 1), exactly as in
`tfmot.sparsity.keras`, so `begin_step`/`end_step` values carry over.
"""

import abc

import keras
from keras import ops


def _check_int(name: str, value, minimum=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"Argument `{name}` must be an integer. Received: {name}={value!r}"
        )
    if minimum is not None and value < minimum:
        raise ValueError(
            f"Argument `{name}` must be >= {minimum}. Received: {name}={value}"
        )


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
        """Creates a schedule from the output of `get_config()`."""
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and (
            self.get_config() == other.get_config()
        )

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
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
        _check_int("begin_step", begin_step, minimum=0)
        _check_int("end_step", end_step)
        _check_int("frequency", frequency)
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

    @staticmethod
    def _validate_sparsity(value, name):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"Argument `{name}` must be a number in [0, 1). "
                f"Received: {name}={value!r}"
            )
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"Argument `{name}` must be in [0, 1). Received: {name}={value}"
            )


class _AcrossLayersSchedule(PruningSchedule):
    """Base of schedules that follow an inner schedule's steps and targets
    but compute masks across layers (`kprune.GlobalSparsity`,
    `kprune.StructuredSparsity`). Subclasses set `self.schedule` and list
    their other arguments in `get_config`."""

    # Read by the wrapper: such a layer needs its mask group.
    needs_group = True

    def __call__(self, step):
        return self.schedule(step)

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(
            config["schedule"]
        )
        return cls(**config)


@keras.saving.register_keras_serializable(package="kprune")
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
        self._validate_step(begin_step, end_step, frequency, True)
        self._validate_sparsity(target_sparsity, "target_sparsity")
        self.target_sparsity = target_sparsity
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency

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


@keras.saving.register_keras_serializable(package="kprune")
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
        self._validate_step(begin_step, end_step, frequency, False)
        self._validate_sparsity(initial_sparsity, "initial_sparsity")
        self._validate_sparsity(final_sparsity, "final_sparsity")
        if isinstance(power, bool) or not isinstance(power, (int, float)):
            raise ValueError(
                f"Argument `power` must be a number. Received: power={power!r}"
            )
        self.initial_sparsity = initial_sparsity
        self.final_sparsity = final_sparsity
        self.begin_step = begin_step
        self.end_step = end_step
        self.power = power
        self.frequency = frequency

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
