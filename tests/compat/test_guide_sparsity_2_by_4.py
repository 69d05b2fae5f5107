"""tfmot's guide `pruning_with_sparsity_2_by_4.ipynb`, run on kprune.

Its code cells in order, changed only where marked `# kprune:` (the import,
local data instead of the MNIST download, no plot windows, and the names
of TFLite tensors, which Keras 3 names differently). The guide uses
`tf.lite`, so it runs on the TensorFlow backend.
"""

# ruff: noqa: I001, UP031, UP032, F811
# (the guide's code as written: its imports and string formatting)

import matplotlib
import pytest
from compat_helpers import load_mnist_like
from compat_helpers import tfmot as _tfmot

from testing import requires_tensorflow

pytestmark = [requires_tensorflow, pytest.mark.slow]


def test_pruning_with_sparsity_2_by_4_guide_runs(monkeypatch):
    matplotlib.use("Agg")  # kprune: no plot windows in a test.

    import tensorflow as tf
    from tensorflow import keras

    # kprune: in place of `import tensorflow_model_optimization as tfmot`.
    tfmot = _tfmot
    prune_low_magnitude = tfmot.sparsity.keras.prune_low_magnitude

    # Load MNIST dataset.
    # kprune: local data instead of `keras.datasets.mnist.load_data()`.
    (train_images, train_labels), (test_images, test_labels) = load_mnist_like(
        train=1024
    )

    # Normalize the input image so that each pixel value is between 0 and 1.
    train_images = train_images / 255.0
    test_images = test_images / 255.0

    pruning_params_2_by_4 = {
        "sparsity_m_by_n": (2, 4),
    }

    pruning_params_sparsity_0_5 = {
        "pruning_schedule": tfmot.sparsity.keras.ConstantSparsity(
            target_sparsity=0.5, begin_step=0, frequency=100
        )
    }

    model = keras.Sequential(
        [
            prune_low_magnitude(
                keras.layers.Conv2D(
                    32,
                    5,
                    padding="same",
                    activation="relu",
                    input_shape=(28, 28, 1),
                    name="pruning_sparsity_0_5",
                ),
                **pruning_params_sparsity_0_5,
            ),
            keras.layers.MaxPooling2D((2, 2), (2, 2), padding="same"),
            prune_low_magnitude(
                keras.layers.Conv2D(
                    64, 5, padding="same", name="structural_pruning"
                ),
                **pruning_params_2_by_4,
            ),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D((2, 2), (2, 2), padding="same"),
            keras.layers.Flatten(),
            prune_low_magnitude(
                keras.layers.Dense(
                    1024, activation="relu", name="structural_pruning_dense"
                ),
                **pruning_params_2_by_4,
            ),
            keras.layers.Dropout(0.4),
            keras.layers.Dense(10),
        ]
    )

    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    model.summary()

    batch_size = 128
    epochs = 2

    model.fit(
        train_images,
        train_labels,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=tfmot.sparsity.keras.UpdatePruningStep(),
        validation_split=0.1,
    )

    _, pruned_model_accuracy = model.evaluate(
        test_images, test_labels, verbose=0
    )
    print("Pruned test accuracy:", pruned_model_accuracy)

    model = tfmot.sparsity.keras.strip_pruning(model)

    import tempfile

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    tflite_model = converter.convert()

    _, tflite_file = tempfile.mkstemp(".tflite")
    print("Saved converted pruned model to:", tflite_file)
    with open(tflite_file, "wb") as f:
        f.write(tflite_model)

    # Load tflite file with the created pruned model
    interpreter = tf.lite.Interpreter(model_path=tflite_file)
    interpreter.allocate_tensors()

    details = interpreter.get_tensor_details()

    # Weights of the dense layer that has been pruned.
    # kprune: Keras 3 names the tensor "<layer>_1/MatMul".
    tensor_name = "structural_pruning_dense_1/MatMul"
    detail = [x for x in details if tensor_name in x["name"]]

    # We need the first layer.
    tensor_data = interpreter.tensor(detail[0]["index"])()

    print(f"Shape of Dense layer is {tensor_data.shape}")

    import matplotlib.pyplot as plt
    import numpy as np

    # The value 24 is chosen for convenience.
    width = height = 24

    subset_values_to_display = tensor_data[0:height, 0:width]

    val_ones = np.ones([height, width])
    val_zeros = np.zeros([height, width])
    subset_values_to_display = np.where(
        abs(subset_values_to_display) > 0, val_ones, val_zeros
    )

    # kprune: the Dense weights in the TFLite file are 2:4 sparse along the
    # input channels (TFLite stores them as [out, in]).
    dense_weights = interpreter.tensor(detail[0]["index"])()
    assert dense_weights.shape == (1024, 3136)
    groups = (dense_weights.reshape(1024, -1, 4) != 0).sum(axis=-1)
    assert groups.max() <= 2

    def plot_separation_lines(height, width):
        block_size = [1, 4]

        # Add separation lines to the figure.
        num_hlines = int((height - 1) / block_size[0])
        num_vlines = int((width - 1) / block_size[1])
        line_y_pos = [y * block_size[0] for y in range(1, num_hlines + 1)]
        line_x_pos = [x * block_size[1] for x in range(1, num_vlines + 1)]

        for y_pos in line_y_pos:
            plt.plot([-0.5, width], [y_pos - 0.5, y_pos - 0.5], color="w")

        for x_pos in line_x_pos:
            plt.plot([x_pos - 0.5, x_pos - 0.5], [-0.5, height], color="w")

    plot_separation_lines(height, width)

    plt.axis("off")
    plt.imshow(subset_values_to_display)
    plt.colorbar()
    plt.title("Structural pruning for Dense layer")
    plt.show()

    # Get weights of the convolutional layer that has been pruned with 2 by 4
    # sparsity.
    # kprune: Keras 3 names the kernel "<layer>_1/convolution".
    tensor_name = "structural_pruning_1/convolution"
    detail = [x for x in details if tensor_name in x["name"]]
    tensor_data = interpreter.tensor(detail[1]["index"])()
    print(f"Shape of the weight tensor is {tensor_data.shape}")

    # kprune: 2:4 along the input channels, TFLite's last axis.
    conv_groups = (tensor_data.reshape(-1, 4) != 0).sum(axis=-1)
    assert tensor_data.shape == (64, 5, 5, 32)
    assert conv_groups.max() <= 2

    weights_to_display = tf.reshape(
        tensor_data, [tf.reduce_prod(tensor_data.shape[:-1]), -1]
    )
    weights_to_display = weights_to_display[0:width, 0:height]

    val_ones = np.ones([height, width])
    val_zeros = np.zeros([height, width])
    subset_values_to_display = np.where(
        abs(weights_to_display) > 1e-9, val_ones, val_zeros
    )

    plot_separation_lines(height, width)

    plt.axis("off")
    plt.imshow(subset_values_to_display)
    plt.colorbar()
    plt.title("Structurally pruned weights for Conv2D layer")
    plt.show()

    # Get weights of the convolutional layer that has been pruned with random
    # pruning.
    # kprune: Keras 3 names the kernel "<layer>_1/convolution".
    tensor_name = "pruning_sparsity_0_5_1/convolution"
    detail = [x for x in details if tensor_name in x["name"]]
    tensor_data = interpreter.tensor(detail[0]["index"])()
    print(f"Shape of the weight tensor is {tensor_data.shape}")

    weights_to_display = tf.reshape(
        tensor_data,
        [tensor_data.shape[0], tf.reduce_prod(tensor_data.shape[1:])],
    )
    weights_to_display = weights_to_display[0:width, 0:height]

    val_ones = np.ones([height, width])
    val_zeros = np.zeros([height, width])
    subset_values_to_display = np.where(
        abs(weights_to_display) > 0, val_ones, val_zeros
    )

    plot_separation_lines(height, width)

    plt.axis("off")
    plt.imshow(subset_values_to_display)
    plt.colorbar()
    plt.title("Unstructed pruned weights for Conv2D layer")
    plt.show()
    plt.close("all")
