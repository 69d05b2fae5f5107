import json
import re
import warnings

import keras
import numpy as np
import pytest

import kprune
from testing import xla_compile


def should_prune_reference(step, begin, end, frequency):
    in_range = step >= begin and (end == -1 or step <= end)
    return in_range and (step - begin) % frequency == 0


def call(schedule, step):
    should, sparsity = schedule(step)
    return bool(keras.ops.convert_to_numpy(should)), float(
        keras.ops.convert_to_numpy(sparsity)
    )


@pytest.mark.parametrize(
    "begin,end,frequency", [(0, -1, 100), (3, 20, 4), (5, 5, 1), (0, 50, 7)]
)
def test_constant_sparsity_prunes_on_schedule_steps(begin, end, frequency):
    schedule = kprune.ConstantSparsity(0.7, begin, end, frequency)
    for step in range(0, 130):
        should, sparsity = call(schedule, step)
        assert should == should_prune_reference(step, begin, end, frequency)
        assert sparsity == pytest.approx(0.7)


def test_first_batch_is_step_one_so_begin_zero_prunes_at_frequency():
    schedule = kprune.ConstantSparsity(0.5, begin_step=0, frequency=100)
    assert not call(schedule, 1)[0]
    assert call(schedule, 100)[0]


@pytest.mark.parametrize("power", [1, 2, 3])
def test_polynomial_decay_follows_formula(power):
    schedule = kprune.PolynomialDecay(
        0.2, 0.9, begin_step=10, end_step=110, power=power, frequency=10
    )
    for step in range(0, 150, 5):
        p = min(max((step - 10) / 100, 0.0), 1.0)
        expected = 0.9 + (0.2 - 0.9) * (1 - p) ** power
        should, sparsity = call(schedule, step)
        assert sparsity == pytest.approx(expected, abs=1e-6)
        assert should == should_prune_reference(step, 10, 110, 10)


def test_polynomial_decay_reaches_final_and_stays():
    schedule = kprune.PolynomialDecay(0.5, 0.8, 0, 1000)
    assert call(schedule, 0)[1] == pytest.approx(0.5)
    assert call(schedule, 1000)[1] == pytest.approx(0.8)
    assert call(schedule, 5000)[1] == pytest.approx(0.8)
    assert not call(schedule, 1100)[0]


def test_polynomial_decay_with_equal_begin_and_end_jumps_to_final():
    schedule = kprune.PolynomialDecay(0.1, 0.6, begin_step=7, end_step=7)
    assert call(schedule, 7) == (True, pytest.approx(0.6))


def test_schedules_accept_tensor_steps_in_compiled_functions():
    schedule = kprune.PolynomialDecay(0.0, 0.5, 0, 10, frequency=5)
    compiled = xla_compile(schedule)
    should, sparsity = compiled(keras.ops.convert_to_tensor(10, "int64"))
    assert bool(should) and float(sparsity) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "make,argument",
    [
        (lambda: kprune.ConstantSparsity(0.5, -1), "begin_step"),
        (lambda: kprune.ConstantSparsity(0.5, 10, 5), "end_step"),
        (lambda: kprune.ConstantSparsity(0.5, 0, frequency=0), "frequency"),
        (lambda: kprune.ConstantSparsity(1.0, 0), "target_sparsity"),
        (lambda: kprune.ConstantSparsity(-0.1, 0), "target_sparsity"),
        (lambda: kprune.PolynomialDecay(0.1, 0.5, 0, -1), "end_step"),
        (lambda: kprune.PolynomialDecay(0.1, 1.2, 0, 10), "final_sparsity"),
        (lambda: kprune.PolynomialDecay(1.0, 0.5, 0, 10), "initial_sparsity"),
        (
            lambda: kprune.PolynomialDecay(0.1, 0.5, 0, 10, frequency=-3),
            "frequency",
        ),
        (lambda: kprune.PolynomialDecay(0.1, 0.5, 0.5, 10), "begin_step"),
    ],
)
def test_invalid_schedule_arguments_name_argument_and_value(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*Received"):
        make()


@pytest.mark.parametrize(
    "schedule",
    [
        kprune.ConstantSparsity(0.6, 4, 40, 2),
        kprune.PolynomialDecay(0.3, 0.85, 2, 90, power=2, frequency=3),
    ],
)
def test_schedules_round_trip_through_keras_serialization(schedule):
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule)
    )
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    assert type(schedule).from_config(schedule.get_config()) == schedule
    for step in (0, 4, 40, 90):
        assert call(restored, step) == call(schedule, step)


def test_user_schedule_subclass_is_a_pruning_schedule():
    class EverySecondStep(kprune.PruningSchedule):
        def __call__(self, step):
            return (
                keras.ops.equal(keras.ops.mod(step, 2), 0),
                keras.ops.convert_to_tensor(0.25, "float32"),
            )

        def get_config(self):
            return {}

    schedule = EverySecondStep()
    assert [call(schedule, s)[0] for s in range(1, 5)] == [
        False,
        True,
        False,
        True,
    ]
    assert np.isclose(call(schedule, 2)[1], 0.25)


