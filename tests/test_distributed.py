"""Pruning under `tf.distribute` and Keras's JAX distribution.

Each run is a fresh interpreter (`tests/distributed_job.py`): logical CPU
devices and host device counts must be set before the framework starts.
The jobs pick their backend themselves, so each test runs once, in the
suite of the backend it exercises.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from testing import requires_tensorflow

JOB = os.path.join(os.path.dirname(__file__), "distributed_job.py")

# Every test starts fresh interpreters (tens of seconds each).
pytestmark = pytest.mark.slow

requires_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="needs the JAX backend"
)


def start_job(mode, out, devices=1, env=None, algorithm="layer"):
    return subprocess.Popen(
        [sys.executable, JOB, mode, str(out), str(devices), algorithm],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, timeout=300):
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]


def run_job(tmp_path, mode, devices=1, algorithm="layer"):
    out = tmp_path / f"{mode}_{devices}_{algorithm}.npz"
    finish(start_job(mode, out, devices, algorithm=algorithm))
    return dict(np.load(out))


def assert_same_training(run, reference, replicas):
    """Masks equal on every replica and to `reference`; weights close."""
    mask_keys = [k for k in reference if k.startswith("masks_")]
    assert mask_keys
    for key in mask_keys:
        copies = run[key]
        assert len(copies) == replicas
        for copy in copies:
            np.testing.assert_array_equal(copy, reference[key][0])
        assert not copies[0].all()  # the schedule did prune
    for key in (k for k in reference if k.startswith("weight_")):
        np.testing.assert_allclose(run[key], reference[key], atol=1e-5)
    for key in (k for k in reference if k.startswith("step_")):
        # 64 samples, global batch 8, 2 epochs: 16 global steps.
        assert run[key].tolist() == [16] * len(run[key])
        assert reference[key].tolist() == [16]


@pytest.fixture(scope="module")
def tf_single(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("tf"), "tf_single")


@requires_tensorflow
@pytest.mark.parametrize(
    "mode,devices",
    [
        ("tf_mirrored", 2),
        ("tf_mirrored", 4),
        # A model made outside the scope, pruned inside it.
        ("tf_mirrored_from_outside", 2),
    ],
)
def test_mirrored_strategy_masks_match_one_device_on_every_replica(
    tmp_path, tf_single, mode, devices
):
    mirrored = run_job(tmp_path, mode, devices)
    assert_same_training(mirrored, tf_single, replicas=devices)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires_tensorflow
def test_multi_worker_mirrored_strategy_with_two_workers_matches_one_device(
    tmp_path, tf_single
):
    workers = [f"localhost:{free_port()}" for _ in range(2)]
    jobs = []
    for index in range(2):
        config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        jobs.append(
            start_job(
                "tf_multiworker",
                tmp_path / f"worker{index}.npz",
                env={"TF_CONFIG": json.dumps(config)},
            )
        )
    for job in jobs:
        finish(job)
    for index in range(2):
        run = dict(np.load(tmp_path / f"worker{index}.npz"))
        assert_same_training(run, tf_single, replicas=1)


@requires_jax
@pytest.mark.parametrize("algorithm", ["layer", "global", "structured"])
def test_jax_data_parallel_masks_match_one_device(tmp_path, algorithm):
    single = run_job(tmp_path, "jax_single", algorithm=algorithm)
    parallel = run_job(
        tmp_path, "jax_data_parallel", devices=4, algorithm=algorithm
    )
    assert_same_training(parallel, single, replicas=1)


@requires_tensorflow
@pytest.mark.parametrize("algorithm", ["global", "structured"])
def test_mirrored_strategy_cross_layer_masks_match_one_device(
    tmp_path, algorithm
):
    single = run_job(tmp_path, "tf_single", algorithm=algorithm)
    mirrored = run_job(tmp_path, "tf_mirrored", 2, algorithm=algorithm)
    assert_same_training(mirrored, single, replicas=2)


def installed(backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    try:
        __import__(module[backend])
    except ImportError:
        return False
    return True


# Run once, in the TensorFlow suite; it starts one process per backend.
@requires_tensorflow
@pytest.mark.skipif(
    not (installed("jax") and installed("torch")),
    reason="needs TensorFlow, JAX and torch installed",
)
@pytest.mark.parametrize("algorithm", ["layer", "global", "structured"])
def test_same_run_gives_the_same_masks_on_every_backend(tmp_path, algorithm):
    jobs = {
        mode: start_job(mode, tmp_path / f"{mode}.npz", algorithm=algorithm)
        for mode in ("tf_single", "jax_single", "torch_single")
    }
    runs = {}
    for mode, job in jobs.items():
        finish(job)
        runs[mode] = dict(np.load(tmp_path / f"{mode}.npz"))
    for mode in ("jax_single", "torch_single"):
        assert_same_training(runs[mode], runs["tf_single"], replicas=1)
