"""Every layer of `keras.layers`: prunable, nothing to prune, or rejected."""

import inspect

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from kprune import registry
from kprune.wrapper import collect_pruned_layers
from testing import pruned_weights

# The coverage table of docs/layers.md. A class missing here fails
# `test_every_keras_layer_is_classified`: none falls through silently.
PRUNABLE = {
    "Dense": ["kernel"],
    "EinsumDense": ["kernel"],
    "Conv1D": ["kernel"],
    "Conv2D": ["kernel"],
    "Conv3D": ["kernel"],
    "Conv1DTranspose": ["kernel"],
    "Conv2DTranspose": ["kernel"],
    "Conv3DTranspose": ["kernel"],
    "DepthwiseConv1D": ["kernel"],
    "DepthwiseConv2D": ["kernel"],
    "SeparableConv1D": ["depthwise_kernel", "pointwise_kernel"],
    "SeparableConv2D": ["depthwise_kernel", "pointwise_kernel"],
    "Embedding": ["embeddings"],
    "ReversibleEmbedding": ["embeddings", "reverse_embeddings"],
    "MultiHeadAttention": ["kernel"] * 4,
    "GroupQueryAttention": ["kernel"] * 4,
    "SimpleRNN": ["kernel", "recurrent_kernel"],
    "SimpleRNNCell": ["kernel", "recurrent_kernel"],
    "LSTM": ["kernel", "recurrent_kernel"],
    "LSTMCell": ["kernel", "recurrent_kernel"],
    "GRU": ["kernel", "recurrent_kernel"],
    "GRUCell": ["kernel", "recurrent_kernel"],
    "RNN": ["kernel", "recurrent_kernel"] * 2,  # StackedRNNCells of 2
    "StackedRNNCells": ["kernel", "recurrent_kernel"] * 2,
    "ConvLSTM1D": ["kernel", "recurrent_kernel"],
    "ConvLSTM2D": ["kernel", "recurrent_kernel"],
    "ConvLSTM3D": ["kernel", "recurrent_kernel"],
    "Bidirectional": ["kernel", "recurrent_kernel"] * 2,
    "TimeDistributed": ["kernel"],
    "SpectralNormalization": ["kernel"],
}
NOTHING_TO_PRUNE_WITH_WEIGHTS = {
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
    "Normalization",
    "PReLU",
    "Attention",
    "AdditiveAttention",
    "STFTSpectrogram",
}
REJECTED = {"JaxLayer", "FlaxLayer", "TorchModuleWrapper", "TFSMLayer"}
NOT_LAYERS = {"InputSpec", "Layer", "Wrapper"}  # abstract or not a layer

