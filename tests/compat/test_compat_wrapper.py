"""tfmot 0.8.1's `PruneLowMagnitude` and mask patterns, through kprune.

The facts come from tfmot's `pruning_wrapper_test.py`, `pruning_impl_test.py`
and the `prune_low_magnitude` docs (block sparsity, N:M sparsity).
"""

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import pruned_weights

EVERY_STEP = kprune.ConstantSparsity(0.5, 0, frequency=1)


class CustomLayer(layers.Layer):
    """Weights of its own, and no `get_prunable_weights`."""

    def __init__(self, input_dim=16, output_dim=32):
        super().__init__()
        self.weight = self.add_weight(
            shape=(input_dim, output_dim), initializer="random_normal"
        )
        self.bias = self.add_weight(shape=(output_dim,), initializer="zeros")

    def call(self, inputs):
        return keras.ops.matmul(inputs, self.weight) + self.bias


class CustomLayerPrunable(CustomLayer):
    """The same with `get_prunable_weights` and no `PrunableLayer` base."""

    def get_prunable_weights(self):
        return [self.weight, self.bias]


@pytest.mark.parametrize("pooling", ["MIN", "avg", None])
def test_only_avg_and_max_pooling_are_accepted(pooling):
    with pytest.raises(ValueError, match="block_pooling_type"):
        kprune.PruneLowMagnitude(layers.Dense(10), block_pooling_type=pooling)
    kprune.PruneLowMagnitude(layers.Dense(10), block_pooling_type="AVG")
    kprune.PruneLowMagnitude(layers.Dense(10), block_pooling_type="MAX")


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (lambda: layers.Dense(10), (10,)),
        (lambda: layers.Embedding(10, 10), (10,)),
        (lambda: layers.Conv2D(4, (3, 3)), (16, 16, 4)),
    ],
    ids=["Dense", "Embedding", "Conv2D"],
)
def test_one_mask_per_prunable_weight(layer, input_shape):
    wrapper = kprune.PruneLowMagnitude(layer())
    keras.Sequential([keras.Input(input_shape), wrapper])
    assert len(wrapper.pruning_vars) == 1
    weight, mask, threshold = wrapper.pruning_vars[0]
    assert tuple(mask.shape) == tuple(weight.shape)
    assert tuple(threshold.shape) == ()


def test_a_model_of_wrapped_layers_round_trips_its_config():
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            kprune.PruneLowMagnitude(layers.Conv2D(32, 5)),
            layers.MaxPooling2D((2, 2), (2, 2)),
            kprune.PruneLowMagnitude(layers.Conv2D(64, 5)),
            layers.Flatten(),
            kprune.PruneLowMagnitude(layers.Dense(16)),
            kprune.PruneLowMagnitude(layers.Dense(10)),
        ]
    )
    assert (
        sum(
            len(w.pruning_vars)
            for w in model.layers[::1]
            if isinstance(w, kprune.PruneLowMagnitude)
        )
        == 4
    )
    config = model.get_config()
    restored = keras.Sequential.from_config(config)
    assert restored.get_config() == config


def test_a_custom_layer_with_weights_and_no_prunable_list_is_refused():
    layer = CustomLayer(input_dim=16, output_dim=32)
    layer(keras.KerasTensor((None, 16)))
    with pytest.raises(ValueError, match="CustomLayer"):
        kprune.PruneLowMagnitude(layer, block_pooling_type="MAX")


def test_a_custom_layer_with_get_prunable_weights_is_pruned():
    layer = CustomLayerPrunable(input_dim=16, output_dim=32)
    layer(keras.KerasTensor((None, 16)))
    wrapper = kprune.PruneLowMagnitude(layer, block_pooling_type="MAX")
    assert wrapper.name == "prune_low_magnitude_custom_layer_prunable"
    keras.Sequential([keras.Input((16,)), wrapper])
    assert len(wrapper.pruning_vars) == 2


