"""`PruneForLatencyOnXNNPack`: tfmot's policy for XNNPACK sparse inference."""

import contextlib
import io
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from testing import inference
from testing import requires_tensorflow

POLICY = kprune.PruneForLatencyOnXNNPack


def wrapped_names(model):
    return sorted(
        layer.layer.name
        for layer in model._flatten_layers()
        if isinstance(layer, kprune.PruneLowMagnitude)
    )


def prune(model, **kwargs):
    return kprune.prune_low_magnitude(
        model,
        pruning_schedule=kprune.ConstantSparsity(0.5, 0),
        pruning_policy=POLICY(),
        **kwargs,
    )


def stem(x, filters=8):
    """XNNPACK's sparse subgraph start: pad 1, then a 3x3 stride-2 conv."""
    x = layers.ZeroPadding2D(1)(x)
    return layers.Conv2D(filters, 3, strides=2, padding="valid")(x)


def guide_layers():
    """The model of tfmot's `pruning_for_on_device_inference` guide, fed
    flattened 28x28 RGB images."""
    return [
        keras.Input((28 * 28 * 3,)),
        layers.Reshape((28, 28, 3)),
        layers.ZeroPadding2D(padding=1),
        layers.Conv2D(8, (3, 3), strides=(2, 2), padding="valid"),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.DepthwiseConv2D((3, 3), padding="same"),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.Conv2D(16, (1, 1), name="pointwise_1"),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.ZeroPadding2D(padding=1),
        layers.DepthwiseConv2D((3, 3), strides=(2, 2), padding="valid"),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.Conv2D(32, (1, 1), name="pointwise_2"),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.GlobalAveragePooling2D(keepdims=True),
        layers.Flatten(),
        layers.Dense(10),
    ]


def guide_model(functional=False):
    model = keras.Sequential(guide_layers())
    if functional:
        inputs = keras.Input((28 * 28 * 3,))
        x = inputs
        for layer in model.layers:
            x = layer(x)
        model = keras.Model(inputs, x)
    return model


def guide_data(n=32):
    rng = np.random.default_rng(0)
    x = rng.random((n, 28 * 28 * 3), dtype=np.float32)
    return x, rng.integers(0, 10, n)


@pytest.mark.parametrize("functional", [False, True])
def test_guide_model_prunes_only_its_1x1_convolutions(functional):
    pruned = prune(guide_model(functional))
    assert wrapped_names(pruned) == ["pointwise_1", "pointwise_2"]