# Layers built by calling them on one input of this shape (batch 2)...
IMAGE = (8, 8, 3)
INPUT_SHAPES = {
    "Conv1D": (8, 3),
    "Conv1DTranspose": (8, 3),
    "Conv3D": (4, 4, 4, 3),
    "Conv3DTranspose": (4, 4, 4, 3),
    "DepthwiseConv1D": (8, 3),
    "SeparableConv1D": (8, 3),
    "SimpleRNN": (5, 3),
    "LSTM": (5, 3),
    "GRU": (5, 3),
    "RNN": (5, 3),
    "Bidirectional": (5, 3),
    "TimeDistributed": (5, 3),
    "ConvLSTM1D": (3, 8, 2),
    "ConvLSTM2D": (3, 6, 6, 2),
    "ConvLSTM3D": (3, 4, 4, 4, 2),
    "Dense": (3,),
    "EinsumDense": (3,),
    "SpectralNormalization": (3,),
    "Embedding": (4,),
    "ReversibleEmbedding": (4,),
    "MelSpectrogram": (256,),
    "STFTSpectrogram": (64, 1),
}
# ... with these arguments.
MAKERS = {
    "Dense": lambda: layers.Dense(4),
    "EinsumDense": lambda: layers.EinsumDense("ab,bc->ac", (4,), bias_axes="c"),
    "Conv1D": lambda: layers.Conv1D(4, 3),
    "Conv2D": lambda: layers.Conv2D(4, 3),
    "Conv3D": lambda: layers.Conv3D(4, 3),
    "Conv1DTranspose": lambda: layers.Conv1DTranspose(4, 3),
    "Conv2DTranspose": lambda: layers.Conv2DTranspose(4, 3),
    "Conv3DTranspose": lambda: layers.Conv3DTranspose(4, 3),
    "DepthwiseConv1D": lambda: layers.DepthwiseConv1D(3),
    "DepthwiseConv2D": lambda: layers.DepthwiseConv2D(3),
    "SeparableConv1D": lambda: layers.SeparableConv1D(4, 3),
    "SeparableConv2D": lambda: layers.SeparableConv2D(4, 3),
    "Embedding": lambda: layers.Embedding(10, 4),
    "ReversibleEmbedding": lambda: layers.ReversibleEmbedding(
        10, 4, tie_weights=False
    ),
    "SimpleRNN": lambda: layers.SimpleRNN(4),
    "LSTM": lambda: layers.LSTM(4),
    "GRU": lambda: layers.GRU(4),
    "SimpleRNNCell": lambda: layers.SimpleRNNCell(4),
    "LSTMCell": lambda: layers.LSTMCell(4),
    "GRUCell": lambda: layers.GRUCell(4),
    "RNN": lambda: layers.RNN([layers.LSTMCell(4), layers.GRUCell(3)]),
    "StackedRNNCells": lambda: layers.StackedRNNCells(
        [layers.SimpleRNNCell(4), layers.SimpleRNNCell(3)]
    ),
    "ConvLSTM1D": lambda: layers.ConvLSTM1D(2, 3),
    "ConvLSTM2D": lambda: layers.ConvLSTM2D(2, 3),
    "ConvLSTM3D": lambda: layers.ConvLSTM3D(2, 3),
    "Bidirectional": lambda: layers.Bidirectional(layers.LSTM(4)),
    "TimeDistributed": lambda: layers.TimeDistributed(layers.Dense(4)),
    "SpectralNormalization": lambda: layers.SpectralNormalization(
        layers.Dense(4)
    ),
    "MultiHeadAttention": lambda: layers.MultiHeadAttention(2, 4),
    "GroupQueryAttention": lambda: layers.GroupQueryAttention(4, 4, 2),
    "PReLU": lambda: layers.PReLU(),
    "Normalization": lambda: layers.Normalization(),
    "GroupNormalization": lambda: layers.GroupNormalization(groups=3),
    "Attention": lambda: layers.Attention(use_scale=True),
    "AdditiveAttention": lambda: layers.AdditiveAttention(use_scale=True),
    "STFTSpectrogram": lambda: layers.STFTSpectrogram(
        frame_length=16, frame_step=8, fft_length=16
    ),
}


def keras_layer_classes():
    return sorted(
        name
        for name, obj in vars(keras.layers).items()
        if inspect.isclass(obj) and not name.startswith("_")
    )


def canonical(name):
    """Aliases (Convolution2D, MaxPool2D...) share their class's entry,
    under the public name the class's own name has, when it has one."""
    cls = getattr(keras.layers, name)
    if getattr(keras.layers, cls.__name__, None) is cls:
        return cls.__name__
    return name


def built_layer(name):
    layer = MAKERS.get(name, getattr(keras.layers, name))()
    if name in ("Attention", "AdditiveAttention"):
        x = np.zeros((2, 5, 4), "float32")
        layer([x, x])
    elif name in ("MultiHeadAttention", "GroupQueryAttention"):
        x = np.zeros((2, 5, 4), "float32")
        layer(x, x)
    elif name in ("SimpleRNNCell", "LSTMCell", "GRUCell", "StackedRNNCells"):
        layer.build((2, 3))
    elif name in ("Embedding", "ReversibleEmbedding"):
        layer(np.zeros((2, 4), "int32"))
    else:
        layer(np.zeros((2, *INPUT_SHAPES.get(name, IMAGE)), "float32"))
    return layer


def test_every_keras_layer_is_classified():
    known = (
        set(PRUNABLE)
        | NOTHING_TO_PRUNE_WITH_WEIGHTS
        | REJECTED
        | NOT_LAYERS
        | WEIGHTLESS
    )
    missing = {canonical(n) for n in keras_layer_classes()} - known
    assert not missing, (
        f"classify these layers in tests/test_layers.py: {missing}"
    )


# Everything else in `keras.layers` has no weights (or only preprocessing
# state that is not a Keras weight): checked by building each one below.
WEIGHTLESS = {
    canonical(n)
    for n in dir(keras.layers)
    if inspect.isclass(getattr(keras.layers, n))
} - (set(PRUNABLE) | NOTHING_TO_PRUNE_WITH_WEIGHTS | REJECTED | NOT_LAYERS)


