"""StructuredSparsity through convolutional graphs: depthwise and separable
convolutions, Concatenate, squeeze-and-excitation, and the keras.applications
models built from them (MobileNetV2, DenseNet121, ...)."""

import keras
import numpy as np
import pytest
from keras import layers

import kprune
import testing
from kprune.structured import StructuredGroup
from kprune.wrapper import collect_pruned_layers


def structured(sparsity=0.5):
    return kprune.StructuredSparsity(
        kprune.ConstantSparsity(sparsity, begin_step=1, frequency=1)
    )


def randomize_batch_norms(model, seed=0):
    """Gives every BatchNormalization random statistics, scales and
    shifts, so a removed channel would leak through them if it could."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            values = []
            for weight in layer.weights:
                n = weight.shape[0]
                if "variance" in weight.path or "gamma" in weight.path:
                    values.append(rng.uniform(0.5, 1.5, n))
                else:
                    values.append(rng.normal(0.0, 0.5, n))
            layer.set_weights(values)
    return model


def mask_of(pruned, name, index=0):
    wrapper = pruned.get_layer(f"prune_low_magnitude_{name}")
    return keras.ops.convert_to_numpy(wrapper.pruning_vars[index][1])


def kept_units(pruned, name, index=0):
    mask = mask_of(pruned, name, index)
    return mask.reshape(-1, mask.shape[-1]).any(axis=0)


def assert_same_outputs(small, pruned, x, tolerance=1e-5):
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(small(x)),
        keras.ops.convert_to_numpy(pruned(x)),
        rtol=tolerance,
        atol=tolerance,
    )


def inverted_residual_model():
    """Two MobileNetV2 blocks: expand 1x1 -> BN -> ReLU6 -> pad ->
    depthwise -> BN -> ReLU6 -> project 1x1 -> BN (-> residual Add)."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0)(x)

    def block(x, name, stride):
        h = layers.Conv2D(16, 1, use_bias=False, name=f"{name}_expand")(x)
        h = layers.BatchNormalization(name=f"{name}_expand_bn")(h)
        h = layers.ReLU(6.0)(h)
        if stride == 2:
            h = layers.ZeroPadding2D(name=f"{name}_pad")(h)
        h = layers.DepthwiseConv2D(
            3,
            strides=stride,
            padding="valid" if stride == 2 else "same",
            name=f"{name}_depthwise",
        )(h)
        h = layers.BatchNormalization(name=f"{name}_depthwise_bn")(h)
        h = layers.ReLU(6.0)(h)
        h = layers.Conv2D(8, 1, name=f"{name}_project")(h)
        return layers.BatchNormalization(name=f"{name}_project_bn")(h)

    x = layers.Add(name="add")([x, block(x, "b1", 1)])
    x = block(x, "b2", 2)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="head")(x))


def test_inverted_residual_blocks_train_shrink_and_match_the_masked_model():
    keras.utils.set_random_seed(0)
    x, y = testing.classification_data(n=16, shape=(8, 8, 3))
    pruned = kprune.prune_low_magnitude(
        randomize_batch_norms(inverted_residual_model()), structured(0.5)
    )
    plan = kprune.structured_plan(pruned)
    for name in ("b1_expand", "b1_depthwise", "b2_expand", "b2_depthwise"):
        assert plan[name] is None, (name, plan[name])
    testing.compile_classifier(pruned)
    testing.fit_pruned(pruned, x, y, epochs=1)
    # The depthwise kernel is masked on the channels its input loses.
    expand = kept_units(pruned, "b2_expand")
    assert expand.sum() == 8
    depthwise = mask_of(pruned, "b2_depthwise")
    np.testing.assert_array_equal(depthwise.any(axis=(0, 1, 3)), expand)
    np.testing.assert_array_equal(depthwise.all(axis=(0, 1, 3)), expand)
    np.testing.assert_array_equal(
        mask_of(pruned, "b2_project").any(axis=(0, 1, 3)), expand
    )
    small = kprune.shrink_model(pruned)
    assert not collect_pruned_layers(small)
    assert small.get_layer("b2_expand").filters == 8
    assert small.get_layer("b2_depthwise").kernel.shape == (3, 3, 8, 1)
    assert small.get_layer("b2_depthwise").bias.shape == (8,)
    assert small.get_layer("b2_depthwise_bn").gamma.shape == (8,)
    assert small.get_layer("b2_project").kernel.shape == (1, 1, 8, 4)
    # The stem and b1's projection are added: both keep 4 of 8 filters.
    assert small.get_layer("stem").filters == 4
    assert small.get_layer("b1_project").filters == 4
    # What shrink keeps is what the masks kept.
    stripped = kprune.strip_pruning(pruned).get_layer("b2_depthwise")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(small.get_layer("b2_depthwise").kernel),
        keras.ops.convert_to_numpy(stripped.kernel)[:, :, expand, :],
    )
    assert_same_outputs(small, pruned, x)


