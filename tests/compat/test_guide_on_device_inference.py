"""tfmot's guide `pruning_for_on_device_inference.ipynb`, run on kprune.

Its code cells in order, changed only where marked `# kprune:`: the
imports (kprune for tfmot, and a local stand-in for
`tensorflow_datasets` that serves small 32x32x3 images instead of the
CIFAR10 download) and the guide's shell cells, which benchmark on an
Android phone. The guide uses `tf.data` and `tf.lite`, so it runs on the
TensorFlow backend.
"""

# ruff: noqa: I001, UP031, UP032, F811
# (the guide's code as written: its imports and string formatting)

import types

import pytest
from compat_helpers import load_cifar10_like
from compat_helpers import tfmot as _tfmot

from testing import requires_tensorflow

pytestmark = [requires_tensorflow, pytest.mark.slow]


def _local_tfds():
    """What the guide uses of `tensorflow_datasets`, on local data."""
    import tensorflow as tf

    (x_train, y_train), (x_test, y_test) = load_cifar10_like(
        train=2900, test=128
    )
    split = int(0.9 * len(x_train))
    arrays = {
        "train[:90%]": (x_train[:split], y_train[:split]),
        "train[90%:]": (x_train[split:], y_train[split:]),
        "test": (x_test, y_test),
    }

    def load(name, split, as_supervised, with_info):
        assert name == "cifar10" and as_supervised and with_info
        datasets = [
            tf.data.Dataset.from_tensor_slices(arrays[s]) for s in split
        ]
        info = types.SimpleNamespace(
            splits={"train": types.SimpleNamespace(num_examples=len(x_train))}
        )
        return datasets, info

    return types.SimpleNamespace(load=load)