def on_device_guide_model(global_pooling):
    """The guide's model as written: CIFAR-10 shaped, `InputLayer`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `input_shape` is deprecated
        first = keras.layers.InputLayer(input_shape=(32, 32, 3))
    body = guide_layers()
    return keras.Sequential([first, *body[2:-3], global_pooling, *body[-2:]])


def test_on_device_guide_pruning_cells_run_as_written():
    dense_model = on_device_guide_model(layers.GlobalAveragePooling2D())
    pruning_params = {
        "pruning_schedule": kprune.PolynomialDecay(
            initial_sparsity=0.25,
            final_sparsity=0.75,
            begin_step=0,
            end_step=100,
        ),
        "pruning_policy": kprune.PruneForLatencyOnXNNPack(),
    }
    # tfmot 0.8.1 ends the sparse part at any GlobalAveragePooling2D, so
    # the guide's first try already passes (its text, older, says it
    # fails without keepdims=True); the guide catches the error either way.
    model_for_pruning = kprune.prune_low_magnitude(
        dense_model, **pruning_params
    )
    assert wrapped_names(model_for_pruning) == ["pointwise_1", "pointwise_2"]

    fixed_dense_model = on_device_guide_model(
        layers.GlobalAveragePooling2D(keepdims=True)
    )
    fixed_dense_model.set_weights(dense_model.get_weights())
    model_for_pruning = kprune.prune_low_magnitude(
        fixed_dense_model, **pruning_params
    )
    assert wrapped_names(model_for_pruning) == ["pointwise_1", "pointwise_2"]


def fit_guide_model():
    model = kprune.prune_low_magnitude(
        guide_model(),
        pruning_schedule=kprune.PolynomialDecay(
            initial_sparsity=0.25,
            final_sparsity=0.75,
            begin_step=0,
            end_step=6,
            frequency=1,
        ),
        pruning_policy=POLICY(),
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = guide_data()
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=1,
        callbacks=[kprune.UpdatePruningStep()],
        verbose=0,
    )
    return kprune.strip_pruning(model), x


@pytest.mark.slow
def test_fit_prunes_the_1x1_convolutions_to_the_final_sparsity():
    stripped, _ = fit_guide_model()
    for layer in stripped.layers:
        if not isinstance(layer, (layers.Conv2D, layers.Dense)):
            continue
        zeros = float(np.mean(keras.ops.convert_to_numpy(layer.kernel) == 0))
        if layer.name.startswith("pointwise"):
            assert zeros == pytest.approx(0.75, abs=0.02), layer.name
        else:
            assert zeros == 0.0, layer.name


@pytest.mark.slow
@requires_tensorflow
def test_sparse_tflite_file_densifies_exactly_the_1x1_convolutions(
    tmp_path,
):
    import tensorflow as tf

    stripped, x = fit_guide_model()
    converter = tf.lite.TFLiteConverter.from_keras_model(stripped)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    content = converter.convert()
    # The guide's model, pruned to 75% under the policy, follows XNNPACK's
    # sparse rules in the file too.
    (tmp_path / "guide.tflite").write_bytes(content)
    assert (
        kprune.export.xnnpack_sparse_problems(tmp_path / "guide.tflite") == []
    )

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        tf.lite.experimental.Analyzer.analyze(model_content=content)
    names = [
        line.split()[1].split("(")[0]
        for line in report.getvalue().splitlines()
        if line.strip().startswith("Op#")
    ]
    # XNNPACK reads sparse weights through DENSIFY operators: one per
    # pruned 1x1 CONV_2D; the sparse subgraph ends with MEAN.
    assert names.count("DENSIFY") == 2
    assert "MEAN" in names

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite's deprecation notice
        interpreter = tf.lite.Interpreter(model_content=content)
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], [4, x.shape[1]])
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry["index"], x[:4])
    interpreter.invoke()
    actual = interpreter.get_tensor(
        interpreter.get_output_details()[0]["index"]
    )
    np.testing.assert_allclose(actual, inference(stripped, x[:4]), atol=1e-4)


# Models XNNPACK cannot run sparse: each is refused, naming the layer.


def functional(inputs, outputs):
    return keras.Model(inputs, outputs)


def no_zero_padding():
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="first")(i)
    x = layers.Conv2D(8, 1)(x)
    return functional(i, layers.GlobalAveragePooling2D()(x))


def stem_with(shape=(8, 8, 3), pad=1, kernel=3, strides=2, dilation=1):
    i = keras.Input(shape)
    x = layers.ZeroPadding2D(pad)(i)
    x = layers.Conv2D(
        8, kernel, strides=strides, dilation_rate=dilation, name="first"
    )(x)
    x = layers.Conv2D(8, 1)(x)
    return functional(i, layers.GlobalAveragePooling2D()(x))


def ending_with(last):
    i = keras.Input((8, 8, 3))
    return functional(i, last(layers.Conv2D(8, 1)(stem(i))))


def middle(*between):
    """A valid start and end around `between` (layers or functions)."""
    i = keras.Input((16, 16, 3))
    x = stem(i)
    for layer in between:
        x = layer(x)
    return functional(i, layers.GlobalAveragePooling2D()(x))


def squeeze_excite_without_keepdims():
    i = keras.Input((8, 8, 3))
    x = stem(i)
    s = layers.GlobalAveragePooling2D(name="squeeze")(x)
    s = layers.Reshape((1, 1, 8))(s)
    x = layers.Multiply()([x, s])
    return functional(i, layers.GlobalAveragePooling2D(keepdims=True)(x))


START = "needs every input branch to start"
END = "needs every output branch to end"
MIDDLE = "lies in XNNPACK's sparse subgraph"

REFUSED = {
    "stem conv with same padding, no ZeroPadding2D": (
        no_zero_padding,
        START,
        ["'first'", "padding='same'", "ZeroPadding2D(padding=1)"],
    ),
    "stem conv on 1 channel": (
        lambda: stem_with(shape=(8, 8, 1)),
        START,
        ["'first'", "1 input channels, not 3"],
    ),
    "stem conv with stride 1": (
        lambda: stem_with(strides=1),
        START,
        ["'first'", "strides=(1, 1)"],
    ),
    "stem conv 5x5": (
        lambda: stem_with(kernel=5),
        START,
        ["'first'", "kernel_size=(5, 5)"],
    ),
    "stem padded by 2": (
        lambda: stem_with(pad=2),
        START,
        ["'first'", "not from a `ZeroPadding2D(padding=1)`"],
    ),
    "output from AveragePooling2D": (
        lambda: ending_with(layers.AveragePooling2D(2, name="pool")),
        END,
        ["'pool' (AveragePooling2D)", "GlobalAveragePooling2D(keepdims=True)"],
    ),
    "no pooling at all": (
        lambda: ending_with(layers.Conv2D(4, 1, name="last")),
        END,
        ["'last'"],
    ),
    "MaxPooling2D between": (
        lambda: middle(layers.MaxPooling2D(2, name="maxpool")),
        MIDDLE,
        ["'maxpool' (MaxPooling2D)", "MaxPooling2D is not supported"],
    ),
    "3x3 Conv2D between": (
        lambda: middle(layers.Conv2D(8, 3, padding="same", name="conv3")),
        MIDDLE,
        ["'conv3'", "only 1x1 `Conv2D`", "kernel_size=(3, 3)"],
    ),
    "1x1 Conv2D with stride 2 between": (
        lambda: middle(layers.Conv2D(8, 1, strides=2, name="strided")),
        MIDDLE,
        ["'strided'", "strides=(2, 2)"],
    ),
    "grouped 1x1 Conv2D between": (
        lambda: middle(layers.Conv2D(8, 1, groups=2, name="grouped")),
        MIDDLE,
        ["'grouped'", "groups=2"],
    ),
    "stride-2 depthwise without ZeroPadding2D": (
        lambda: middle(layers.DepthwiseConv2D(3, strides=2, name="dw")),
        MIDDLE,
        ["'dw' (DepthwiseConv2D)", "no `ZeroPadding2D(1)` before it"],
    ),
    "5x5 depthwise padded by 1": (
        lambda: middle(
            layers.ZeroPadding2D(1),
            layers.DepthwiseConv2D(5, strides=2, name="dw"),
        ),
        MIDDLE,
        ["'dw'", "no `ZeroPadding2D(2)` before it"],
    ),
    "7x7 depthwise": (
        lambda: middle(layers.DepthwiseConv2D(7, padding="same", name="dw")),
        MIDDLE,
        ["'dw'", "kernel_size=(7, 7)"],
    ),
    "depthwise with depth multiplier 2": (
        lambda: middle(
            layers.DepthwiseConv2D(
                3, padding="same", depth_multiplier=2, name="dw"
            )
        ),
        MIDDLE,
        ["'dw'", "depth_multiplier=2"],
    ),
    "dilated depthwise": (
        lambda: middle(
            layers.DepthwiseConv2D(
                3, padding="same", dilation_rate=2, name="dw"
            )
        ),
        MIDDLE,
        ["'dw'", "dilation_rate=(2, 2)"],
    ),
    "tanh activation": (
        lambda: middle(layers.Activation("tanh", name="act")),
        MIDDLE,
        ["'act' (Activation)", "activation 'tanh'"],
    ),
    "nearest upsampling": (
        lambda: middle(layers.UpSampling2D(name="up")),
        MIDDLE,
        ["'up' (UpSampling2D)", "interpolation='nearest'"],
    ),
    "batch normalization on axis 1": (
        lambda: middle(layers.BatchNormalization(axis=1, name="bn")),
        MIDDLE,
        ["'bn' (BatchNormalization)", "axis=1"],
    ),
    "global pooling without keepdims inside (squeeze-excite)": (
        squeeze_excite_without_keepdims,
        MIDDLE,
        ["'squeeze' (GlobalAveragePooling2D)", "keepdims=False"],
    ),
    "keras.ops.tanh between": (
        lambda: middle(keras.ops.tanh),
        MIDDLE,
        ["Tanh", "not supported"],
    ),
    "subtraction between (XNNPACK runs only + and * sparse)": (
        lambda: middle(lambda x: x - layers.Conv2D(8, 1)(x)),
        MIDDLE,
        ["Subtract", "not supported"],
    ),
    "ZeroPadding2D before a 1x1 convolution": (
        lambda: middle(
            layers.ZeroPadding2D(1, name="pad"), layers.Conv2D(8, 1)
        ),
        MIDDLE,
        ["'pad' (ZeroPadding2D)", "only folded into a `DepthwiseConv2D"],
    ),
    "batch normalization after an Add (not folded)": (
        lambda: middle(
            lambda x: layers.Add()([x, layers.Conv2D(8, 1)(x)]),
            layers.BatchNormalization(name="bn"),
        ),
        MIDDLE,
        ["'bn' (BatchNormalization)", "right after a `Conv2D`"],
    ),
    "stem with padding='same' at stride 2 on an even input": (
        no_zero_padding,
        START,
        ["'first'", "pads 0 above and 1 below", "no symmetric padding"],
    ),
    "stem conv dilated": (
        lambda: stem_with(strides=1, dilation=2),
        START,
        ["'first'", "dilation_rate=(2, 2)"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_model_breaking_a_sparse_inference_rule_is_refused(case):
    build, rule, fragments = REFUSED[case]
    model = build()
    with pytest.raises(ValueError, match="PruneForLatencyOnXNNPack") as info:
        prune(model)
    message = str(info.value)
    assert rule in message
    for fragment in fragments:
        assert fragment in message


def test_refused_model_is_left_unchanged():
    model = middle(layers.MaxPooling2D(2))
    before = [layer for layer in model._flatten_layers()]
    weights = [np.copy(w) for w in model.get_weights()]
    x = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)
    expected = inference(model, x)
    with pytest.raises(ValueError):
        prune(model)
    assert [layer for layer in model._flatten_layers()] == before
    assert not wrapped_names(model)
    for old, new in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_allclose(inference(model, x), expected)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.pad = layers.ZeroPadding2D(1)
            self.conv = layers.Conv2D(8, 3, strides=2)
            self.pointwise = layers.Conv2D(8, 1)
            self.pool = layers.GlobalAveragePooling2D()

        def call(self, x):
            return self.pool(self.pointwise(self.conv(self.pad(x))))

    model = Net()
    model(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ValueError, match="Sequential or functional") as info:
        prune(model)
    assert "(Net)" in str(info.value)
    assert not wrapped_names(model)


def test_model_without_an_input_shape_is_refused():
    model = keras.Sequential(
        [
            layers.ZeroPadding2D(1),
            layers.Conv2D(4, 3, strides=2),
            layers.Conv2D(8, 1),
            layers.GlobalAveragePooling2D(),
        ]
    )
    with pytest.raises(ValueError, match="must be built.*keras.Input"):
        prune(model)


# The behaviours tfmot 0.8.1's own tests check, on Keras 3.


def test_allow_pruning_accepts_only_1x1_conv2d():
    policy = POLICY()
    assert policy.allow_pruning(layers.Conv2D(4, 1))
    assert policy.allow_pruning(layers.Conv2D(4, (1, 1), strides=2))
    assert not policy.allow_pruning(layers.Conv2D(4, 3))
    assert not policy.allow_pruning(layers.DepthwiseConv2D(1))
    assert not policy.allow_pruning(layers.SeparableConv2D(4, 1))
    assert not policy.allow_pruning(layers.Dense(4))
    assert isinstance(policy, kprune.PruningPolicy)


def test_sequential_model_with_input_shape_is_pruned():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.ZeroPadding2D(1),
            layers.Conv2D(4, 3, strides=2, padding="valid"),
            layers.DepthwiseConv2D(3, padding="same"),
            layers.Conv2D(8, 1, name="pointwise"),
            layers.GlobalAveragePooling2D(),
        ]
    )
    assert wrapped_names(prune(model)) == ["pointwise"]


def test_1x1_convolutions_of_a_nested_sequential_are_pruned():
    inner = keras.Sequential(
        [layers.Conv2D(8, 1, name="a"), layers.Conv2D(16, 1, name="b")]
    )
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.ZeroPadding2D(1),
            layers.Conv2D(4, 3, strides=2),
            inner,
            layers.GlobalAveragePooling2D(),
        ]
    )
    assert wrapped_names(prune(model)) == ["a", "b"]


def test_nested_model_breaking_a_rule_is_refused_naming_its_layer():
    inner = keras.Sequential(
        [layers.Conv2D(8, 1), layers.MaxPooling2D(2, name="inner_pool")]
    )
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.ZeroPadding2D(1),
            layers.Conv2D(4, 3, strides=2),
            inner,
            layers.GlobalAveragePooling2D(),
        ]
    )
    with pytest.raises(ValueError, match="'inner_pool'"):
        prune(model)


def test_shared_1x1_convolution_is_wrapped_once():
    i = keras.Input((8, 8, 3))
    x = stem(i, filters=16)
    shared = layers.Conv2D(16, 1, name="shared")
    x = shared(shared(x))
    model = functional(i, layers.GlobalAveragePooling2D()(x))
    assert wrapped_names(prune(model)) == ["shared"]


def test_model_without_1x1_convolutions_is_accepted_and_left_dense():
    i = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, padding="same")(stem(i))
    x = layers.Activation("relu")(x)
    model = functional(i, layers.GlobalAveragePooling2D()(x))
    assert wrapped_names(prune(model)) == []


def test_two_branch_model_with_squeeze_excite_and_two_heads():
    i1 = keras.Input((16, 16, 3))
    x1 = stem(i1, filters=16)
    x1 = layers.Add()(
        [
            layers.DepthwiseConv2D(3, padding="same")(x1),
            layers.Conv2D(16, 1, name="p1")(x1),
        ]
    )
    i2 = keras.Input((16, 16, 3))
    x2 = layers.ZeroPadding2D(1)(stem(i2))
    x2 = layers.DepthwiseConv2D(3, strides=2)(x2)
    se = layers.GlobalAveragePooling2D(keepdims=True)(x2)
    se = layers.Activation("sigmoid")(layers.Conv2D(32, 1, name="p2")(se))
    up = layers.UpSampling2D(interpolation="bilinear")(
        layers.Conv2D(32, 1, name="p3")(x2)
    )
    x2 = layers.Conv2D(16, 1, name="p4")(layers.Multiply()([se, up]))
    x = layers.GlobalAveragePooling2D(keepdims=True)(layers.Add()([x1, x2]))
    outputs = [
        layers.Conv2D(7, 1, name="head1")(x),
        layers.Conv2D(3, 1, name="head2")(x),
    ]
    model = keras.Model([i1, i2], outputs)
    assert wrapped_names(prune(model)) == [
        "head1",
        "head2",
        "p1",
        "p2",
        "p3",
        "p4",
    ]


def test_second_input_that_skips_the_stem_is_refused():
    image = keras.Input((8, 8, 3), name="image")
    extra = keras.Input((8,), name="extra")
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(8, 1)(stem(image)))
    x = layers.Concatenate()([x, layers.Dense(8)(extra)])
    model = keras.Model([image, extra], layers.Dense(2, name="head")(x))
    with pytest.raises(ValueError, match=START) as info:
        prune(model)
    assert "input 'extra'" in str(info.value)
    assert "'head'" in str(info.value)


def test_model_cloned_with_shared_layers_is_pruned():
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 1, name="pointwise")(stem(i, filters=16))
    original = functional(i, layers.GlobalAveragePooling2D()(x))
    clone = keras.models.clone_model(original, clone_function=lambda x: x)
    assert wrapped_names(prune(clone)) == ["pointwise"]


def test_tensor_arithmetic_between_is_accepted():
    i = keras.Input((8, 8, 3))
    x = stem(i, filters=16)
    residual = layers.Conv2D(16, 1, name="pointwise")(x)
    x = x + residual
    x = keras.ops.relu(x * residual)
    model = functional(i, layers.GlobalAveragePooling2D()(x))
    assert wrapped_names(prune(model)) == ["pointwise"]


def test_pruning_a_pruned_model_again_keeps_one_wrapper_per_layer():
    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 1, name="pointwise")(stem(i, filters=16))
    model = functional(i, layers.GlobalAveragePooling2D()(x))
    once = prune(model)
    twice = prune(once)
    assert wrapped_names(once) == wrapped_names(twice) == ["pointwise"]


def test_layers_the_policy_skips_need_not_be_prunable():
    class Mix(keras.layers.Layer):
        # A matrix of its own: kprune cannot tell whether to prune it (a
        # vector, such as a scale, it would keep dense).
        def build(self, input_shape):
            self.mix = self.add_weight(
                shape=(input_shape[-1], input_shape[-1]), initializer="ones"
            )

        def call(self, x):
            return x @ self.mix

    i = keras.Input((8, 8, 3))
    x = layers.Conv2D(16, 1, name="pointwise")(stem(i, filters=16))
    x = layers.Flatten()(layers.GlobalAveragePooling2D(keepdims=True)(x))
    model = functional(i, Mix()(x))
    with pytest.raises(ValueError):
        kprune.prune_low_magnitude(model)  # kprune cannot prune `Mix`
    assert wrapped_names(prune(model)) == ["pointwise"]


def shared_around_depthwise(after):
    """A 1x1 convolution called before and after a depthwise one, then
    `after`."""
    i = keras.Input((8, 8, 3))
    shared = layers.Conv2D(8, 1, name="shared")
    x = shared(layers.DepthwiseConv2D(3, padding="same")(shared(stem(i))))
    return functional(i, layers.GlobalAveragePooling2D()(after(x)))


def test_layer_called_again_later_is_checked_at_each_call():
    model = shared_around_depthwise(layers.ReLU())
    assert wrapped_names(prune(model)) == ["shared"]
    model = shared_around_depthwise(layers.MaxPooling2D(2, name="maxpool"))
    with pytest.raises(ValueError, match=MIDDLE) as info:
        prune(model)
    assert "'maxpool'" in str(info.value)


def two_branch_block(pool):
    """A functional block with two outputs; `pool` ends the second one."""
    i = keras.Input((None, None, 8))
    return functional(i, [layers.Conv2D(8, 1, name="a")(i), pool(i)])


@pytest.mark.parametrize("nested_twice", [False, True])
def test_nested_functional_model_is_checked_output_by_output(nested_twice):
    def model_around(block):
        i = keras.Input((8, 8, 3))
        x = stem(i)
        if nested_twice:
            x = layers.Add()(block(x))
        a, b = block(x)
        outputs = [layers.GlobalAveragePooling2D()(t) for t in (a, b)]
        return functional(i, outputs)

    accepted = model_around(two_branch_block(layers.ReLU()))
    assert wrapped_names(prune(accepted)) == ["a"]
    refused = model_around(
        two_branch_block(
            layers.MaxPooling2D(2, 1, padding="same", name="inner_pool")
        )
    )
    with pytest.raises(ValueError, match=MIDDLE) as info:
        prune(refused)
    assert "'inner_pool'" in str(info.value)


def test_layer_without_a_config_is_named():
    class Apply(keras.layers.Layer):
        def __init__(self, fn):
            super().__init__(name="apply")
            self.fn = fn

        def call(self, x):
            return self.fn(x)

    i = keras.Input((8, 8, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(8, 1)(stem(i)))
    model = functional(i, Apply(lambda t: 2 * t)(x))
    with pytest.raises(ValueError, match="'apply' \\(Apply\\) has no config"):
        prune(model)


def mobilenet_v2_like(size=32):
    """Breaks four rules: the stem and a depthwise layer use "same"
    padding at stride 2, a max pooling sits in between and an output
    branch has no global average pooling."""
    i = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(i)
    x = layers.Conv2D(16, 1, name="expand")(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)
    x = layers.MaxPooling2D(2, name="maxpool")(x)
    x = layers.Conv2D(8, 1, name="project")(x)
    head = layers.Dense(2, name="head")(layers.GlobalAveragePooling2D()(x))
    side = layers.Flatten(name="side")(x)
    return keras.Model(i, [head, side])


def test_every_broken_rule_is_listed_with_its_layer():
    with pytest.raises(ValueError) as info:
        prune(mobilenet_v2_like())
    message = str(info.value)
    assert "(4 problems)" in message
    lines = message.splitlines()[1:]
    assert len(lines) == 4
    (start,) = [line for line in lines if START in line]
    assert "'stem'" in start and "pads 0 above and 1 below" in start
    assert any("'dw'" in line and MIDDLE in line for line in lines)
    assert any("'maxpool'" in line and MIDDLE in line for line in lines)
    (end,) = [line for line in lines if END in line]
    assert "'side'" in end


def test_symmetric_same_padding_points_to_the_rewrite():
    # On odd sizes, "same" pads a 3x3 stride-2 layer by 1 on each side.
    with pytest.raises(ValueError) as info:
        prune(mobilenet_v2_like(size=33))
    message = str(info.value)
    assert "pads 1 above and below" in message
    assert "make_xnnpack_compatible" in message


# `kprune.pruning_policy.make_xnnpack_compatible`.


def strided_same_net(size):
    """MobileNetV2-like: "same" padding at stride 2 in the stem and in a
    3x3 and a 5x5 depthwise layer; otherwise within XNNPACK's rules."""
    i = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(i)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(16, 1, name="expand")(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw3")(x)
    x = layers.DepthwiseConv2D(5, strides=2, padding="same", name="dw5")(x)
    x = layers.Conv2D(8, 1, name="project")(x)
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    return keras.Model(i, layers.Dense(2)(layers.Flatten()(x)))


def make_compatible(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = kprune.pruning_policy.make_xnnpack_compatible(model, **kwargs)
    notes = [str(w.message) for w in caught if "make_xnnpack" in str(w.message)]
    return new, notes


def test_symmetric_same_padding_is_rewritten_with_identical_outputs():
    # 33 -> 17 -> 9: "same" pads 1 (3x3) and 2 (5x5) on each side.
    model = strided_same_net(33)
    new, notes = make_compatible(model)
    assert not notes
    padding = {
        layer.name: layer.padding
        for layer in new.layers
        if isinstance(layer, layers.ZeroPadding2D)
    }
    assert padding == {
        "stem_pad": ((1, 1), (1, 1)),
        "dw3_pad": ((1, 1), (1, 1)),
        "dw5_pad": ((2, 2), (2, 2)),
    }
    for name in ("stem", "dw3", "dw5"):
        assert new.get_layer(name).padding == "valid"
        assert model.get_layer(name).padding == "same"  # input untouched
    x = np.random.default_rng(0).normal(size=(4, 33, 33, 3))
    x = x.astype("float32")
    # Called as the user's model is, on a tensor, without Keras's warning
    # that the input's structure does not match.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        outputs = inference(new, x)
    np.testing.assert_array_equal(outputs, inference(model, x))
    assert wrapped_names(prune(new)) == ["expand", "project"]


def test_asymmetric_same_padding_is_kept_and_named():
    # 32 -> 16 -> 8: TensorFlow pads 0 above, 1 below (3x3; 1 and 2 for
    # 5x5), which no symmetric padding reproduces.
    model = strided_same_net(32)
    new, notes = make_compatible(model)
    (note,) = notes
    for name in ("'stem' (Conv2D)", "'dw3' (DepthwiseConv2D)", "'dw5'"):
        assert name in note
    assert "32x32 input, padding='same' pads 0 above and 1 below" in note
    assert "8x8 input, padding='same' pads 1 above and 2 below" in note
    assert not any(isinstance(la, layers.ZeroPadding2D) for la in new.layers)
    x = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
    np.testing.assert_array_equal(
        new.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    with pytest.raises(ValueError, match="3 problems"):
        prune(new)


def test_rewrite_copies_the_weights():
    model = strided_same_net(33)
    new, _ = make_compatible(model)
    for name in ("stem", "dw3", "expand"):
        old_layer, new_layer = model.get_layer(name), new.get_layer(name)
        assert new_layer is not old_layer
        for old, copy in zip(old_layer.weights, new_layer.weights):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(old),
                keras.ops.convert_to_numpy(copy),
            )
    kernel = new.get_layer("expand").kernel
    kernel.assign(np.zeros(kernel.shape, "float32"))
    assert np.any(keras.ops.convert_to_numpy(model.get_layer("expand").kernel))


def test_sequential_and_nested_models_are_rewritten():
    inner = keras.Sequential(
        [
            keras.Input((9, 9, 8)),
            layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw"),
            layers.Conv2D(8, 1),
        ]
    )
    model = keras.Sequential(
        [
            keras.Input((17, 17, 3)),
            layers.Conv2D(8, 3, strides=2, padding="same", name="stem"),
            inner,
            layers.GlobalAveragePooling2D(),
        ]
    )
    new, notes = make_compatible(model)
    assert not notes
    x = np.random.default_rng(1).random((2, 17, 17, 3), np.float32)
    np.testing.assert_array_equal(
        new.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    assert len(wrapped_names(prune(new))) == 1


def test_make_xnnpack_compatible_refuses_subclassed_models():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="Sequential or functional"):
        kprune.pruning_policy.make_xnnpack_compatible(Net())


def asymmetric_depthwise_net(height=16, width=16):
    """Within XNNPACK's rules but for two 3x3 stride-2 depthwise layers
    padded 0 before and 1 after: "same" on an even size, and an explicit
    `ZeroPadding2D` as in `keras.applications.MobileNetV2`."""
    i = keras.Input((height, width, 3))
    x = layers.Conv2D(8, 3, strides=2, name="stem")(layers.ZeroPadding2D(1)(i))
    x = layers.Conv2D(16, 1, name="expand")(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw_same")(x)
    x = layers.ZeroPadding2D(((0, 1), (0, 1)), name="dw_pad")(x)
    x = layers.DepthwiseConv2D(3, strides=2, name="dw_explicit")(x)
    x = layers.Conv2D(8, 1, name="project")(x)
    return keras.Model(i, layers.GlobalAveragePooling2D()(x))


# (16, 14): "dw_same" reads 8x7 pixels, so pads (0, 1) and (1, 1).
@pytest.mark.parametrize("height, width", [(16, 16), (16, 14)])
def test_depthwise_5x5_rewrites_asymmetric_padding_with_equal_outputs(
    height, width
):
    model = asymmetric_depthwise_net(height, width)
    with pytest.raises(ValueError, match="2 problems") as info:
        prune(model)
    for line in str(info.value).splitlines()[1:]:
        assert "make_xnnpack_compatible(model, depthwise_5x5=True)" in line
    _, notes = make_compatible(model)
    assert "'dw_same'" in notes[0] and "depthwise_5x5=True" in notes[0]
    new, notes = make_compatible(model, depthwise_5x5=True)
    assert not notes  # nothing is left
    for name in ("dw_same", "dw_explicit"):
        layer = new.get_layer(name)
        assert tuple(layer.kernel_size) == (5, 5)
        assert layer.padding == "valid"
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        old = keras.ops.convert_to_numpy(model.get_layer(name).kernel)
        # The 3x3 taps sit where the 5x5 kernel reads the same pixels: one
        # row (column) lower where "same" pads 1 before, on odd sizes.
        _, rows, cols, _ = model.get_layer(name).input.shape
        top = 1 if name == "dw_same" and rows % 2 else 2
        left = 1 if name == "dw_same" and cols % 2 else 2
        np.testing.assert_array_equal(
            kernel[top : top + 3, left : left + 3], old
        )
        assert np.count_nonzero(kernel) == np.count_nonzero(old)
    assert new.get_layer("dw_pad").padding == ((2, 2), (2, 2))
    assert model.get_layer("dw_pad").padding == ((0, 1), (0, 1))
    x = np.random.default_rng(0).normal(size=(4, height, width, 3))
    x = x.astype("float32")
    np.testing.assert_allclose(
        new.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    assert wrapped_names(prune(new)) == ["expand", "project"]


@pytest.mark.slow
def test_keras_mobilenet_v2_is_rewritten_but_for_its_stem_on_even_sizes():
    def problems(model):
        with pytest.raises(ValueError) as info:
            prune(model)
        return str(info.value).splitlines()[1:]

    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), weights=None, classes=10
    )
    # The stem and the four stride-2 blocks pad 0 before and 1 after.
    assert len(problems(model)) == 5
    new, notes = make_compatible(model)
    assert len(problems(new)) == 5
    new = kprune.pruning_policy.make_xnnpack_compatible(
        model, depthwise_5x5=True
    )
    (stem,) = problems(new)
    assert "'Conv1'" in stem and "pads 0 above and 1 below" in stem
    # On odd sizes every stride-2 layer pads 1 on each side.
    model = keras.applications.MobileNetV2(
        input_shape=(33, 33, 3), weights=None, classes=10
    )
    new, notes = make_compatible(model)
    assert not notes
    pointwise = [la for la in new.layers if POLICY().allow_pruning(la)]
    assert len(wrapped_names(prune(new))) == len(pointwise) == 34
