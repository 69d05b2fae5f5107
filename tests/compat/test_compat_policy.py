"""tfmot 0.8.1's pruning policies, through kprune's public API.

The facts come from tfmot's `pruning_policy_test.py` and the
`pruning_for_on_device_inference` guide: `PruneForLatencyOnXNNPack` prunes
only 1x1 `Conv2D` layers, after checking that the model fits XNNPACK's
sparse inference (a 3x3 stride-2 `Conv2D` on 3 channels after
`ZeroPadding2D(1)` at every input, a `GlobalAveragePooling2D` at every
output, and only supported layers in between).
"""

import keras
import pytest
from keras import layers

import kprune

PARAMS = {"pruning_schedule": kprune.ConstantSparsity(0.5, 0)}


def _policy():
    return kprune.PruneForLatencyOnXNNPack()


def _count(model):
    return sum(
        isinstance(layer, kprune.PruneLowMagnitude)
        for layer in model._flatten_layers(include_self=False)
    )


def _stem(inputs, filters=16):
    x = layers.ZeroPadding2D(padding=1)(inputs)
    return layers.Conv2D(filters, (3, 3), strides=(2, 2), padding="valid")(x)


def test_a_model_without_the_stem_is_refused():
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, (3, 3), strides=(2, 2), padding="same")(i)
    x = layers.Conv2D(16, (1, 1))(x)
    model = keras.Model(i, layers.GlobalAveragePooling2D()(x))
    with pytest.raises(ValueError, match="Conv2D"):
        kprune.prune_low_magnitude(model, pruning_policy=_policy(), **PARAMS)


def test_a_model_without_global_average_pooling_is_refused():
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, (1, 1))(_stem(i))
    model = keras.Model(i, layers.AveragePooling2D(pool_size=2)(x))
    with pytest.raises(ValueError, match="GlobalAveragePooling2D"):
        kprune.prune_low_magnitude(model, pruning_policy=_policy(), **PARAMS)


def test_an_unsupported_layer_in_between_is_named():
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, (1, 1))(_stem(i))
    x = layers.MaxPooling2D(pool_size=(2, 2), strides=(2, 2))(x)
    model = keras.Model(i, layers.GlobalAveragePooling2D()(x))
    with pytest.raises(ValueError, match="MaxPooling2D"):
        kprune.prune_low_magnitude(model, pruning_policy=_policy(), **PARAMS)


def test_only_1x1_convolutions_of_a_sequential_model_are_pruned():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.ZeroPadding2D(padding=1),
            layers.Conv2D(4, (3, 3), strides=(2, 2), padding="valid"),
            layers.DepthwiseConv2D(kernel_size=(3, 3), padding="same"),
            layers.Conv2D(8, (1, 1)),
            layers.GlobalAveragePooling2D(),
        ]
    )
    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=_policy(), **PARAMS
    )
    assert _count(pruned) == 1
    (wrapper,) = [
        layer
        for layer in pruned.layers
        if isinstance(layer, kprune.PruneLowMagnitude)
    ]
    assert wrapper.layer.kernel_size == (1, 1)


def test_nested_models_are_checked_and_pruned():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.ZeroPadding2D(padding=1),
            layers.Conv2D(4, (3, 3), strides=(2, 2), padding="valid"),
            keras.Sequential(
                [
                    keras.Input((4, 4, 4)),
                    layers.Conv2D(8, (1, 1)),
                    layers.Conv2D(16, (1, 1)),
                ]
            ),
            layers.GlobalAveragePooling2D(),
        ]
    )
    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=_policy(), **PARAMS
    )
    assert _count(pruned) == 2


def test_a_reused_convolution_is_pruned_once():
    i = keras.Input((8, 8, 3))
    conv = layers.Conv2D(16, (1, 1))
    x = conv(conv(_stem(i)))
    model = keras.Model(i, layers.GlobalAveragePooling2D()(x))
    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=_policy(), **PARAMS
    )
    assert _count(pruned) == 1


def test_a_model_with_nothing_to_prune_is_accepted():
    i = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(kernel_size=(3, 3), padding="same")(_stem(i))
    x = layers.Activation("relu")(x)
    model = keras.Model(i, layers.GlobalAveragePooling2D()(x))
    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=_policy(), **PARAMS
    )
    assert _count(pruned) == 0


def test_two_branches_with_squeeze_and_excite():
    i1 = keras.Input((16, 16, 3))
    x1 = _stem(i1)
    x1 = layers.Add()(
        [
            layers.DepthwiseConv2D((3, 3), padding="same")(x1),
            layers.Conv2D(16, (1, 1))(x1),
        ]
    )
    i2 = keras.Input((16, 16, 3))
    x2 = _stem(i2, filters=8)
    x2 = layers.ZeroPadding2D(padding=1)(x2)
    x2 = layers.DepthwiseConv2D((3, 3), strides=(2, 2), padding="valid")(x2)
    se = layers.GlobalAveragePooling2D(keepdims=True)(x2)
    se = layers.Activation("sigmoid")(layers.Conv2D(32, (1, 1))(se))
    x2_2 = layers.UpSampling2D(interpolation="bilinear")(
        layers.Conv2D(32, (1, 1))(x2)
    )
    x2 = layers.Conv2D(16, (1, 1))(layers.Multiply()([se, x2_2]))
    x = layers.GlobalAveragePooling2D(keepdims=True)(layers.Add()([x1, x2]))
    outputs = [layers.Conv2D(7, (1, 1))(x), layers.Conv2D(3, (1, 1))(x)]
    model = keras.Model([i1, i2], outputs)
    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=_policy(), **PARAMS
    )
    assert _count(pruned) == 6


def test_pruning_a_pruned_model_again_prunes_nothing_more():
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, (1, 1))(_stem(i))
    model = keras.Model(i, layers.GlobalAveragePooling2D()(x))
    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=_policy(), **PARAMS
    )
    again = kprune.prune_low_magnitude(
        pruned, pruning_policy=_policy(), **PARAMS
    )
    assert _count(pruned) == 1
    assert _count(again) == 1


def test_a_custom_policy_decides_per_layer_and_per_model():
    class KeepFirstDense(kprune.PruningPolicy):
        def allow_pruning(self, layer):
            return layer.name != "first"

        def ensure_model_supports_pruning(self, model):
            if len(model.layers) < 2:
                raise ValueError("Need two layers.")

    model = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(4, name="first"),
            layers.Dense(2, name="second"),
        ]
    )
    pruned = kprune.prune_low_magnitude(model, pruning_policy=KeepFirstDense())
    assert not isinstance(pruned.layers[0], kprune.PruneLowMagnitude)
    assert isinstance(pruned.layers[1], kprune.PruneLowMagnitude)
    single = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    with pytest.raises(ValueError, match="two layers"):
        kprune.prune_low_magnitude(single, pruning_policy=KeepFirstDense())
