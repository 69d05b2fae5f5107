import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _registry():
    # `kprune.register_prunable_layer` is global: a test's registrations
    # must not reach the next test.
    from kprune import registry

    saved = dict(registry._PRUNABLE_WEIGHTS)
    yield
    registry._PRUNABLE_WEIGHTS.clear()
    registry._PRUNABLE_WEIGHTS.update(saved)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    # Resets layer-name counters and global settings (dtype policy) for the
    # next test. Without free_memory=False it also runs a full gc.collect(),
    # about 0.3 s a test with TensorFlow loaded; Python's own collector
    # frees the cycles anyway.
    keras.backend.clear_session(free_memory=False)