def test_pruning_for_on_device_inference_guide_runs(capsys):
    import tempfile

    import tensorflow as tf
    import numpy as np

    from tensorflow import keras

    # kprune: local data in place of `import tensorflow_datasets as tfds`,
    # kprune in place of `import tensorflow_model_optimization as tfmot`.
    tfds = _local_tfds()
    tfmot = _tfmot

    # Load CIFAR10 dataset.
    (ds_train, ds_val, ds_test), ds_info = tfds.load(
        "cifar10",
        split=["train[:90%]", "train[90%:]", "test"],
        as_supervised=True,
        with_info=True,
    )

    # Normalize the input image so that each pixel value is between 0 and 1.
    def normalize_img(image, label):
        """Normalizes images: `uint8` -> `float32`."""
        return tf.image.convert_image_dtype(image, tf.float32), label

    # Load the data in batches of 128 images.
    batch_size = 128

    def prepare_dataset(ds, buffer_size=None):
        ds = ds.map(
            normalize_img, num_parallel_calls=tf.data.experimental.AUTOTUNE
        )
        ds = ds.cache()
        if buffer_size:
            ds = ds.shuffle(buffer_size)
        ds = ds.batch(batch_size)
        ds = ds.prefetch(tf.data.experimental.AUTOTUNE)
        return ds

    ds_train = prepare_dataset(
        ds_train, buffer_size=ds_info.splits["train"].num_examples
    )
    ds_val = prepare_dataset(ds_val)
    ds_test = prepare_dataset(ds_test)

    # Build the dense baseline model.
    dense_model = keras.Sequential(
        [
            keras.layers.InputLayer(input_shape=(32, 32, 3)),
            keras.layers.ZeroPadding2D(padding=1),
            keras.layers.Conv2D(
                filters=8, kernel_size=(3, 3), strides=(2, 2), padding="valid"
            ),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.DepthwiseConv2D(kernel_size=(3, 3), padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(filters=16, kernel_size=(1, 1)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.ZeroPadding2D(padding=1),
            keras.layers.DepthwiseConv2D(
                kernel_size=(3, 3), strides=(2, 2), padding="valid"
            ),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(filters=32, kernel_size=(1, 1)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )

    # Compile and train the dense model for 10 epochs.
    dense_model.compile(
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer="adam",
        metrics=["accuracy"],
    )

    dense_model.fit(ds_train, epochs=10, validation_data=ds_val)

    # Evaluate the dense model.
    _, dense_model_accuracy = dense_model.evaluate(ds_test, verbose=0)

    prune_low_magnitude = tfmot.sparsity.keras.prune_low_magnitude

    # Compute end step to finish pruning after after 5 epochs.
    end_epoch = 5

    num_iterations_per_epoch = len(ds_train)
    end_step = num_iterations_per_epoch * end_epoch

    # Define parameters for pruning.
    pruning_params = {
        "pruning_schedule": tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.25,
            final_sparsity=0.75,
            begin_step=0,
            end_step=end_step,
        ),
        "pruning_policy": tfmot.sparsity.keras.PruneForLatencyOnXNNPack(),
    }

    capsys.readouterr()
    # Try to apply pruning wrapper with pruning policy parameter.
    try:
        model_for_pruning = prune_low_magnitude(dense_model, **pruning_params)
    except ValueError as e:
        print(e)

    # kprune: the guide expects this error, which names the layer to fix.
    assert "GlobalAveragePooling2D" in capsys.readouterr().out

    fixed_dense_model = keras.Sequential(
        [
            keras.layers.InputLayer(input_shape=(32, 32, 3)),
            keras.layers.ZeroPadding2D(padding=1),
            keras.layers.Conv2D(
                filters=8, kernel_size=(3, 3), strides=(2, 2), padding="valid"
            ),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.DepthwiseConv2D(kernel_size=(3, 3), padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(filters=16, kernel_size=(1, 1)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.ZeroPadding2D(padding=1),
            keras.layers.DepthwiseConv2D(
                kernel_size=(3, 3), strides=(2, 2), padding="valid"
            ),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(filters=32, kernel_size=(1, 1)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(keepdims=True),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )

    # Use the pretrained model for pruning instead of training from scratch.
    fixed_dense_model.set_weights(dense_model.get_weights())

    # Try to reapply pruning wrapper.
    model_for_pruning = prune_low_magnitude(fixed_dense_model, **pruning_params)

    # kprune: only the 1x1 convolutions are pruned, as in tfmot.
    wrapped = [
        layer.layer
        for layer in model_for_pruning.layers
        if isinstance(layer, tfmot.sparsity.keras.PruneLowMagnitude)
    ]
    assert [type(layer).__name__ for layer in wrapped] == ["Conv2D"] * 2
    assert all(layer.kernel_size == (1, 1) for layer in wrapped)

    logdir = tempfile.mkdtemp()

    callbacks = [
        tfmot.sparsity.keras.UpdatePruningStep(),
        tfmot.sparsity.keras.PruningSummaries(log_dir=logdir),
    ]

    model_for_pruning.compile(
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer="adam",
        metrics=["accuracy"],
    )

    model_for_pruning.fit(
        ds_train, epochs=15, validation_data=ds_val, callbacks=callbacks
    )

    # Evaluate the dense model.
    _, pruned_model_accuracy = model_for_pruning.evaluate(ds_test, verbose=0)

    print("Dense model test accuracy:", dense_model_accuracy)
    print("Pruned model test accuracy:", pruned_model_accuracy)

    converter = tf.lite.TFLiteConverter.from_keras_model(dense_model)
    dense_tflite_model = converter.convert()

    _, dense_tflite_file = tempfile.mkstemp(".tflite")
    with open(dense_tflite_file, "wb") as f:
        f.write(dense_tflite_model)

    model_for_export = tfmot.sparsity.keras.strip_pruning(model_for_pruning)

    converter = tf.lite.TFLiteConverter.from_keras_model(model_for_export)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    pruned_tflite_model = converter.convert()

    _, pruned_tflite_file = tempfile.mkstemp(".tflite")
    with open(pruned_tflite_file, "wb") as f:
        f.write(pruned_tflite_model)

    # kprune: the guide's last cells benchmark both files on a phone with
    # `adb shell`; here, the 1x1 kernels are 75% zeros and the pruned file
    # predicts like the pruned model.
    for layer in wrapped:
        exported = model_for_export.get_layer(layer.name)
        assert np.mean(exported.get_weights()[0] == 0) == pytest.approx(
            0.75, abs=0.01
        )
    interpreter = tf.lite.Interpreter(model_content=pruned_tflite_model)
    runner = interpreter.get_signature_runner()
    images = next(iter(ds_test))[0][:8].numpy()
    expected = model_for_export.predict(images, verbose=0)
    (got,) = runner(
        **{runner.get_input_details().popitem()[0]: images}
    ).values()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
