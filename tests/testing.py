"""Small models, data and references shared by the tests."""

import keras
import numpy as np
import pytest
from keras import layers

import kprune
from kprune.wrapper import collect_pruned_layers

requires_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="needs the TensorFlow backend",
)


def xla_compile(fn):
    """`fn` compiled with XLA by the backend (skips on torch)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    pytest.skip(f"no XLA compiler on the {backend} backend")


def slow_except(keep, values):
    """`values` for `pytest.mark.parametrize`, all but `keep` marked slow:
    `make test` runs one case of a sweep, `make test-all` every case."""
    return [
        value if value == keep else pytest.param(value, marks=pytest.mark.slow)
        for value in values
    ]


def mlp(inputs=8, hidden=16, outputs=3):
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            layers.Dense(hidden, activation="relu"),
            layers.Dense(outputs),
        ]
    )


def small_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(3),
        ]
    )


def classification_data(n=32, shape=(8,), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, classes, size=(n,))
    return x, y


def compile_classifier(model, optimizer="adam", **kwargs):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def reference_kept(size, sparsity):
    """`max(round(size * (1 - s)), 1)` in float32, as the spec says."""
    dense = np.float32(size) * (np.float32(1.0) - np.float32(sparsity))
    return max(int(np.round(dense)), 1)


def reference_magnitude_mask(weights, sparsity):
    """Keeps the largest magnitudes; among ties, the lower flat index."""
    flat = np.abs(weights.astype(np.float32)).ravel()
    k = reference_kept(flat.size, sparsity)
    order = np.lexsort((np.arange(flat.size), -flat))
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(weights.shape)


def pruned_weights(model):
    """(variable, mask) pairs of every pruned weight, as NumPy arrays."""
    return [
        (keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(m))
        for layer in collect_pruned_layers(model)
        for w, m, _ in layer.pruning_vars
    ]


def steps(model):
    return [
        int(keras.ops.convert_to_numpy(layer.pruning_step))
        for layer in collect_pruned_layers(model)
    ]


def fit_pruned(model, x, y, epochs=1, batch_size=4, callbacks=(), **kwargs):
    return model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        shuffle=False,
        callbacks=[kprune.UpdatePruningStep(), *callbacks],
        **kwargs,
    )


def inference(model, x):
    """`model`'s outputs on `x` in inference mode, as NumPy, from one eager
    call: what `predict` computes, without tracing a function per model."""
    outputs = model(x, training=False)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


def tiny_gpt2():
    """A keras-hub `GPT2CausalLM` of a few hundred weights, built offline
    (vocabulary of 8 tokens, 2 blocks of width 8)."""
    import keras_hub

    vocabulary = {"<|endoftext|>": 0, "Ġ": 1, "a": 2, "b": 3, "c": 4}
    vocabulary.update({"Ġa": 5, "Ġb": 6, "Ġc": 7})
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=["Ġ a", "Ġ b", "Ġ c"]
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=8
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    return keras_hub.models.GPT2CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )


def prune_at_once(model, sparsity=0.5):
    """Prunes `model` with `StructuredSparsity` and sets the masks of
    `sparsity` now, as a pruning step of `fit` does (much faster than
    tracing the training step of a large model)."""
    from kprune.structured import StructuredGroup

    schedule = kprune.structured.StructuredSparsity(
        kprune.ConstantSparsity(sparsity, begin_step=1, frequency=1)
    )
    pruned = kprune.prune_low_magnitude(model, schedule)
    group = StructuredGroup(pruned, collect_pruned_layers(pruned))
    weights = [
        keras.ops.convert_to_tensor(wrapper.pruning_vars[i][0])
        for wrapper, i in group.entries
    ]
    masks, _ = group.compute_masks(weights, sparsity)
    for (wrapper, i), mask in zip(group.entries, masks):
        weight, mask_variable, _ = wrapper.pruning_vars[i]
        mask_variable.assign(mask)
        weight.assign(
            keras.ops.where(mask, keras.ops.convert_to_tensor(weight), 0.0)
        )
    return pruned


def small_mobilenetv2():
    """keras.applications MobileNetV2 at alpha 0.35 on 32x32 inputs, 10
    logits: the real inverted residual graph, fast enough for a test."""
    return keras.applications.MobileNetV2(
        weights=None,
        input_shape=(32, 32, 3),
        alpha=0.35,
        classes=10,
        classifier_activation=None,
    )
