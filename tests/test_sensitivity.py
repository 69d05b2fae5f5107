import importlib.util

import keras
import numpy as np
import pytest
from keras import layers

import kprune
import testing


def linear_model(rng, features=12, outputs=2):
    """y = x @ w with orthonormal features: pruning a weight adds exactly
    its square to the squared error, so the loss grows with sparsity."""
    q, _ = np.linalg.qr(rng.normal(size=(64, features)))
    x = (q * 8.0).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((features,)),
            layers.Dense(features, use_bias=False, name="first"),
            layers.Dense(outputs, use_bias=False, name="second"),
        ]
    )
    model.get_layer("first").kernel.assign(np.eye(features, dtype="float32"))
    w = rng.normal(size=(features, outputs)).astype("float32")
    model.get_layer("second").kernel.assign(w)
    model.compile(loss="mse")
    return model, x, x @ w


def test_sensitivity_table_has_one_row_per_layer_and_sparsity():
    rng = np.random.default_rng(0)
    model, x, y = linear_model(rng)
    before = [w.copy() for w in model.get_weights()]
    result = kprune.sensitivity_analysis(
        model, x, y, sparsities=(0.8, 0.2, 0.5), batch_size=64
    )
    assert result.metric == "loss" and not result.higher_is_better
    assert result.sparsities == [0.2, 0.5, 0.8]
    assert list(result.scores) == ["first", "second"]
    assert len(result.table) == 2 * 3
    assert set(result.table[0]) == {"layer", "sparsity", "score", "change"}
    assert result.to_markdown().count("\n") == 2 + 2
    # The model is left as it was.
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_sensitivity_loss_grows_monotonically_with_sparsity():
    rng = np.random.default_rng(1)
    model, x, y = linear_model(rng)
    result = kprune.sensitivity_analysis(
        model,
        x,
        y,
        sparsities=(0.1, 0.3, 0.5, 0.7, 0.9),
        layers=["second"],
        batch_size=64,
    )
    assert result.baseline == pytest.approx(0.0, abs=1e-8)
    losses = result.scores["second"]
    assert all(b > a for a, b in zip(losses, losses[1:]))
    # Exactly the squared magnitudes pruned, averaged over the outputs.
    w = model.get_layer("second").kernel.numpy()
    pruned = testing.reference_magnitude_mask(w, 0.5)
    scale = 64.0 / 64 / w.shape[1]  # |x_j|^2 = 64 over 64 samples
    assert losses[2] == pytest.approx(scale * np.sum(w[~pruned] ** 2), rel=1e-4)


@pytest.mark.slow
def test_sensitivity_accuracy_falls_as_a_trained_layer_is_pruned():
    keras.utils.set_random_seed(0)
    x, y = testing.classification_data(n=256, shape=(8,), seed=3)
    y = (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 1)
    model = testing.mlp(hidden=32)
    testing.compile_classifier(model, metrics=["accuracy"])
    model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    result = kprune.sensitivity_analysis(
        model, x, y, sparsities=(0.25, 0.5, 0.75, 0.95, 0.99)
    )
    assert result.metric == "accuracy" and result.higher_is_better
    for scores in result.scores.values():
        assert scores[0] >= scores[-1] + 0.1
        assert np.corrcoef(result.sparsities, scores)[0, 1] < -0.5


def test_suggested_targets_plug_into_prune_low_magnitude():
    result = kprune.SensitivityResult(
        "accuracy",
        True,
        0.9,
        [0.25, 0.5, 0.75],
        {"dense": [0.9, 0.895, 0.7], "dense_1": [0.85, 0.89, 0.9]},
    )
    assert result.suggest_sparsities(0.01) == {"dense": 0.5}
    assert result.suggest_sparsities(0.1) == {"dense": 0.5, "dense_1": 0.75}
    assert result.suggest_sparsities(0.1, max_sparsity=0.6) == {
        "dense": 0.5,
        "dense_1": 0.5,
    }
    pruned = kprune.prune_low_magnitude(
        testing.mlp(), result.suggest_sparsities(0.01)
    )
    wrapped = [
        w.layer.name for w in kprune.wrapper.collect_pruned_layers(pruned)
    ]
    assert wrapped == ["dense"]
    with pytest.raises(ValueError, match="tolerance"):
        result.suggest_sparsities(-1)


def test_sensitivity_accepts_an_evaluation_function_and_checks_arguments():
    rng = np.random.default_rng(2)
    model, x, y = linear_model(rng)
    calls = []

    def evaluate(m):
        calls.append(1)
        return float(np.abs(m.get_layer("second").kernel.numpy()).sum())

    result = kprune.sensitivity_analysis(
        model, sparsities=(0.5,), evaluate_fn=evaluate, metric="l1"
    )
    assert len(calls) == 1 + 2 and result.metric == "l1"
    assert result.scores["second"][0] < result.baseline
    assert result.scores["first"][0] == result.baseline
    with pytest.raises(ValueError, match="sparsities"):
        kprune.sensitivity_analysis(model, x, y, sparsities=(0.0,))
    with pytest.raises(ValueError, match="not prunable layers"):
        kprune.sensitivity_analysis(model, x, y, layers=["nope"])
    with pytest.raises(ValueError, match="must be compiled"):
        kprune.sensitivity_analysis(testing.mlp(), x, y)


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed",
)
def test_sensitivity_plot_draws_one_line_per_layer(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = kprune.SensitivityResult(
        "accuracy", True, 0.9, [0.5, 0.9], {"a": [0.9, 0.8], "b": [0.9, 0.5]}
    )
    figure = result.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
    assert len(figure.axes[0].lines) == 3  # 2 layers + the baseline