def test_a_depthwise_convolution_with_depth_multiplier_2_is_refused():
    inputs = keras.Input((6, 6, 2))
    h = layers.Conv2D(4, 1, name="expand")(inputs)
    h = layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(h)
    h = layers.Conv2D(4, 1, name="project")(h)
    outputs = layers.Dense(2, name="head")(layers.Flatten()(h))
    pruned = kprune.prune_low_magnitude(
        keras.Model(inputs, outputs), structured(0.5)
    )
    plan = kprune.structured_plan(pruned)
    assert "its depth_multiplier is 2" in plan["depthwise"]
    assert "'depthwise' (DepthwiseConv2D)" in plan["expand"]
    assert "depth_multiplier=2" in plan["expand"]
    # Its own outputs are not a channel space, so the rest still shrinks.
    assert plan["project"] is None


# JAX compiles each eager op of a model this size, about two minutes; the
# inverted residual test above runs the same rules fast there.
@(pytest.mark.slow if keras.backend.backend() == "jax" else lambda f: f)
def test_mobilenetv2_loses_channels_in_expand_depthwise_and_project_layers():
    model = testing.small_mobilenetv2()
    pruned = testing.prune_at_once(randomize_batch_norms(model), 0.5)
    plan = kprune.structured_plan(pruned)
    depthwise = [
        layer.name
        for layer in model.layers
        if isinstance(layer, layers.DepthwiseConv2D)
    ]
    assert len(depthwise) == 17
    whole = {name: why for name, why in plan.items() if why is not None}
    assert whole == {"predictions": "its output is a model output"}
    assert set(depthwise) <= set(plan)
    small = kprune.shrink_model(pruned)
    dense = kprune.strip_pruning(pruned)
    for name in ("block_3_expand", "block_3_project", "Conv_1"):
        assert small.get_layer(name).filters == testing.reference_kept(
            dense.get_layer(name).filters, 0.5
        )
    channels = small.get_layer("block_3_expand").filters
    assert small.get_layer("block_3_depthwise").kernel.shape[-2] == channels
    assert small.get_layer("block_3_depthwise_BN").gamma.shape == (channels,)
    assert small.count_params() < 0.3 * dense.count_params()
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    assert_same_outputs(small, pruned, x, tolerance=1e-4)


