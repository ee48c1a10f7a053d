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


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every process; none is left running (a hung one is killed)."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


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
        codes = wait_all(procs, timeout)
    finally:
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


# ------------------------------------------------------------------ the CLI a user runs


def start_cli(tmp_path: Path, argv: list[str], num_processes: int = 2, extra_env: dict | None = None,
              timeout: float = 400) -> list[tuple[int, str]]:
    """`python -m pacs_jax ARGV` in `num_processes` processes joined only through the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), as on several machines.
    Returns each process's (exit status, output)."""
    port = free_port()
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PACS_JAX_SHARED"))},
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // num_processes}",
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        **(extra_env or {}),
    }
    logs = [tmp_path / f"cli_{i}.log" for i in range(num_processes)]
    procs = []
    for i in range(num_processes):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "pacs_jax", *argv], env={**base, "JAX_PROCESS_ID": str(i)},
                                          stdout=log, stderr=subprocess.STDOUT, cwd=str(HERE.parent)))
    codes = wait_all(procs, timeout)
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


@pytest.mark.slow
def test_cli_train_joins_the_processes_itself(tmp_path):
    """Two `python -m pacs_jax train` processes, told only the coordinator's address, the count
    and their id in the environment, build one 8-device mesh (4 devices each, mesh 2 x 2 x 2) and
    train to the end; only process 0 writes the logs."""
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    run_dir, export = tmp_path / "run", tmp_path / "export"
    overrides = multihost_worker.trainer_overrides(str(run_dir), 2) + [f"trainer.export_hf={export}"]
    results = start_cli(tmp_path, ["train", "--config", str(config), *overrides],
                        extra_env={"PACS_JAX_SHARED_FS": "1"})  # both processes see this machine's disk
    for i, (code, log) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{log[-4000:]}"
        assert f"pacs_jax: process {i} of 2, 4 of 8 devices here" in log
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]  # written once, by process 0
    assert (run_dir / "DONE").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    # trainer.export_hf on two hosts (each parameter gathered from both), written before DONE: the
    # final policy of the checkpoint, which transformers reads.
    assert (run_dir / "DONE").stat().st_mtime >= (export / "model.safetensors").stat().st_mtime
    import transformers
    from flax import nnx

    from pacs_jax.policy import restore_policy

    exported = transformers.LlamaForCausalLM.from_pretrained(export)
    policy, _ = restore_policy(multihost_worker.trainer_config(str(run_dir), 2), str(run_dir / "checkpoints"), 2)
    np.testing.assert_array_equal(exported.model.embed_tokens.weight.detach().numpy(), np.asarray(nnx.state(policy)["embed"][...]))


@pytest.mark.slow
def test_cli_train_rejects_a_local_run_dir_on_several_hosts(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    run_dir = tmp_path / "run"
    overrides = multihost_worker.trainer_overrides(str(run_dir), 2)
    results = start_cli(tmp_path, ["train", "--config", str(config), *overrides], timeout=120)
    for i, (code, log) in enumerate(results):
        assert code == 2, f"process {i} exited with {code}:\n{log[-4000:]}"
        assert f"error: trainer.run_dir={run_dir} is a local folder, but this run has 2 processes" in log
        assert "trainer.run_dir=gs://BUCKET/runs/NAME" in log
        assert "Traceback" not in log
    assert not run_dir.exists()  # rejected before anything was written


def test_one_process_never_joins(monkeypatch):
    """No coordinator in the environment and no TPU slice: initialize_distributed does nothing."""
    import jax

    from pacs_jax import sharding

    def refuse(*args, **kwargs):
        raise AssertionError("jax.distributed.initialize must not be called for one process")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert sharding.initialize_distributed() is False  # a cluster of one
    # A one-host TPU VM (v5litepod-8, v4-8): nothing to join either.
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: True)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1-w-0")
    assert sharding.initialize_distributed() is False
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setattr(sharding, "_tpu_metadata", lambda key: "10.0.0.2" if key == "worker-network-endpoints" else None)
    assert sharding.initialize_distributed() is False


def test_tpu_slice_of_several_hosts_joins_through_jax_detection(monkeypatch):
    """On a v5p-64 worker (8 hosts in the metadata) the CLI lets JAX find the coordinator itself."""
    import jax

    from pacs_jax import sharding

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(jax, "process_count", lambda: 8)
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_NUM_SLICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: True)
    endpoints = ",".join(f"w-{i}:{i}:10.0.0.{i}" for i in range(8))
    monkeypatch.setattr(sharding, "_tpu_metadata", lambda key: endpoints if key == "worker-network-endpoints" else None)
    assert sharding.tpu_slice_hosts() == 8
    assert sharding.initialize_distributed() is True
    assert calls == [()]


def test_coordinator_without_count_or_id_is_named(monkeypatch):
    from pacs_jax import sharding
    from pacs_jax.config import ConfigError

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ConfigError, match="set JAX_NUM_PROCESSES"):
        sharding.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID=2 must be in 0 \.\. JAX_NUM_PROCESSES-1 = 1"):
        sharding.initialize_distributed()


def test_shared_dirs_check(monkeypatch):
    import jax

    from pacs_jax import sharding
    from pacs_jax.config import ConfigError

    monkeypatch.delenv("PACS_JAX_SHARED_FS", raising=False)
    dirs = {"trainer.run_dir": "gs://b/runs/x", "trainer.checkpoint_dir": "/tmp/ckpt"}
    sharding.require_shared_dirs(dirs)  # one process: any folder
    monkeypatch.setattr(jax, "process_count", lambda: 8)
    with pytest.raises(ConfigError, match="trainer.checkpoint_dir=/tmp/ckpt is a local folder, but this run has 8"):
        sharding.require_shared_dirs(dirs)
    sharding.require_shared_dirs({"trainer.run_dir": "gs://b/runs/x", "trainer.checkpoint_dir": ""})
    monkeypatch.setenv("PACS_JAX_SHARED_FS", "1")
    sharding.require_shared_dirs(dirs)
