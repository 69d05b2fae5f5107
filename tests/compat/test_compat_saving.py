"""tfmot 0.8.1's save and load behaviour, through kprune's public API.

The facts come from tfmot's `prune_integration_test.py` (training resumes
from a saved pruned model with its step and masks; a stripped model holds
no pruning objects) and its `PruningSchedule` docs (a custom schedule's
`get_config()` returns `{"class_name": ..., "config": {...}}`).
"""

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import pruned_weights
from testing import steps


def _pruned_mlp(schedule):
    return compile_classifier(
        kprune.prune_low_magnitude(
            keras.Sequential(
                [keras.Input((8,)), layers.Dense(16), layers.Dense(3)]
            ),
            pruning_schedule=schedule,
        )
    )


def test_a_saved_pruned_model_resumes_with_its_step_masks_and_schedule(
    tmp_path,
):
    schedule = kprune.PolynomialDecay(0.2, 0.8, 0, 16, frequency=4)
    model = _pruned_mlp(schedule)
    x, y = classification_data(n=32)
    fit_pruned(model, x, y)  # 8 steps
    model.save(tmp_path / "pruned.keras")
    loaded = keras.saving.load_model(tmp_path / "pruned.keras")
    assert steps(loaded) == [8, 8]
    assert loaded.layers[0].pruning_schedule == schedule
    for (w1, m1), (w2, m2) in zip(
        pruned_weights(model), pruned_weights(loaded)
    ):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(w1, w2)
    fit_pruned(loaded, x, y)  # steps 9 to 16: the end of the decay
    assert steps(loaded) == [16, 16]
    for weight, _ in pruned_weights(loaded):
        assert np.mean(weight == 0) == pytest.approx(0.8, abs=0.02)


def test_a_stripped_model_saves_without_pruning_objects(tmp_path):
    model = _pruned_mlp(kprune.ConstantSparsity(0.5, 0, frequency=1))
    x, y = classification_data(n=16)
    fit_pruned(model, x, y)
    stripped = kprune.strip_pruning(model)
    stripped.save(tmp_path / "stripped.keras")
    assert "kprune" not in str(stripped.get_config())
    loaded = keras.saving.load_model(tmp_path / "stripped.keras")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


@keras.saving.register_keras_serializable(package="compat_tests")
class EveryStepTfmotStyle(kprune.PruningSchedule):
    """A custom schedule written as tfmot's docs show: its `get_config`
    nests the arguments under "config"."""

    def __init__(self, sparsity):
        self.sparsity = sparsity

    def __call__(self, step):
        return (
            ops.greater_equal(step, 0),
            ops.convert_to_tensor(self.sparsity, "float32"),
        )

    def get_config(self):
        return {
            "class_name": self.__class__.__name__,
            "config": {"sparsity": self.sparsity},
        }


def test_a_custom_schedule_with_tfmot_config_shape_loads(tmp_path):
    model = _pruned_mlp(EveryStepTfmotStyle(0.5))
    x, y = classification_data(n=8)
    fit_pruned(model, x, y)
    model.save(tmp_path / "custom.keras")
    loaded = keras.saving.load_model(tmp_path / "custom.keras")
    schedule = loaded.layers[0].pruning_schedule
    assert isinstance(schedule, EveryStepTfmotStyle)
    assert schedule.sparsity == 0.5
