"""One-shot prunes a small model on JAX, on one device or with its Dense
kernels sharded over 8 host CPU devices by `keras.distribution.
ModelParallel`, and saves the pruned kernels (and their shardings) to an
`.npz` file.

The host device count must be set before JAX starts, so
`tests/test_oneshot_distributed.py` runs this file in a fresh interpreter:

    python tests/oneshot_sharded_job.py MODE OUT.npz

MODE is `single` or `sharded`.
"""

import os
import sys

MODE, OUT = sys.argv[1], sys.argv[2]
DEVICES = 8
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from kprune import oneshot as oneshot_module  # noqa: E402

FEATURES, HIDDEN, OUTPUTS = 32, 64, 16
CASES = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "wanda_2_4": {"method": "wanda", "sparsity_m_by_n": (2, 4)},
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt_blocks": {"method": "sparsegpt", "blocksize": 16},
    "sparsegpt_2_4": {"method": "sparsegpt", "sparsity_m_by_n": (2, 4)},
}


def build():
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(HIDDEN, activation="relu", name="hidden")
    output = keras.layers.Dense(OUTPUTS, name="output")
    return keras.Model(inputs, output(hidden(inputs)))


def weights():
    rng = np.random.default_rng(0)
    values = [
        rng.normal(size=(FEATURES, HIDDEN)),
        rng.normal(size=HIDDEN) * 0.1,
        rng.normal(size=(HIDDEN, OUTPUTS)),
        rng.normal(size=OUTPUTS) * 0.1,
    ]
    # 20 of 32 inputs weigh +-0.5: magnitude's threshold falls among these
    # ties, so its tie-break is checked too.
    values[0][:20] = 0.5 * np.sign(values[0][:20])
    return [v.astype("float32") for v in values]


def main():
    assert len(jax.devices()) == DEVICES, jax.devices()
    if MODE == "sharded":
        mesh = keras.distribution.DeviceMesh(
            (1, DEVICES), ["batch", "model"], keras.distribution.list_devices()
        )
        layout = keras.distribution.LayoutMap(mesh)
        # Kernels split by output units, over all 8 devices.
        layout["hidden/kernel"] = (None, "model")
        layout["output/kernel"] = (None, "model")
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=layout, batch_dim_name="batch"
            )
        )
    # With the kernels on the devices, no method may copy a whole kernel
    # to the host.
    host_copies = []
    matrix = oneshot_module._Linear.matrix

    def counted(linear):
        host_copies.append(linear.layer.name)
        return matrix(linear)

    oneshot_module._Linear.matrix = counted
    # The pruned kernels as computed, before `assign` lays them out again.
    written = []
    assign_tensor = oneshot_module._Linear.assign_tensor

    def recorded(linear, matrix):
        written.append(str(tuple(matrix.sharding.spec)))
        assign_tensor(linear, matrix)

    oneshot_module._Linear.assign_tensor = recorded
    x = np.random.default_rng(1).normal(size=(64, FEATURES)).astype("float32")
    results = {}
    for name, kwargs in CASES.items():
        model = build()
        model.set_weights(weights())
        host_copies.clear()
        written.clear()
        oneshot_module.oneshot(model, x, sparsity=0.5, verbose=0, **kwargs)
        results[f"copies_{name}"] = np.array(len(host_copies))
        results[f"computed_{name}"] = np.array(written)
        for layer in model.layers[1:]:
            value = layer.kernel.value
            results[f"{name}_{layer.name}"] = np.asarray(value)
            shards = {s.data.shape for s in value.addressable_shards}
            results[f"{name}_{layer.name}_shards"] = np.array(
                [len(value.addressable_shards), *sorted(shards)[0]]
            )
    np.savez(OUT, **results)


if __name__ == "__main__":
    main()