def test_prunable_layers_prune_exactly_their_kernels():
    # One test for the whole table: each test's Keras session teardown
    # costs more than checking a layer.
    for name in sorted(PRUNABLE):
        layer = built_layer(name)
        assert registry.status(layer) == registry.PRUNABLE, name
        weights = registry.get_prunable_weights(layer)
        assert [w.name for w in weights] == PRUNABLE[name], name
        trainable = {id(w) for w in layer.trainable_weights}
        assert all(id(w) in trainable for w in weights), name
        wrapped = kprune.prune_low_magnitude(layer)
        assert isinstance(wrapped, kprune.PruneLowMagnitude), name


def test_layers_with_nothing_worth_pruning_are_kept_dense():
    for name in sorted(NOTHING_TO_PRUNE_WITH_WEIGHTS):
        layer = built_layer(name)
        assert layer.weights, f"{name}: this table lists layers with weights"
        assert registry.status(layer) == registry.NOTHING_TO_PRUNE, name
        assert kprune.prune_low_magnitude(layer) is layer, name


def test_weightless_layers_are_kept_as_they_are():
    for name in sorted(WEIGHTLESS):
        layer = weightless_instance(name)
        if not layer.built:
            try:
                layer(np.zeros((2, *INPUT_SHAPES.get(name, IMAGE)), "float32"))
            except Exception:
                # Inputs of another kind (strings, pairs of tensors):
                # building such a layer creates no Keras weight either.
                layer.built = True
        assert not layer.weights, name
        assert registry.status(layer) == registry.NOTHING_TO_PRUNE, name
        assert kprune.prune_low_magnitude(layer) is layer, name


def weightless_instance(name):
    if name in MAKERS:
        return MAKERS[name]()
    try:
        return _weightless_with_arguments(name)
    except KeyError:
        return getattr(keras.layers, name)()


def _weightless_with_arguments(name):
    args = {
        "Activation": ("relu",),
        "CategoryEncoding": (4,),
        "Cropping1D": (1,),
        "CenterCrop": (4, 4),
        "Discretization": ([0.0, 1.0],),
        "TextVectorization": (),
        "IntegerLookup": (),
        "Dropout": (0.1,),
        "AlphaDropout": (0.1,),
        "GaussianDropout": (0.1,),
        "GaussianNoise": (0.1,),
        "HashedCrossing": (4,),
        "Hashing": (4,),
        "Lambda": (lambda x: x,),
        "Permute": ((2, 1, 3),),
        "RandomCrop": (4, 4),
        "RandomRotation": (0.1,),
        "RandomTranslation": (0.1, 0.1),
        "RandomZoom": (0.1,),
        "RandomContrast": (0.1,),
        "RandomBrightness": (0.1,),
        "RepeatVector": (2,),
        "Rescaling": (0.5,),
        "Reshape": ((-1,),),
        "Resizing": (4, 4),
        "SpatialDropout1D": (0.1,),
        "SpatialDropout2D": (0.1,),
        "SpatialDropout3D": (0.1,),
        "AveragePooling1D": (2,),
        "AveragePooling2D": (2,),
        "AveragePooling3D": (2,),
        "MaxPooling1D": (2,),
        "MaxPooling2D": (2,),
        "MaxPooling3D": (2,),
        "InputLayer": ((3,),),
        "AdaptiveAveragePooling1D": (2,),
        "AdaptiveAveragePooling2D": (2,),
        "AdaptiveAveragePooling3D": (2,),
        "AdaptiveMaxPooling1D": (2,),
        "AdaptiveMaxPooling2D": (2,),
        "AdaptiveMaxPooling3D": (2,),
        "Pipeline": ([],),
        "RandomShear": (0.1,),
        "RandomPerspective": (),
        "RandomGaussianBlur": (),
        "MaxNumBoundingBoxes": (2,),
        "Dot": (1,),
        "RandomHue": (0.1, (0, 255)),
        "RandomSaturation": (0.1,),
        "RandomSharpness": (0.1,),
        "RandomColorDegeneration": (0.1,),
        "RandomPosterization": ((0, 255),),
        "RandomErasing": (),
    }[name]
    return getattr(keras.layers, name)(*args)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_layer_owned_by_another_framework_is_rejected_clearly(name):
    cls = getattr(keras.layers, name)

    class Fake(cls):
        def __init__(self):
            keras.layers.Layer.__init__(self, name="foreign")

    layer = Fake()
    assert registry.status(layer) == registry.REJECTED
    with pytest.raises(ValueError, match="foreign.*cannot be pruned"):
        kprune.prune_low_magnitude(layer)
    model = keras.Sequential([layers.Dense(2), Fake()])
    with pytest.raises(ValueError, match="foreign.*clone_function"):
        kprune.prune_low_magnitude(model)


