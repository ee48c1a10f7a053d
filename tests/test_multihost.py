"""Two local processes joined by jax.distributed (4 virtual CPU devices each) take the same
PACS update step as one process with 8 devices, each feeding only its own rows; and the trainer
run by both (2 steps, checkpoint, resume for a 3rd) matches one uninterrupted 8-device run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import multihost_worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(mode: str, tmp_path: Path, *extra: str, num_processes: int = 2, timeout: float = 400) -> list[dict]:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // num_processes}",
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # compile time dominates; see quick_compiles
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    port = free_port()
    outs = [tmp_path / f"process_{i}.json" for i in range(num_processes)]
    logs = [open(tmp_path / f"process_{i}.log", "w") for i in range(num_processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multihost_worker.py"), mode, str(port), str(num_processes), str(i), str(outs[i]), *extra],
            env=env, stdout=logs[i], stderr=subprocess.STDOUT, cwd=str(HERE.parent),
        )
        for i in range(num_processes)
    ]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited with {code}:\n" + (tmp_path / f"process_{i}.log").read_text()[-4000:]
    return [json.loads(out.read_text()) for out in outs]


@pytest.fixture
def quick_compiles():
    """XLA's optimisation passes dominate these tiny programs' run time; the processes and
    the one-process reference compile the same way."""
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, quick_compiles):
    results = run_workers("update", tmp_path)
    one_process = multihost_worker.update_step_summary()  # 8 devices of this process (conftest)

    assert [r["process"] for r in results] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 8 for r in results)
    # each process fed its own half of the 16 rows (data=2 splits them across the processes)
    assert [r["local_rows"] for r in results] == [[0, 8], [8, 16]]
    assert one_process["local_rows"] == [0, 16]
    assert one_process["grad_norm"] > 1e-2
    for key in ("loss", "grad_norm", "sum", "sum_squares", "weighted"):
        assert results[0][key] == results[1][key], key  # one global computation, read on both
        np.testing.assert_allclose(results[0][key], one_process[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_trainer_two_processes_with_resume_match_one_process(tmp_path, quick_compiles):
    results = run_workers("train", tmp_path, str(tmp_path / "two_processes"))
    one_process = multihost_worker.train_summary(str(tmp_path / "one_process"), [3])

    assert [r["step"] for r in results] == [3, 3] and [r["meta_step"] for r in results] == [3, 3]
    assert results[0]["q_proj_spec"] == results[1]["q_proj_spec"] == [None, "fsdp", "tensor", None]
    assert results[1]["metrics"] is None  # only process 0 writes metrics
    two, one = results[0]["metrics"], one_process["metrics"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    assert any(r["pacs/mixed_group_fraction"] > 0 for r in one)  # the steps carried gradient
    for a, b in zip(two, one):
        for key, value in b.items():
            if key.startswith(("time/", "tokens_per_s", "reward/check_s")):
                continue
            np.testing.assert_allclose(a[key], value, rtol=1e-5, atol=1e-6, err_msg=f"step {b['step']} {key}")
    for key in ("sum", "sum_squares", "weighted"):
        assert results[0][key] == results[1][key], key
        np.testing.assert_allclose(results[0][key], one_process[key], rtol=1e-5, atol=1e-5, err_msg=key)
