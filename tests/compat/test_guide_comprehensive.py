"""tfmot's `comprehensive_guide.ipynb` (pruning), run on kprune.

Its code cells in order, changed only where marked `# kprune:`: the import,
and the pretrained-weights file name, since Keras 3 saves weights only to
`.weights.h5` files (the guide used a TensorFlow checkpoint, `.tf`). The
guide uses `tf.keras` and `tf.GradientTape`, so it runs on TensorFlow.
"""

# ruff: noqa: I001, UP031, UP032, F811
# (the guide's code as written: its imports and string formatting)

import glob
import os

import pytest
from compat_helpers import tfmot as _tfmot

from testing import requires_tensorflow

pytestmark = requires_tensorflow


def _logged_tags(log_dir):
    """The scalar tags written to the event files under `log_dir`."""
    import tensorflow as tf

    tags = set()
    for path in glob.glob(
        os.path.join(log_dir, "**", "*tfevents*"), recursive=True
    ):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


@pytest.fixture(scope="module")
def guide():
    """The guide's setup cell; returns its names."""
    import tensorflow as tf
    import numpy as np

    # kprune: in place of `import tensorflow_model_optimization as tfmot`.
    tfmot = _tfmot

    import tempfile

    input_shape = [20]
    x_train = np.random.randn(1, 20).astype(np.float32)
    y_train = tf.keras.utils.to_categorical(np.random.randn(1), num_classes=20)

    def setup_model():
        model = tf.keras.Sequential(
            [
                tf.keras.layers.Dense(20, input_shape=input_shape),
                tf.keras.layers.Flatten(),
            ]
        )
        return model

    def setup_pretrained_weights():
        model = setup_model()

        model.compile(
            loss=tf.keras.losses.categorical_crossentropy,
            optimizer="adam",
            metrics=["accuracy"],
        )

        model.fit(x_train, y_train)

        # kprune: Keras 3 saves weights to `.weights.h5` only (was '.tf').
        _, pretrained_weights = tempfile.mkstemp(".weights.h5")

        model.save_weights(pretrained_weights)

        return pretrained_weights

    def get_gzipped_model_size(model):
        # Returns size of gzipped model, in bytes.
        import os
        import zipfile

        _, keras_file = tempfile.mkstemp(".h5")
        model.save(keras_file, include_optimizer=False)

        _, zipped_file = tempfile.mkstemp(".zip")
        with zipfile.ZipFile(
            zipped_file, "w", compression=zipfile.ZIP_DEFLATED
        ) as f:
            f.write(keras_file)

        return os.path.getsize(zipped_file)

    setup_model()
    pretrained_weights = setup_pretrained_weights()
    return dict(
        tf=tf,
        np=np,
        tfmot=tfmot,
        tempfile=tempfile,
        input_shape=input_shape,
        x_train=x_train,
        y_train=y_train,
        setup_model=setup_model,
        pretrained_weights=pretrained_weights,
        get_gzipped_model_size=get_gzipped_model_size,
    )


def test_prune_whole_model(guide):
    tfmot, setup_model = guide["tfmot"], guide["setup_model"]
    pretrained_weights = guide["pretrained_weights"]

    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended.

    model_for_pruning = tfmot.sparsity.keras.prune_low_magnitude(base_model)

    model_for_pruning.summary()

    # kprune: checked.
    assert isinstance(
        model_for_pruning.layers[0], tfmot.sparsity.keras.PruneLowMagnitude
    )


