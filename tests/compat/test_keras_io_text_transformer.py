"""keras-io's text-classification Transformer, pruned with kprune as written.

Its layers take no `**kwargs`, have no `get_config` and are not
registered, so Keras cannot rebuild them from a config: a `.keras` file of
this model does not load anywhere, pruned or not. What a user ships
instead, and what these tests check in a fresh process that never imports
kprune:

- the weights (`.weights.h5`) with the example's own code to build the
  model, on every backend;
- a SavedModel (`model.export`), which needs no Python classes at all, on
  TensorFlow.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import keras_io_text_transformer as example
import numpy as np
import pytest

import kprune
from testing import requires_tensorflow

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _tokens(n, seed=0):
    """Padded token ids and labels: 1 when the review uses more low ids."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, example.vocab_size, size=(n, example.maxlen))
    lengths = rng.integers(20, example.maxlen, size=n)
    for row, length in zip(x, lengths):
        row[: example.maxlen - length] = 0  # pad_sequences pads in front
    y = (np.mean(x < example.vocab_size // 2, axis=1) > 0.5).astype("int32")
    return x.astype("int32"), y


@pytest.fixture(scope="module")
def stripped():
    """The example's model, pruned while it trains, then stripped."""
    model = example.build_model()
    pruned = kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.ConstantSparsity(
            0.5, begin_step=0, frequency=1
        ),
    )
    pruned.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x, y = _tokens(64)
    pruned.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    x_test, _ = _tokens(8, seed=1)
    stripped = kprune.strip_pruning(pruned)
    np.testing.assert_allclose(
        stripped.predict(x_test, verbose=0),
        pruned.predict(x_test, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    return stripped, x_test


def _run_without_kprune(code, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        f"{code}\n"
        "assert 'kprune' not in sys.modules, 'the child imported kprune'\n"
    )
    env = dict(os.environ, PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_stripped_keeps_the_example_layers_and_sparsity(stripped):
    model, _ = stripped
    classes = {type(layer).__name__ for layer in model.layers}
    assert {"TokenAndPositionEmbedding", "TransformerBlock"} <= classes
    block = next(
        layer
        for layer in model.layers
        if isinstance(layer, example.TransformerBlock)
    )
    kernel = keras.ops.convert_to_numpy(block.ffn.layers[0].kernel)
    assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.01)
    assert not any(
        isinstance(layer, kprune.PruneLowMagnitude) for layer in model.layers
    )


def test_weights_reload_with_the_example_code_without_kprune(
    stripped, tmp_path
):
    model, x_test = stripped
    model.save_weights(tmp_path / "model.weights.h5")
    np.save(tmp_path / "x.npy", x_test)
    _run_without_kprune(
        "import numpy as np\n"
        "import keras_io_text_transformer as example\n"
        "model = example.build_model()\n"
        "model.load_weights('model.weights.h5')\n"
        "np.save('y.npy', model.predict(np.load('x.npy'), verbose=0))\n",
        tmp_path,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"),
        model.predict(x_test, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


@requires_tensorflow
def test_saved_model_reloads_without_kprune(stripped, tmp_path):
    model, x_test = stripped
    model.export(str(tmp_path / "saved"), verbose=False)
    np.save(tmp_path / "x.npy", x_test)
    _run_without_kprune(
        "import numpy as np\n"
        "import tensorflow as tf\n"
        "served = tf.saved_model.load('saved')\n"
        "x = np.load('x.npy').astype('float32')\n"
        "np.save('y.npy', served.serve(x).numpy())\n",
        tmp_path,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"),
        model.predict(x_test, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
