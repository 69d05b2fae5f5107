"""tfmot 0.8.1's schedule behaviour, through kprune's public API.

The facts come from tfmot's `pruning_schedule_test.py` and its docs; where
kprune differs on purpose, docs/migrating.md says so.
"""

import keras
import numpy as np
import pytest

import kprune


def _schedules(begin_step, end_step, frequency=10):
    return [
        kprune.ConstantSparsity(0.5, begin_step, end_step, frequency),
        kprune.PolynomialDecay(0.2, 0.8, begin_step, end_step, 3, frequency),
    ]


def _should_prune(schedule, step):
    return bool(keras.ops.convert_to_numpy(schedule(step)[0]))


def _sparsity(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)[1]))


@pytest.mark.parametrize("begin_step", [-1, -5])
def test_begin_step_must_not_be_negative(begin_step):
    for make in (
        lambda: kprune.ConstantSparsity(0.5, begin_step, 1000),
        lambda: kprune.PolynomialDecay(0.2, 0.8, begin_step, 1000),
    ):
        with pytest.raises(ValueError, match="begin_step"):
            make()


@pytest.mark.parametrize("begin_step", [0, 1, 100])
def test_begin_step_zero_or_more_is_accepted(begin_step):
    _schedules(begin_step, 1000)


def test_end_step_below_minus_one_is_refused():
    with pytest.raises(ValueError, match="end_step"):
        kprune.ConstantSparsity(0.5, 10, -5)
    with pytest.raises(ValueError, match="end_step"):
        kprune.PolynomialDecay(0.2, 0.8, 10, -5)


@pytest.mark.parametrize("end_step", [0, 1, 100])
def test_end_step_from_begin_step_is_accepted(end_step):
    _schedules(0, end_step)


def test_end_step_before_begin_step_is_refused():
    for make in (
        lambda: kprune.ConstantSparsity(0.5, 10, 5),
        lambda: kprune.PolynomialDecay(0.2, 0.8, 10, 5),
    ):
        with pytest.raises(ValueError, match="end_step"):
            make()
    _schedules(10, 10)
    _schedules(10, 20)


def test_polynomial_decay_needs_an_end_step():
    with pytest.raises(ValueError, match="end_step"):
        kprune.PolynomialDecay(0.4, 0.8, 10, -1)


@pytest.mark.parametrize("frequency", [0, -1, -5])
def test_frequency_must_be_positive(frequency):
    for make in (
        lambda: kprune.ConstantSparsity(0.5, 10, 1000, frequency),
        lambda: kprune.PolynomialDecay(0.2, 0.8, 10, 1000, 3, frequency),
    ):
        with pytest.raises(ValueError, match="frequency"):
            make()
    _schedules(10, 1000, 1)
    _schedules(10, 1000, 10)


@pytest.mark.parametrize("sparsity", [-0.001, -1.0, -10.0, 1.0, 10.0])
def test_sparsity_outside_zero_to_one_is_refused(sparsity):
    for make in (
        lambda: kprune.ConstantSparsity(sparsity, 0),
        lambda: kprune.PolynomialDecay(sparsity, 0.8, 0, 10),
        lambda: kprune.PolynomialDecay(0.2, sparsity, 0, 10),
    ):
        with pytest.raises(ValueError, match="sparsity"):
            make()


@pytest.mark.parametrize("sparsity", [0.0, 0.001, 0.5, 0.99])
def test_sparsity_in_zero_to_one_is_accepted(sparsity):
    kprune.ConstantSparsity(sparsity, 0)
    kprune.PolynomialDecay(sparsity, 0.8, 0, 10)
    kprune.PolynomialDecay(0.2, sparsity, 0, 10)


@pytest.mark.parametrize("index", [0, 1])
def test_prunes_only_between_begin_and_end_step(index):
    schedule = _schedules(100, 200, 1)[index]
    for step in (90, 99, 201, 210):
        assert not _should_prune(schedule, step), step
    for step in (100, 110, 200):
        assert _should_prune(schedule, step), step


@pytest.mark.parametrize("index", [0, 1])
def test_prunes_only_every_frequency_steps(index):
    schedule = _schedules(100, 200, 10)[index]
    assert _should_prune(schedule, 100)
    assert _should_prune(schedule, 110)
    assert not _should_prune(schedule, 109)
    assert not _should_prune(schedule, 111)


def test_constant_sparsity_with_end_step_minus_one_prunes_forever():
    schedule = kprune.ConstantSparsity(0.5, 0, -1, 10)
    for step in (10000, 100000000):
        assert _should_prune(schedule, step)
        assert _sparsity(schedule, step) == pytest.approx(0.5)


def test_constant_sparsity_returns_its_target():
    schedule = kprune.ConstantSparsity(0.5, 100, 200, 10)
    for step in (100, 110, 200):
        assert _sparsity(schedule, step) == pytest.approx(0.5)


def test_polynomial_decay_values():
    # tfmot's reference values, from tf.compat.v1.train.polynomial_decay.
    schedule = kprune.PolynomialDecay(0.2, 0.8, 100, 110, 3, 2)
    assert _sparsity(schedule, 100) == pytest.approx(0.2, abs=1e-6)
    assert _sparsity(schedule, 102) == pytest.approx(0.4928, abs=1e-6)
    assert _sparsity(schedule, 105) == pytest.approx(0.725, abs=1e-6)
    assert _sparsity(schedule, 110) == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        kprune.ConstantSparsity(0.7, 10, 20, 10),
        kprune.PolynomialDecay(0.2, 0.6, 10, 20, 5, 10),
    ],
    ids=["ConstantSparsity", "PolynomialDecay"],
)
def test_schedules_serialize_and_deserialize(schedule):
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule)
    )
    assert type(restored) is type(schedule)
    assert restored.__dict__ == schedule.__dict__


def test_default_schedule_is_constant_half_sparsity_from_step_zero():
    wrapper = kprune.PruneLowMagnitude(keras.layers.Dense(4))
    assert wrapper.pruning_schedule == kprune.ConstantSparsity(0.5, 0)


# Point 1 of issue 11: the pruning_with_keras guide computes its end step
# with NumPy, and tfmot accepts any integral or real value.


@pytest.mark.parametrize("end_step", [np.int32(86), np.int64(86), np.array(86)])
def test_numpy_integer_steps_are_accepted(end_step):
    schedule = kprune.PolynomialDecay(0.5, 0.8, np.int64(0), end_step)
    assert _sparsity(schedule, 86) == pytest.approx(0.8)
    kprune.ConstantSparsity(0.5, np.int32(0), end_step, np.int64(10))


@pytest.mark.parametrize(
    "sparsity", [np.float32(0.5), np.float64(0.5), np.array(0.5)]
)
def test_numpy_sparsities_are_accepted(sparsity):
    schedule = kprune.ConstantSparsity(sparsity, 0)
    assert _sparsity(schedule, 1) == pytest.approx(0.5)
    kprune.PolynomialDecay(sparsity, np.float32(0.8), 0, 10)


@pytest.mark.parametrize("power", [-1, -0.5, "3"])
def test_bad_power_is_refused_at_construction(power):
    with pytest.raises(ValueError, match="power"):
        kprune.PolynomialDecay(0.1, 0.5, 0, 10, power=power)
