import subprocess
import sys

import keras
import numpy as np
import pytest

import kprune
from kprune.wrapper import collect_pruned_layers
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import pruned_weights
from testing import reference_kept
from testing import small_cnn
from testing import steps

PRUNING_ARGS = [
    {
        "pruning_schedule": kprune.PolynomialDecay(
            0.3, 0.7, 1, 30, power=2, frequency=3
        )
    },
    {
        "pruning_schedule": kprune.ConstantSparsity(0.6, 2, 40, frequency=5),
        "block_size": (2, 1),
        "block_pooling_type": "MAX",
    },
    {
        "pruning_schedule": kprune.ConstantSparsity(0.5, 0, frequency=2),
        "sparsity_m_by_n": (2, 4),
    },
]


@pytest.mark.parametrize("args", PRUNING_ARGS)
def test_keras_file_round_trips_every_argument_and_state(tmp_path, args):
    pruned = compile_classifier(kprune.prune_low_magnitude(mlp(), **args))
    x, y = classification_data()
    fit_pruned(pruned, x, y, epochs=2)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    for original, restored in zip(
        collect_pruned_layers(pruned), collect_pruned_layers(loaded)
    ):
        config = {
            k: v for k, v in original.get_config().items() if k != "layer"
        }
        assert {k: restored.get_config()[k] for k in config} == config
        assert restored.pruning_schedule == original.pruning_schedule
        assert restored.block_size == original.block_size
        assert restored.sparsity_m_by_n == original.sparsity_m_by_n
    assert steps(loaded) == steps(pruned) == [16, 16]
    for (w1, m1), (w2, m2) in zip(
        pruned_weights(pruned), pruned_weights(loaded)
    ):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0)
    )


def test_resumed_training_continues_the_schedule_from_the_saved_step(tmp_path):
    schedule = kprune.PolynomialDecay(0.2, 0.9, 0, 24, frequency=4)
    x, y = classification_data(n=32)
    pruned = compile_classifier(kprune.prune_low_magnitude(mlp(), schedule))
    fit_pruned(pruned, x, y, epochs=1)
    sparsity_at_8 = [1 - m.mean() for _, m in pruned_weights(pruned)]
    pruned.save(tmp_path / "mid.keras")

    loaded = keras.saving.load_model(tmp_path / "mid.keras")
    assert steps(loaded) == [8, 8]
    fit_pruned(loaded, x, y, epochs=2)
    assert steps(loaded) == [24, 24]
    final = [1 - m.mean() for _, m in pruned_weights(loaded)]
    assert all(a < b for a, b in zip(sparsity_at_8, final))
    for weight, mask in pruned_weights(loaded):
        assert mask.sum() == max(round(weight.size * 0.1), 1)


def test_prune_scope_loads_like_tfmot_code(tmp_path):
    pruned = kprune.prune_low_magnitude(mlp())
    pruned.save(tmp_path / "p.keras")
    with kprune.prune_scope():
        loaded = keras.saving.load_model(tmp_path / "p.keras")
    assert len(collect_pruned_layers(loaded)) == 2


def test_strip_pruning_returns_plain_model_with_equal_predictions(tmp_path):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            small_cnn(), kprune.ConstantSparsity(0.8, 0, frequency=2)
        )
    )
    x, y = classification_data(shape=(8, 8, 1))
    fit_pruned(pruned, x, y, epochs=2)
    stripped = kprune.strip_pruning(pruned)
    assert not any(
        type(layer).__module__.startswith("kprune")
        for layer in stripped._flatten_layers()
    )
    assert all(
        v.constraint is None
        or not type(v.constraint).__module__.startswith("kprune")
        for v in stripped.weights
    )
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0),
        pruned.predict(x, verbose=0),
        atol=1e-6,
    )
    kernels = [w for w, _ in pruned_weights(pruned)]
    for kernel, layer in zip(kernels, [stripped.layers[0], stripped.layers[3]]):
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    assert not stripped.compiled  # an export holds no optimizer state
    # The pruned model keeps training after stripping.
    fit_pruned(pruned, x, y, epochs=1)


@pytest.mark.slow
def test_stripped_model_loads_without_kprune_installed(tmp_path):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(), kprune.ConstantSparsity(0.9, 0, frequency=1)
        )
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y)
    stripped = kprune.strip_pruning(pruned)
    path = tmp_path / "stripped.keras"
    stripped.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", stripped.predict(x, verbose=0))
    script = (
        "import sys, numpy as np, keras\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "assert 'kprune' not in sys.modules\n"
        "x = np.load(sys.argv[2]); e = np.load(sys.argv[3])\n"
        "np.testing.assert_allclose(m.predict(x, verbose=0), e, atol=1e-6)\n"
        "z = sum(int((w == 0).sum()) for w in m.get_weights())\n"
        "print('zeros', z)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "expected.npy"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    zeros = int(result.stdout.split("zeros")[-1])
    assert zeros >= sum(w.size - m.sum() for w, m in pruned_weights(pruned))


def test_strip_pruning_rejects_non_models():
    with pytest.raises(ValueError, match="Keras model"):
        kprune.strip_pruning(keras.layers.Dense(3))


def test_pruned_and_stripped_zeros_are_positive_zeros():
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(), kprune.ConstantSparsity(0.8, 0, frequency=2)
        )
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y)
    for model in (pruned, kprune.strip_pruning(pruned)):
        for weight in model.get_weights():
            assert not np.signbit(weight[weight == 0]).any()
    # Stripping applies the masks itself, also to weights set by hand.
    kernel = collect_pruned_layers(pruned)[0].layer.kernel
    kernel.assign(-np.ones(kernel.shape, "float32"))
    stripped_kernel = kprune.strip_pruning(pruned).get_weights()[0]
    zeros = stripped_kernel[stripped_kernel == 0]
    size = stripped_kernel.size
    assert zeros.size == size - reference_kept(size, 0.8)
    assert not np.signbit(zeros).any()  # -0.0 zips worse than 0.0


def test_legacy_h5_round_trip_with_prune_scope_as_in_tfmot_code(tmp_path):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(),
            kprune.ConstantSparsity(0.5, 0, frequency=2),
            sparsity_m_by_n=(2, 4),
        )
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y)
    path = str(tmp_path / "pruned.h5")
    pruned.save(path)
    with kprune.prune_scope():
        loaded = keras.models.load_model(path)
    assert steps(loaded) == [8, 8]
    assert [
        layer.sparsity_m_by_n for layer in collect_pruned_layers(loaded)
    ] == [(2, 4), (2, 4)]
    for a, b in zip(pruned.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
