"""Trains one seeded pruned model under a distribution setup, in its own
process, and saves masks, weights and steps to an `.npz` file.

Device layouts (logical CPUs, host platform devices) must be set before the
framework starts, so `tests/test_distributed.py` runs this file in a fresh
interpreter:

    python tests/distributed_job.py MODE OUT.npz [DEVICES [ALGORITHM]]

MODE is one of:
- `tf_single`: TensorFlow, default strategy.
- `tf_mirrored`: TensorFlow `MirroredStrategy` over DEVICES logical CPUs.
- `tf_mirrored_from_outside`: the same, pruning inside the scope a model
  made outside it.
- `tf_multiworker`: TensorFlow `MultiWorkerMirroredStrategy`; the cluster
  and this worker's task come from `TF_CONFIG`.
- `jax_single`: JAX, one device.
- `jax_data_parallel`: JAX `keras.distribution.DataParallel` over DEVICES
  host devices.
- `torch_single`: torch, one device.

ALGORITHM is `layer` (per-layer magnitude, the default), `global`
(`kprune.GlobalSparsity`) or `structured` (`kprune.StructuredSparsity`).
The model's weights and the data come from NumPy, so every backend starts
from the same values.
"""

import os
import sys

MODE, OUT = sys.argv[1], sys.argv[2]
DEVICES = int(sys.argv[3]) if len(sys.argv) > 3 else 1
ALGORITHM = sys.argv[4] if len(sys.argv) > 4 else "layer"
GLOBAL_BATCH = 8
SAMPLES = 64
EPOCHS = 2

os.environ["KERAS_BACKEND"] = MODE.split("_")[0].replace("tf", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if MODE == "jax_data_parallel":
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={DEVICES}"
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kprune  # noqa: E402

_DECAY = kprune.PolynomialDecay(0.2, 0.8, begin_step=2, end_step=12)
SCHEDULE = {
    "layer": _DECAY,
    "global": kprune.GlobalSparsity(_DECAY),
    "structured": kprune.StructuredSparsity(
        kprune.PolynomialDecay(0.2, 0.5, begin_step=2, end_step=12)
    ),
}[ALGORITHM]


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 8)).astype("float32")
    y = rng.integers(0, 3, size=(SAMPLES,))
    return x, y


def build_model(model=None):
    if model is None:
        model = base_model()
    pruned = kprune.prune_low_magnitude(model, SCHEDULE)
    pruned.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return pruned


def base_model():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    # From NumPy: backends draw different numbers from the same seed.
    rng = np.random.default_rng(1)
    model.set_weights(
        [rng.normal(scale=0.4, size=w.shape) for w in model.weights]
    )
    return model


def replica_values(variable):
    """Each replica's copy of a variable (one array off TensorFlow)."""
    value = variable.value
    copies = getattr(value, "values", None)
    if not isinstance(copies, (tuple, list)):
        copies = (value,)
    return [keras.ops.convert_to_numpy(v) for v in copies]


def save(model):
    layers = kprune.wrapper.collect_pruned_layers(model)
    arrays = {}
    for i, layer in enumerate(layers):
        arrays[f"step_{i}"] = np.array(
            [int(v) for v in replica_values(layer.pruning_step)]
        )
        for j, (weight, mask, _) in enumerate(layer.pruning_vars):
            arrays[f"weight_{i}_{j}"] = keras.ops.convert_to_numpy(weight)
            arrays[f"masks_{i}_{j}"] = np.stack(replica_values(mask))
    np.savez(OUT, **arrays)


def fit(model, x, y, **kwargs):
    model.fit(
        x,
        y,
        epochs=EPOCHS,
        verbose=0,
        shuffle=False,
        callbacks=[kprune.UpdatePruningStep()],
        **kwargs,
    )


def train_custom_loop(tf, strategy, model, x, y):
    options = tf.data.Options()
    # Each worker takes its slice of every global batch, so the workers
    # together see the batches that one device sees.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(GLOBAL_BATCH)
        .with_options(options)
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            per_sample = loss_fn(yb, model(xb, training=True))
            loss = tf.nn.compute_average_loss(
                per_sample, global_batch_size=GLOBAL_BATCH
            )
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply(grads, model.trainable_variables)

    @tf.function
    def train_step(xb, yb):
        strategy.run(replica_step, args=(xb, yb))

    callback = kprune.UpdatePruningStep()
    callback.set_model(model)
    callback.on_train_begin()
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    for _ in range(EPOCHS):
        for xb, yb in strategy.experimental_distribute_dataset(dataset):
            train_step(xb, yb)


def run_tensorflow():
    import tensorflow as tf

    x, y = data()
    if MODE.startswith("tf_mirrored"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES
        )
        devices = [f"/cpu:{i}" for i in range(DEVICES)]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif MODE == "tf_multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    # `tf_mirrored_from_outside`: the Keras model comes from outside the
    # scope; pruning (which clones it) happens inside.
    outside = base_model() if MODE == "tf_mirrored_from_outside" else None
    with strategy.scope():
        model = build_model(outside)
    if MODE == "tf_multiworker":
        # Keras 3's `fit` fails before the first step under a multi-worker
        # strategy (keras-team/keras#20585), so this trains as its guide
        # for custom loops does.
        train_custom_loop(tf, strategy, model, x, y)
    else:
        fit(model, x, y, batch_size=GLOBAL_BATCH)
    save(model)


def run_jax():
    import jax

    if MODE == "jax_data_parallel":
        assert len(jax.devices()) == DEVICES, jax.devices()
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=keras.distribution.list_devices()
            )
        )
    x, y = data()
    model = build_model()
    fit(model, x, y, batch_size=GLOBAL_BATCH)
    save(model)


def run_torch():
    x, y = data()
    model = build_model()
    fit(model, x, y, batch_size=GLOBAL_BATCH)
    save(model)


if __name__ == "__main__":
    {"tf": run_tensorflow, "jax": run_jax, "torch": run_torch}[
        MODE.split("_")[0]
    ]()