def test_dropout_in_a_wrapper_is_not_called_a_layer_with_weights():
    # tfmot wraps weightless layers with nothing to prune; kprune may too,
    # or refuse them, but must not say that they have weights.
    try:
        wrapper = kprune.PruneLowMagnitude(layers.Dropout(0.4))
    except ValueError as error:
        assert "has weights" not in str(error)
        assert "Dropout" in str(error)
    else:
        assert wrapper.pruning_vars == []


def test_conv3d_is_not_pruned_with_m_by_n():
    layer = layers.Conv3D(2, 3)
    layer.build((None, 4, 8, 8, 1))
    wrapper = kprune.PruneLowMagnitude(layer, sparsity_m_by_n=(2, 4))
    # Only rank-2 (Dense) and rank-4 (Conv2D) weights get the N:M pattern.
    assert wrapper.pruning_vars == []


def _train(model, x, y):
    compile_classifier(model)
    fit_pruned(model, x, y)
    return pruned_weights(model)


def test_m_by_n_on_dense_zeros_m_of_every_n_input_weights():
    model = kprune.prune_low_magnitude(
        keras.Sequential(
            [keras.Input((8,)), layers.Dense(16), layers.Dense(3)]
        ),
        pruning_schedule=EVERY_STEP,
        sparsity_m_by_n=(2, 4),
    )
    x, y = classification_data()
    for weight, mask in _train(model, x, y):
        # Keras kernels are (inputs, outputs): groups run along axis 0.
        groups = np.moveaxis(weight, 0, -1).reshape(-1, 4)
        assert ((groups != 0).sum(axis=-1) <= 2).all()
        assert mask.mean() == 0.5


def test_m_by_n_on_conv2d_runs_along_the_input_channels():
    model = kprune.prune_low_magnitude(
        keras.Sequential(
            [
                keras.Input((6, 6, 8)),
                layers.Conv2D(8, 3),
                layers.Flatten(),
            ]
        ),
        pruning_schedule=EVERY_STEP,
        sparsity_m_by_n=(2, 4),
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 8)).astype("float32")
    y = rng.normal(size=(8, 128)).astype("float32")
    fit_pruned(model, x, y)
    ((weight, _),) = pruned_weights(model)
    groups = np.moveaxis(weight, 2, -1).reshape(-1, 4)  # (h, w, in, out)
    assert ((groups != 0).sum(axis=-1) <= 2).all()


def test_m_by_n_applies_from_the_first_step_with_the_default_schedule():
    # tfmot applies N:M masks from the first training step.
    model = kprune.prune_low_magnitude(
        keras.Sequential([keras.Input((8,)), layers.Dense(16)]),
        sparsity_m_by_n=(2, 4),
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 8)).astype("float32")
    fit_pruned(model, x, np.zeros((8, 16), "float32"))
    ((weight, _),) = pruned_weights(model)
    assert np.mean(weight == 0) == 0.5


def test_m_by_n_and_block_size_cannot_be_combined():
    with pytest.raises(ValueError, match="sparsity_m_by_n"):
        kprune.prune_low_magnitude(
            layers.Dense(8), sparsity_m_by_n=(2, 4), block_size=(2, 1)
        )


def test_block_sparsity_prunes_whole_blocks():
    model = kprune.prune_low_magnitude(
        keras.Sequential([keras.Input((8,)), layers.Dense(8), layers.Dense(3)]),
        pruning_schedule=EVERY_STEP,
        block_size=(2, 2),
    )
    x, y = classification_data()
    weight, mask = _train(model, x, y)[0]
    blocks = mask.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 4)
    assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all()
    assert mask.mean() == 0.5
    assert np.array_equal(weight != 0, mask)


def test_keyword_calls_are_forwarded():
    inputs = keras.Input((4, 8))
    mha = layers.MultiHeadAttention(num_heads=2, key_dim=4)
    outputs = mha(query=inputs, value=inputs)
    model = keras.Model(inputs, outputs)
    pruned = kprune.prune_low_magnitude(model)
    x = np.random.default_rng(0).normal(size=(2, 4, 8)).astype("float32")
    np.testing.assert_allclose(
        pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
