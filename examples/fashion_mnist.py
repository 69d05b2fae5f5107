"""Loads Fashion-MNIST without a download when the machine has it.

Order: the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist), then `keras.datasets.fashion_mnist`
(cached or downloaded), then, saying so, scikit-learn's digits upscaled to
28x28. Imports neither kprune nor TensorFlow, so the tfmot benchmark
environment can use it too.
"""

import gzip
import os
import sys

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)
    ]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist_debian(directory=DEBIAN_DIR):
    files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    x_train, y_train, x_test, y_test = (
        _read_idx(os.path.join(directory, name)) for name in files
    )
    return (x_train, y_train), (x_test, y_test)


def load_digits_as_28x28():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3)))  # 8x8 -> 24x24
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    images = (images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    images, labels = images[order], digits.target[order]
    split = int(0.8 * len(images))
    return (images[:split], labels[:split]), (images[split:], labels[split:])


def load_data(dataset):
    if dataset in ("auto", "fashion_mnist"):
        if os.path.isdir(DEBIAN_DIR):
            return "Fashion-MNIST (Debian dataset-fashion-mnist)", (
                load_fashion_mnist_debian()
            )
        try:
            import keras

            return "Fashion-MNIST (keras.datasets)", (
                keras.datasets.fashion_mnist.load_data()
            )
        except Exception as error:  # no package, no network
            if dataset == "fashion_mnist":
                raise
            print(
                "Fashion-MNIST is not available: the Debian package "
                f"dataset-fashion-mnist is not installed ({DEBIAN_DIR} is "
                "missing) and keras.datasets could not download it "
                f"({type(error).__name__}). Using scikit-learn digits "
                "instead.",
                file=sys.stderr,
            )
    return "scikit-learn digits (upscaled to 28x28)", load_digits_as_28x28()