def test_prune_some_layers(guide):
    tf, tfmot = guide["tf"], guide["tfmot"]
    setup_model = guide["setup_model"]
    pretrained_weights = guide["pretrained_weights"]
    input_shape = guide["input_shape"]

    # Create a base model
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)

    # Helper function uses `prune_low_magnitude` to make only the
    # Dense layers train with pruning.
    def apply_pruning_to_dense(layer):
        if isinstance(layer, tf.keras.layers.Dense):
            return tfmot.sparsity.keras.prune_low_magnitude(layer)
        return layer

    # Use `tf.keras.models.clone_model` to apply `apply_pruning_to_dense`
    # to the layers of the model.
    model_for_pruning = tf.keras.models.clone_model(
        base_model,
        clone_function=apply_pruning_to_dense,
    )

    model_for_pruning.summary()

    print(base_model.layers[0].name)

    # kprune: checked.
    assert isinstance(
        model_for_pruning.layers[0], tfmot.sparsity.keras.PruneLowMagnitude
    )
    assert not isinstance(
        model_for_pruning.layers[1], tfmot.sparsity.keras.PruneLowMagnitude
    )

    # Use `prune_low_magnitude` to make the `Dense` layer train with pruning.
    i = tf.keras.Input(shape=(20,))
    x = tfmot.sparsity.keras.prune_low_magnitude(tf.keras.layers.Dense(10))(i)
    o = tf.keras.layers.Flatten()(x)
    model_for_pruning = tf.keras.Model(inputs=i, outputs=o)

    model_for_pruning.summary()

    # Use `prune_low_magnitude` to make the `Dense` layer train with pruning.
    model_for_pruning = tf.keras.Sequential(
        [
            tfmot.sparsity.keras.prune_low_magnitude(
                tf.keras.layers.Dense(20, input_shape=input_shape)
            ),
            tf.keras.layers.Flatten(),
        ]
    )

    model_for_pruning.summary()


def test_prune_custom_layer(guide):
    tf, tfmot = guide["tf"], guide["tfmot"]
    np, input_shape = guide["np"], guide["input_shape"]

    class MyDenseLayer(
        tf.keras.layers.Dense, tfmot.sparsity.keras.PrunableLayer
    ):
        def get_prunable_weights(self):
            # Prune bias also, though that usually harms model accuracy too
            # much.
            return [self.kernel, self.bias]

    # Use `prune_low_magnitude` to make the `MyDenseLayer` layer train with
    # pruning.
    model_for_pruning = tf.keras.Sequential(
        [
            tfmot.sparsity.keras.prune_low_magnitude(
                MyDenseLayer(20, input_shape=input_shape)
            ),
            tf.keras.layers.Flatten(),
        ]
    )

    model_for_pruning.summary()

    # kprune: both weights are pruned, and the model strips.
    wrapper = model_for_pruning.layers[0]
    assert len(wrapper.pruning_vars) == 2
    stripped = tfmot.sparsity.keras.strip_pruning(model_for_pruning)
    assert type(stripped.layers[0]) is MyDenseLayer
    np.testing.assert_array_equal(
        stripped.layers[0].get_weights()[0], wrapper.layer.get_weights()[0]
    )


def test_model_fit(guide):
    tf, tfmot = guide["tf"], guide["tfmot"]
    setup_model, tempfile = guide["setup_model"], guide["tempfile"]
    x_train, y_train = guide["x_train"], guide["y_train"]

    # Define the model.
    base_model = setup_model()
    base_model.load_weights(guide["pretrained_weights"])
    model_for_pruning = tfmot.sparsity.keras.prune_low_magnitude(base_model)

    log_dir = tempfile.mkdtemp()
    callbacks = [
        tfmot.sparsity.keras.UpdatePruningStep(),
        # Log sparsity and other metrics in Tensorboard.
        tfmot.sparsity.keras.PruningSummaries(log_dir=log_dir),
    ]

    model_for_pruning.compile(
        loss=tf.keras.losses.categorical_crossentropy,
        optimizer="adam",
        metrics=["accuracy"],
    )

    model_for_pruning.fit(
        x_train,
        y_train,
        callbacks=callbacks,
        epochs=2,
    )

    # kprune: the logs hold the sparsity.
    assert any(tag.endswith("sparsity") for tag in _logged_tags(log_dir))