def sequence_model():
    tokens = keras.Input((6,), dtype="int32")
    x = layers.Embedding(20, 8)(tokens)
    x = layers.MultiHeadAttention(2, 4)(x, x)
    x = layers.GroupQueryAttention(4, 2, 1)(x, x)
    x = layers.Bidirectional(layers.LSTM(4, return_sequences=True))(x)
    x = layers.GRU(4, return_sequences=True)(x)
    x = layers.SimpleRNN(4, return_sequences=True)(x)
    cells = [layers.LSTMCell(4), layers.GRUCell(4)]
    x = layers.RNN(cells, return_sequences=True)(x)
    x = layers.TimeDistributed(layers.Dense(4))(x)
    x = layers.EinsumDense("abc,cd->abd", (6, 4))(x)
    x = layers.SpectralNormalization(layers.Dense(4))(x)
    x = layers.Flatten()(x)
    return keras.Model(tokens, layers.Dense(3)(x)), (6,), "int32"


def conv_model(rank):
    shape = {1: (8, 4), 2: (8, 8, 4), 3: (4, 4, 4, 4)}[rank]
    inputs = keras.Input(shape)
    x = getattr(layers, f"Conv{rank}D")(4, 3, padding="same")(inputs)
    x = getattr(layers, f"Conv{rank}DTranspose")(4, 3, padding="same")(x)
    if rank < 3:
        x = getattr(layers, f"DepthwiseConv{rank}D")(3, padding="same")(x)
        x = getattr(layers, f"SeparableConv{rank}D")(4, 3, padding="same")(x)
    x = layers.Reshape((2, -1, 4))(x) if rank == 1 else x
    x = layers.Reshape((2, *shape[:-1][:-1], -1, 4))(x) if rank > 1 else x
    conv_lstm = getattr(layers, f"ConvLSTM{rank}D")(2, 3, padding="same")
    x = layers.Flatten()(conv_lstm(x))
    return keras.Model(inputs, layers.Dense(3)(x)), shape, "float32"