def test_numpy_and_integral_values_are_accepted_and_stored_plain():
    # `pruning_with_keras.ipynb`: the end step is a NumPy int32.
    end_step = np.ceil(1000 / 128).astype(np.int32) * 2
    schedule = kprune.PolynomialDecay(
        initial_sparsity=np.float32(0.5),
        final_sparsity=np.array(0.8),
        begin_step=np.int64(0),
        end_step=end_step,
        power=np.int32(2),
        frequency=4.0,
    )
    config = schedule.get_config()
    assert config == {
        "initial_sparsity": 0.5,
        "final_sparsity": pytest.approx(0.8),
        "begin_step": 0,
        "end_step": 16,
        "power": 2,
        "frequency": 4,
    }
    assert all(type(v) in (int, float) for v in config.values())
    assert json.loads(json.dumps(config)) == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule)
    )
    assert restored == schedule
    assert call(schedule, 16) == (True, pytest.approx(0.8))
    constant = kprune.ConstantSparsity(np.float64(0.25), np.int32(3), 10.0)
    assert constant.get_config() == {
        "target_sparsity": 0.25,
        "begin_step": 3,
        "end_step": 10,
        "frequency": 100,
    }


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"power": -1}, "Argument `power` must be > 0. Received: power=-1"),
        ({"power": 0}, "Argument `power` must be > 0. Received: power=0"),
        ({"power": float("nan")}, "`power` must be a finite number"),
        ({"power": True}, "`power` must be a finite number"),
        ({"power": "3"}, "`power` must be a finite number"),
        ({"end_step": 10.5}, "`end_step` must be an integer"),
        ({"end_step": np.float32("inf")}, "`end_step` must be an integer"),
        ({"begin_step": True}, "`begin_step` must be an integer"),
        ({"frequency": np.array([2])}, "`frequency` must be an integer"),
        ({"initial_sparsity": float("nan")}, "`initial_sparsity` must be"),
        ({"final_sparsity": np.float32("inf")}, "`final_sparsity` must be"),
        ({"final_sparsity": np.bool_(False)}, "`final_sparsity` must be"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs, message):
    arguments = {
        "initial_sparsity": 0.1,
        "final_sparsity": 0.5,
        "begin_step": 0,
        "end_step": 100,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        kprune.PolynomialDecay(**arguments)


@pytest.mark.parametrize(
    "make,first",
    [
        (lambda: kprune.ConstantSparsity(0.5, 0, end_step=55), 100),
        (lambda: kprune.PolynomialDecay(0.1, 0.5, 0, 0), 100),
        (lambda: kprune.PolynomialDecay(0.1, 0.5, 0, 9, frequency=10), 10),
    ],
)
def test_schedule_that_never_prunes_warns_at_construction(make, first):
    # tfmot's own tests construct such schedules, so it is a warning.
    with pytest.warns(UserWarning, match=f"never prunes.*first step.*{first}"):
        schedule = make()
    # It indeed never prunes at any training step (counted from 1).
    assert not any(call(schedule, step)[0] for step in range(1, 120))


@pytest.mark.parametrize(
    "make",
    [
        lambda: kprune.ConstantSparsity(0.5, 0, end_step=100),
        lambda: kprune.ConstantSparsity(0.5, 0),
        lambda: kprune.PolynomialDecay(0.1, 0.5, 7, 7),
        lambda: kprune.PolynomialDecay(0.1, 0.5, 0, 1, frequency=1),
    ],
)
def test_schedule_with_a_pruning_step_does_not_warn(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()


@keras.saving.register_keras_serializable(package="test_schedules")
class TfmotStyleSchedule(kprune.PruningSchedule):
    """A user schedule written as tfmot's are: nested `get_config`."""

    def __init__(self, target_sparsity, begin_step=0):
        self.target_sparsity = target_sparsity
        self.begin_step = begin_step

    def __call__(self, step):
        return (
            keras.ops.greater_equal(step, self.begin_step),
            keras.ops.convert_to_tensor(self.target_sparsity, "float32"),
        )

    def get_config(self):
        return {
            "class_name": self.__class__.__name__,
            "config": {
                "target_sparsity": self.target_sparsity,
                "begin_step": self.begin_step,
            },
        }


def test_schedule_with_tfmot_style_config_saves_and_loads(tmp_path):
    schedule = TfmotStyleSchedule(0.4, begin_step=2)
    assert TfmotStyleSchedule.from_config(schedule.get_config()) == schedule
    assert repr(schedule) == (
        "TfmotStyleSchedule(target_sparsity=0.4, begin_step=2)"
    )
    assert len({schedule, TfmotStyleSchedule(0.4, begin_step=2)}) == 1
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    pruned = kprune.prune_low_magnitude(model, pruning_schedule=schedule)
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    restored = loaded.layers[0].pruning_schedule
    assert type(restored) is TfmotStyleSchedule
    assert restored == schedule