def densenet_like_model():
    """A stem, a dense block of two layers (BN -> ReLU -> Conv 1x1 -> BN ->
    ReLU -> Conv 3x3, concatenated to the block's input), a transition,
    then BN -> Flatten -> Dense, as in DenseNet."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.MaxPooling2D(name="pool")(x)
    for i in (1, 2):
        h = layers.BatchNormalization(name=f"l{i}_bn1")(x)
        h = layers.Activation("relu")(h)
        h = layers.Conv2D(8, 1, name=f"l{i}_bottleneck")(h)
        h = layers.BatchNormalization(name=f"l{i}_bn2")(h)
        h = layers.Activation("relu")(h)
        h = layers.Conv2D(4, 3, padding="same", name=f"l{i}_grow")(h)
        x = layers.Concatenate(name=f"l{i}_concat")([x, h])
    x = layers.BatchNormalization(name="transition_bn")(x)
    x = layers.Conv2D(6, 1, name="transition")(x)
    x = layers.AveragePooling2D(2, name="transition_pool")(x)
    x = layers.BatchNormalization(name="final_bn")(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, layers.Dense(3, name="head")(x))


def test_dense_block_readers_lose_the_kept_channels_of_each_part():
    keras.utils.set_random_seed(1)
    x, y = testing.classification_data(n=16, shape=(8, 8, 3))
    pruned = kprune.prune_low_magnitude(
        randomize_batch_norms(densenet_like_model()), structured(0.5)
    )
    plan = kprune.structured_plan(pruned)
    assert {name for name, why in plan.items() if why is not None} == {"head"}
    testing.compile_classifier(pruned)
    testing.fit_pruned(pruned, x, y, epochs=1)
    stem, grow1, grow2 = (
        kept_units(pruned, name) for name in ("stem", "l1_grow", "l2_grow")
    )
    assert (stem.sum(), grow1.sum(), grow2.sum()) == (4, 2, 2)
    # The transition reads the concat [stem 8 | l1_grow 4 | l2_grow 4]:
    # the kept channels of each part, at its offset.
    np.testing.assert_array_equal(
        mask_of(pruned, "transition").any(axis=(0, 1, 3)),
        np.concatenate([stem, grow1, grow2]),
    )
    np.testing.assert_array_equal(
        mask_of(pruned, "l2_bottleneck").any(axis=(0, 1, 3)),
        np.concatenate([stem, grow1]),
    )
    # The head reads the flattened 2x2 positions of the transition.
    transition = kept_units(pruned, "transition")
    np.testing.assert_array_equal(
        mask_of(pruned, "head").any(axis=1), np.tile(transition, 4)
    )
    small = kprune.shrink_model(pruned)
    assert small.get_layer("l2_concat").output.shape[-1] == 4 + 2 + 2
    assert small.get_layer("transition_bn").gamma.shape == (8,)
    assert small.get_layer("l2_bn1").gamma.shape == (6,)
    assert small.get_layer("transition").kernel.shape == (1, 1, 8, 3)
    assert small.get_layer("head").kernel.shape == (4 * 3, 3)
    assert_same_outputs(small, pruned, x)


def test_a_concatenated_model_input_keeps_its_channels_and_offsets():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5,))
    a = layers.Dense(6, activation="relu", name="a")(inputs)
    both = layers.Concatenate(name="concat")([inputs, a])
    b = layers.Dense(4, activation="tanh", name="b")(both)
    model = keras.Model(inputs, layers.Dense(2, name="out")(b))
    x, y = testing.classification_data(n=16, shape=(5,), classes=2)
    pruned = kprune.prune_low_magnitude(model, structured(0.5))
    testing.compile_classifier(pruned)
    testing.fit_pruned(pruned, x, y, epochs=1)
    kept_a = kept_units(pruned, "a")
    np.testing.assert_array_equal(
        mask_of(pruned, "b").any(axis=1),
        np.concatenate([np.ones(5, bool), kept_a]),
    )
    small = kprune.shrink_model(pruned)
    assert small.get_layer("b").kernel.shape == (5 + 3, 2)
    assert_same_outputs(small, pruned, x)


def test_channels_concatenated_along_another_axis_lose_the_same_units():
    inputs = keras.Input((4, 3))
    a = layers.Dense(6, name="a")(inputs)
    b = layers.Dense(6, name="b")(inputs)
    both = layers.Concatenate(axis=1, name="time")([a, b])
    model = keras.Model(inputs, layers.Dense(2, name="out")(both))
    pruned = testing.prune_at_once(model, 0.5)
    np.testing.assert_array_equal(
        kept_units(pruned, "a"), kept_units(pruned, "b")
    )
    small = kprune.shrink_model(pruned)
    assert small.get_layer("a").units == small.get_layer("b").units == 3
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    assert_same_outputs(small, pruned, x)


def test_a_keras_ops_call_in_the_graph_keeps_the_channels_it_reads():
    inputs = keras.Input((4,))
    a = layers.Dense(6, name="a")(inputs)
    b = layers.Dense(6, name="b")(inputs)
    model = keras.Model(inputs, layers.Dense(2, name="out")(a + b))
    pruned = kprune.prune_low_magnitude(model, structured(0.5))
    plan = kprune.structured_plan(pruned)
    assert "(keras.ops Add), which kprune cannot rewire" in plan["a"]
    assert "(keras.ops Add), which kprune cannot rewire" in plan["b"]


def test_separable_and_squeeze_excitation_blocks_shrink():
    inputs = keras.Input((8, 8, 3))
    x = layers.SeparableConv2D(8, 3, padding="same", name="sep1")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Activation("swish")(x)
    se = layers.GlobalAveragePooling2D(name="squeeze")(x)
    se = layers.Reshape((1, 1, 8), name="reshape")(se)
    se = layers.Conv2D(2, 1, activation="relu", name="reduce")(se)
    se = layers.Conv2D(8, 1, activation="sigmoid", name="excite")(se)
    x = layers.Multiply(name="scale")([x, se])
    x = layers.SeparableConv2D(6, 3, name="sep2")(x)
    x = layers.GlobalMaxPooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2, name="out")(x))
    pruned = testing.prune_at_once(randomize_batch_norms(model), 0.5)
    plan = kprune.structured_plan(pruned)
    assert plan["sep1"] is plan["excite"] is plan["sep2"] is None
    small = kprune.shrink_model(pruned)
    # sep1 and excite meet in the Multiply: they lose the same channels.
    assert small.get_layer("sep1").filters == small.get_layer("excite").filters
    assert small.get_layer("reshape").output.shape[-1] == 4
    assert small.get_layer("sep2").depthwise_kernel.shape == (3, 3, 4, 1)
    assert small.get_layer("sep2").pointwise_kernel.shape == (1, 1, 4, 3)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    assert_same_outputs(small, pruned, x)


def test_masks_compile_under_xla():
    model = densenet_like_model()
    pruned = kprune.prune_low_magnitude(model, structured(0.5))
    group = StructuredGroup(pruned, collect_pruned_layers(pruned))
    weights = [
        keras.ops.convert_to_tensor(wrapper.pruning_vars[i][0])
        for wrapper, i in group.entries
    ]
    eager, _ = group.compute_masks(weights, 0.5)
    compiled = testing.xla_compile(
        lambda w: group.compute_masks(w, keras.ops.convert_to_tensor(0.5))
    )
    for got, want in zip(compiled(weights)[0], eager):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want)
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,side",
    [
        ("DenseNet121", 32),
        ("ResNet50", 32),
        ("EfficientNetB0", 32),
        ("Xception", 71),
        ("InceptionV3", 75),
    ],
)
def test_keras_applications_shrink_all_but_their_classifier(name, side):
    model = getattr(keras.applications, name)(
        weights=None,
        input_shape=(side, side, 3),
        classes=10,
        classifier_activation=None,
    )
    pruned = testing.prune_at_once(randomize_batch_norms(model), 0.5)
    plan = kprune.structured_plan(pruned)
    whole = {name: why for name, why in plan.items() if why is not None}
    assert whole == {"predictions": "its output is a model output"}
    small = kprune.shrink_model(pruned)
    assert small.count_params() < 0.3 * model.count_params()
    x = np.random.default_rng(0).uniform(0, 1, (2, side, side, 3))
    assert_same_outputs(small, pruned, x.astype("float32"), tolerance=1e-4)
