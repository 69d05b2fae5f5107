"""One-shot pruning of weights sharded over devices (JAX
`keras.distribution.ModelParallel`, 8 host CPU devices).

Each run is a fresh interpreter (`tests/oneshot_sharded_job.py`): the host
device count must be set before JAX starts. The job runs on JAX whatever
the suite's backend, so the test runs in the JAX suite only.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

JOB = os.path.join(os.path.dirname(__file__), "oneshot_sharded_job.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="needs the JAX backend"
    ),
]


def run_job(tmp_path, mode):
    out = tmp_path / f"{mode}.npz"
    process = subprocess.run(
        [sys.executable, JOB, mode, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("oneshot_sharded")
    return run_job(tmp_path, "single"), run_job(tmp_path, "sharded")


EXACT = ["magnitude", "wanda", "wanda_2_4"]
SPARSEGPT = ["sparsegpt", "sparsegpt_blocks", "sparsegpt_2_4"]


@pytest.mark.parametrize("method", EXACT + SPARSEGPT)
def test_sharded_pruning_copies_no_kernel_and_computes_it_sharded(runs, method):
    _, sharded = runs
    assert sharded[f"copies_{method}"] == 0
    # Computed split by output units, as the kernels are: no device held
    # a whole kernel.
    assert sharded[f"computed_{method}"].tolist() == ["(None, 'model')"] * 2
    # Eight shards, (in, out / 8) each, after the assignment too.
    assert sharded[f"{method}_hidden_shards"].tolist() == [8, 32, 8]
    assert sharded[f"{method}_output_shards"].tolist() == [8, 64, 2]


@pytest.mark.parametrize("method", EXACT)
def test_sharded_magnitude_and_wanda_equal_one_device(runs, method):
    single, sharded = runs
    for layer in ("hidden", "output"):
        np.testing.assert_array_equal(
            sharded[f"{method}_{layer}"], single[f"{method}_{layer}"]
        )
        assert (single[f"{method}_{layer}"] == 0).mean() >= 0.5


@pytest.mark.parametrize("method", SPARSEGPT)
def test_sharded_sparsegpt_equals_one_device(runs, method):
    """Same masks; the weights differ by float32 against float64."""
    single, sharded = runs
    for layer in ("hidden", "output"):
        result = sharded[f"{method}_{layer}"]
        expected = single[f"{method}_{layer}"]
        np.testing.assert_array_equal(result == 0, expected == 0)
        np.testing.assert_allclose(result, expected, atol=1e-5)
        assert (expected == 0).mean() >= 0.5
