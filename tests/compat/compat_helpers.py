"""Shared by the tfmot compatibility tests: the import switch and local data.

`tfmot` here is what `import tensorflow_model_optimization as tfmot` gives
tfmot code, with kprune in place of `tfmot.sparsity.keras`: the guides'
code then runs with that one line changed.
"""

import os
import sys
import types
from pathlib import Path

import numpy as np

import kprune

ROOT = Path(__file__).resolve().parents[2]

tfmot = types.SimpleNamespace(sparsity=types.SimpleNamespace(keras=kprune))


def load_mnist_like(train=7040, test=256):
    """`(x_train, y_train), (x_test, y_test)` like `mnist.load_data()`.

    28x28 uint8 images and integer labels 0-9, without a download:
    Fashion-MNIST from the Debian package when the machine has it, else
    scikit-learn's digits upscaled to 28x28 (examples/fashion_mnist.py),
    repeated up to `train` images. Cut to `train` and `test` samples: the
    guides' schedules prune every 100 steps, so the default gives their
    2 pruning epochs of batch 128 just over 100 steps.
    """
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import fashion_mnist
    finally:
        sys.path.pop(0)
    if os.path.isdir(fashion_mnist.DEBIAN_DIR):
        data = fashion_mnist.load_fashion_mnist_debian()
    else:
        data = fashion_mnist.load_digits_as_28x28()
    (x_train, y_train), (x_test, y_test) = data
    repeats = -(-train // len(x_train))
    x_train = np.concatenate([x_train] * repeats)
    y_train = np.concatenate([y_train] * repeats)
    return (x_train[:train], y_train[:train]), (x_test[:test], y_test[:test])


def load_cifar10_like(train=256, test=64):
    """Local stand-in for `tfds.load('cifar10', ...)`: 32x32x3 uint8
    images (the digits data tiled to three channels and padded) with
    their labels, as NumPy arrays."""
    (x_train, y_train), (x_test, y_test) = load_mnist_like(train, test)

    def to_rgb(images):
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        return np.repeat(images[..., None], 3, axis=-1)

    return (to_rgb(x_train), y_train), (to_rgb(x_test), y_test)