def test_custom_training_loop(guide):
    tf, tfmot = guide["tf"], guide["tfmot"]
    setup_model, tempfile = guide["setup_model"], guide["tempfile"]
    x_train, y_train = guide["x_train"], guide["y_train"]

    # Define the model.
    base_model = setup_model()
    base_model.load_weights(guide["pretrained_weights"])
    model_for_pruning = tfmot.sparsity.keras.prune_low_magnitude(base_model)

    # Boilerplate
    loss = tf.keras.losses.categorical_crossentropy
    optimizer = tf.keras.optimizers.Adam()
    log_dir = tempfile.mkdtemp()
    unused_arg = -1
    epochs = 2
    batches = (
        1  # example is hardcoded so that the number of batches cannot change.
    )

    # Non-boilerplate.
    model_for_pruning.optimizer = optimizer
    step_callback = tfmot.sparsity.keras.UpdatePruningStep()
    step_callback.set_model(model_for_pruning)
    log_callback = tfmot.sparsity.keras.PruningSummaries(
        log_dir=log_dir
    )  # Log sparsity and other metrics in Tensorboard.
    log_callback.set_model(model_for_pruning)

    step_callback.on_train_begin()  # run pruning callback
    for _ in range(epochs):
        log_callback.on_epoch_begin(epoch=unused_arg)  # run pruning callback
        for _ in range(batches):
            step_callback.on_train_batch_begin(
                batch=unused_arg
            )  # run pruning callback

            with tf.GradientTape() as tape:
                logits = model_for_pruning(x_train, training=True)
                loss_value = loss(y_train, logits)
                grads = tape.gradient(
                    loss_value, model_for_pruning.trainable_variables
                )
                optimizer.apply_gradients(
                    zip(grads, model_for_pruning.trainable_variables)
                )

        step_callback.on_epoch_end(batch=unused_arg)  # run pruning callback

    # kprune: the loop advanced the pruning step, and logged the sparsity.
    assert int(model_for_pruning.layers[0].pruning_step.numpy()) == 2
    assert any(tag.endswith("sparsity") for tag in _logged_tags(log_dir))


def test_checkpoint_and_deserialize(guide):
    tf, tfmot = guide["tf"], guide["tfmot"]
    setup_model, tempfile = guide["setup_model"], guide["tempfile"]

    # Define the model.
    base_model = setup_model()
    base_model.load_weights(guide["pretrained_weights"])
    model_for_pruning = tfmot.sparsity.keras.prune_low_magnitude(base_model)

    _, keras_model_file = tempfile.mkstemp(".h5")

    # Checkpoint: saving the optimizer is necessary (include_optimizer=True is
    # the default).
    model_for_pruning.save(keras_model_file, include_optimizer=True)

    # Deserialize model.
    with tfmot.sparsity.keras.prune_scope():
        loaded_model = tf.keras.models.load_model(keras_model_file)

    loaded_model.summary()

    # kprune: checked.
    assert isinstance(
        loaded_model.layers[0], tfmot.sparsity.keras.PruneLowMagnitude
    )
    os.remove(keras_model_file)


def test_export_with_size_compression(guide):
    tfmot, setup_model = guide["tfmot"], guide["setup_model"]
    get_gzipped_model_size = guide["get_gzipped_model_size"]

    # Define the model.
    base_model = setup_model()
    base_model.load_weights(guide["pretrained_weights"])
    model_for_pruning = tfmot.sparsity.keras.prune_low_magnitude(base_model)

    # Typically you train the model here.

    model_for_export = tfmot.sparsity.keras.strip_pruning(model_for_pruning)

    print("final model")
    model_for_export.summary()

    print("\n")
    print(
        "Size of gzipped pruned model without stripping: %.2f bytes"
        % (get_gzipped_model_size(model_for_pruning))
    )
    print(
        "Size of gzipped pruned model with stripping: %.2f bytes"
        % (get_gzipped_model_size(model_for_export))
    )

    # kprune: checked.
    assert not any(
        isinstance(layer, tfmot.sparsity.keras.PruneLowMagnitude)
        for layer in model_for_export.layers
    )


def test_block_sparsity(guide):
    tfmot, setup_model = guide["tfmot"], guide["setup_model"]

    base_model = setup_model()

    # For using intrinsics on a CPU with 128-bit registers, together with
    # 8-bit quantized weights, a 1x16 block size is nice because the block
    # perfectly fits into the register.
    pruning_params = {"block_size": [1, 16]}
    model_for_pruning = tfmot.sparsity.keras.prune_low_magnitude(
        base_model, **pruning_params
    )

    model_for_pruning.summary()

    # kprune: checked.
    assert model_for_pruning.layers[0].block_size == (1, 16)