def eager(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


MODELS = {
    "sequence": sequence_model,
    "conv1d": lambda: conv_model(1),
    "conv2d": lambda: conv_model(2),
    "conv3d": lambda: conv_model(3),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_prunable_layer_kind_trains_to_target_strips_and_saves(
    kind, tmp_path
):
    model, shape, dtype = MODELS[kind]()
    rng = np.random.default_rng(0)
    if dtype == "int32":
        x = rng.integers(0, 20, size=(8, *shape)).astype("int32")
    else:
        x = rng.normal(size=(8, *shape)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    pruned = kprune.prune_low_magnitude(
        model, kprune.ConstantSparsity(0.6, 0, frequency=1)
    )
    wrapped = {type(w.layer).__name__ for w in collect_pruned_layers(pruned)}
    kept = {type(layer).__name__ for layer in model.layers} - wrapped
    assert kept <= {"InputLayer", "Flatten", "Reshape"}, kept
    pruned.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    pruned.fit(
        x,
        y,
        batch_size=4,
        epochs=1,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    for weight, mask in pruned_weights(pruned):
        kept_count = max(int(np.round(weight.size * 0.4)), 1)
        assert mask.sum() == kept_count
        assert np.count_nonzero(weight[~mask]) == 0
    # Eager calls: tracing a `predict` function per model costs more
    # than these tiny models.
    expected = eager(pruned, x)
    stripped = kprune.strip_pruning(pruned)
    assert not collect_pruned_layers(stripped)
    np.testing.assert_allclose(eager(stripped, x), expected, atol=1e-5)
    pruned.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for (w1, m1), (w2, m2) in zip(
        pruned_weights(pruned), pruned_weights(loaded)
    ):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(eager(loaded, x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "layer",
    [layers.Dropout(0.5), layers.LayerNormalization()],
    ids=["Dropout", "LayerNormalization"],
)
def test_layer_with_nothing_to_prune_can_be_wrapped_as_in_tfmot(layer):
    wrapper = kprune.PruneLowMagnitude(layer)
    model = keras.Sequential(
        [keras.Input((4,)), layers.Dense(8), wrapper, layers.Dense(2)]
    )
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(
        x,
        np.zeros((8, 2), "float32"),
        batch_size=4,
        verbose=0,
        callbacks=[kprune.UpdatePruningStep()],
    )
    assert wrapper.pruning_vars == []
    stripped = kprune.strip_pruning(model)
    assert type(stripped.layers[1]) is type(layer)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_unknown_layer_error_lists_its_real_weight_names():
    class ThirdParty(layers.Layer):
        def build(self, shape):
            self.table = self.add_weight(shape=(shape[-1], 3))
            self._scale = self.add_weight(shape=(3,))

        @property
        def scale(self):
            return self._scale

        def call(self, x):
            return (x @ self.table) * self.scale

    model = keras.Sequential([keras.Input((4,)), ThirdParty(name="third")])
    with pytest.raises(ValueError) as error:
        kprune.prune_low_magnitude(model)
    message = str(error.value)
    assert "`table` (4, 3), `scale` (3,)" in message
    # A vector such as `scale` is never pruned, so it is not suggested.
    assert "register_prunable_layer(ThirdParty, ['table'])" in message
    assert "'kernel'" not in message


def test_registered_name_that_is_not_a_weight_lists_the_real_ones():
    class ThirdParty(layers.Layer):
        def build(self, shape):
            self.table = self.add_weight(shape=(shape[-1], 3))

        def call(self, x):
            return x @ self.table

    kprune.register_prunable_layer(ThirdParty, ["kernel"])
    layer = ThirdParty(name="third")
    layer.build((None, 4))
    with pytest.raises(ValueError, match=r"no weight 'kernel'.*\['table'\]"):
        registry.get_prunable_weights(layer)


class _Embedder(layers.Layer):
    """A patch embedding as vision transformers write it: a kernel in a
    sublayer, a learned class token, a bias and a non-trainable row of
    position ids held by the layer itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.projection = layers.Dense(4, name="projection")

    def build(self, shape):
        self.projection.build(shape)
        self.class_token = self.add_weight(shape=(1, 1, 4))
        self.bias = self.add_weight(shape=(4,), initializer="zeros")
        self.position_ids = self.add_weight(
            shape=(1, 3), initializer="zeros", trainable=False
        )

    def call(self, x):
        token = keras.ops.broadcast_to(
            self.class_token, (keras.ops.shape(x)[0], 1, 4)
        )
        return keras.ops.concatenate([token, self.projection(x)], 1) + (
            self.bias
        )


def test_vectors_of_a_layer_need_no_registration():
    model = keras.Sequential([keras.Input((3, 5)), _Embedder(name="embed")])
    assert registry.status(model.layers[0]) == registry.PRUNABLE
    pruned = kprune.prune_low_magnitude(model)
    (wrapper,) = collect_pruned_layers(pruned)
    assert [w for w, _, _ in wrapper.pruning_vars] == [
        wrapper.layer.projection.kernel
    ]


def test_unknown_weight_next_to_sublayers_names_their_weights_too():
    # A registration replaces kprune's choice for the whole layer, so the
    # suggested one keeps the sublayer's kernel pruned.
    class Table(_Embedder):
        def build(self, shape):
            super().build(shape)
            self.table = self.add_weight(shape=(3, 4))

    model = keras.Sequential([keras.Input((3, 5)), Table(name="embed")])
    suggested = "register_prunable_layer(Table, ['table', 'projection.kernel'])"
    with pytest.raises(ValueError) as error:
        kprune.prune_low_magnitude(model)
    assert suggested in str(error.value)
    kprune.register_prunable_layer(Table, ["table", "projection.kernel"])
    pruned = kprune.prune_low_magnitude(model)
    (wrapper,) = collect_pruned_layers(pruned)
    assert [w for w, _, _ in wrapper.pruning_vars] == [
        wrapper.layer.table,
        wrapper.layer.projection.kernel,
    ]


def test_unbuilt_layer_holding_a_weight_fails_naming_a_registration():
    # As keras-hub's SmolLM3 rotary embedding: a weight made in `__init__`,
    # and never built, so its own `build` may make more.
    class Rotary(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inv_freq = self.add_weight(shape=(2,), trainable=False)

        def call(self, x):
            return x

    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(4)
            self.rotary = Rotary(name="rotary")

        def build(self, shape):
            self.dense.build(shape)

        def call(self, x):
            return self.dense(x)

    model = keras.Sequential([keras.Input((3,)), Block(name="block")])
    with pytest.raises(ValueError) as error:
        kprune.prune_low_magnitude(model)
    message = str(error.value)
    assert "`inv_freq` (2,)) and is not built" in message
    assert "register_prunable_layer(Rotary, [])" in message
    kprune.register_prunable_layer(Rotary, [])
    pruned = kprune.prune_low_magnitude(model)
    (wrapper,) = collect_pruned_layers(pruned)
    assert [w for w, _, _ in wrapper.pruning_vars] == [
        wrapper.layer.dense.kernel
    ]
