"""Real architectures nobody here wrote, with random weights.

Each is pruned whole, trained a few steps to its target sparsity, stripped
and saved. keras-hub backbones are built from tiny configs: no preset is
ever downloaded (the network is cut off during these tests).
"""

import socket

import keras
import numpy as np
import pytest

import kprune
from kprune import registry
from kprune.callbacks import pruning_stats
from kprune.wrapper import collect_pruned_layers
from testing import pruned_weights
from testing import reference_kept

SPARSITY = 0.5


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(registry._PRUNABLE_WEIGHTS)
    yield
    registry._PRUNABLE_WEIGHTS.clear()
    registry._PRUNABLE_WEIGHTS.update(saved)


def application(name):
    def build():
        backbone = getattr(keras.applications, name)(
            weights=None,
            input_shape=(32, 32, 3),
            classes=3,
            classifier_activation=None,
        )
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
        # Eager steps: tracing a training step with 50-80 pruned weights
        # costs a minute on 2 cores, and the compiled path is what the
        # layer tests and the keras-hub models below exercise. JAX steps
        # compiled: eager JAX crashed (segfault in jaxlib 0.10.2, inside
        # `lax.cond` during the gradient) on ResNet50.
        return backbone, x, keras.backend.backend() != "jax"

    return build


def hub_classifier(name):
    def build():
        import keras_hub

        config = dict(
            vocabulary_size=50,
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=8,
        )
        backbone = getattr(keras_hub.models, name)(**config)
        inputs = backbone.input
        outputs = backbone(inputs)
        if isinstance(outputs, dict):
            # Every weight must get a gradient: the optimizer prunes
            # only the weights it updates.
            pooled = outputs["pooled_output"]
        else:
            pooled = keras.layers.GlobalAveragePooling1D()(outputs)
        model = keras.Model(inputs, keras.layers.Dense(3)(pooled))
        rng = np.random.default_rng(0)
        x = {
            "token_ids": rng.integers(0, 50, size=(4, 8)).astype("int32"),
            "padding_mask": np.ones((4, 8), "int32"),
        }
        if "segment_ids" in inputs:
            x["segment_ids"] = np.zeros((4, 8), "int32")
        return model, x, False

    return build


ARCHITECTURES = {
    "MobileNetV2": application("MobileNetV2"),
    "ResNet50": application("ResNet50"),
    "EfficientNetB0": application("EfficientNetB0"),
    "BertBackbone": hub_classifier("BertBackbone"),
    "GPT2Backbone": hub_classifier("GPT2Backbone"),
}


def eager(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def unpruned_prunable_layers(model):
    """Prunable layers of `model` that no wrapper covers."""
    covered = set()
    for wrapper in collect_pruned_layers(model):
        covered.update(
            id(layer) for layer in wrapper._flatten_layers(include_self=True)
        )
    return [
        layer.name
        for layer in model._flatten_layers(include_self=False)
        if id(layer) not in covered
        and not isinstance(layer, keras.Model)
        and registry.status(layer) == registry.PRUNABLE
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_prunes_to_target_strips_and_saves(name, tmp_path):
    model, x, run_eagerly = ARCHITECTURES[name]()
    y = np.arange(4) % 3
    pruned = kprune.prune_low_magnitude(
        model, kprune.ConstantSparsity(SPARSITY, 0, frequency=1)
    )
    assert unpruned_prunable_layers(pruned) == []
    pruned.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
    )
    pruned.fit(
        x,
        y,
        batch_size=2,
        epochs=1,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    pairs = pruned_weights(pruned)
    for weight, mask in pairs:
        assert mask.sum() == reference_kept(weight.size, SPARSITY)
        assert np.count_nonzero(weight[~mask]) == 0
    stats = pruning_stats(pruned)
    print(
        f"{name}: {len(collect_pruned_layers(pruned))} pruned units, "
        f"{len(pairs)} weights, {sum(w.size for w, _ in pairs)} values, "
        f"sparsity {stats['sparsity']:.4f}"
    )
    assert stats["sparsity"] == pytest.approx(SPARSITY, abs=1e-3)

    expected = eager(pruned, x)
    stripped = kprune.strip_pruning(pruned)
    assert not collect_pruned_layers(stripped)
    np.testing.assert_allclose(eager(stripped, x), expected, atol=1e-4)

    pruned.save(tmp_path / "pruned.keras")
    loaded = keras.saving.load_model(tmp_path / "pruned.keras")
    for (w1, m1), (w2, m2) in zip(pairs, pruned_weights(loaded)):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(eager(loaded, x), expected, atol=1e-4)
