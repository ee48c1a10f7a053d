"""TPU sweeps (python -m pacs_jax sweep --mode tpu) through the fake gcloud of tests/test_launch.py:
with --type each run is driven by launch/spot_loop.sh, so a preempted VM is recreated and its run
resumed; without it a preempted VM fails its run at once instead of being waited on for ever."""

import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_launch  # noqa: E402
from pacs_jax import sweep as sweep_mod  # noqa: E402

DEBUG_CPU = test_launch.REPO / "configs" / "debug_cpu.yaml"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    folder = tmp_path / "fake"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "gcloud").write_text(test_launch.FAKE_GCLOUD)
    (folder / "bin" / "gcloud").chmod(0o755)
    (folder / "calls").write_text("")
    settings = {"PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE": str(folder), "FAKE_HOSTS": "1",
                "PACS_LAUNCH_RETRY_SECONDS": "0", "PACS_LAUNCH_POLL_SECONDS": "0", "PACS_LAUNCH_CREATE_RETRY_SECONDS": "0",
                "PACS_LAUNCH_KILL_GRACE_SECONDS": "0"}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    for key in ("PROJECT", "ZONE", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE"):
        monkeypatch.delenv(key, raising=False)
    return folder


def sweep_file(tmp_path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base_config": str(DEBUG_CPU), "name": "pacs_beta", "run_root": "gs://bucket/sweeps",
                                    "grid": {"algorithm.beta": [1.0, 2.0]}}))
    return path


def test_tpu_sweep_recreates_a_preempted_vm_and_resumes_its_run(tmp_path, fake, capfd):
    # Run 1: the VM is adopted, set up and started; it is preempted, recreated, set up, started
    # again (trainer.resume=auto) and finishes. Run 2 goes on the same (new) VM.
    test_launch.queue(fake, "tpu_states", "READY", "READY", "PREEMPTED", "READY")
    test_launch.queue(fake, "status", "none", "running creates=bucket/sweeps/pacs_beta/beta=1.0/DONE",
                      "exited:0", "running creates=bucket/sweeps/pacs_beta/beta=2.0/DONE")
    argv = [str(sweep_file(tmp_path)), "--mode", "tpu", "--tpu", "tpu-a", "--type", "v4-8", "--zone", "z",
            "--project", "p", "--poll-seconds", "0"]
    assert sweep_mod.main(argv) == 0
    err = capfd.readouterr().err
    assert "Restart 1/20 within 6h (VM PREEMPTED)" in err
    creates = test_launch.creates(fake)
    assert len(creates) == 1 and "--spot" in creates[0] and "--accelerator-type=v4-8" in creates[0]
    assert len(test_launch.deletes(fake)) == 1  # the preempted VM; the last one is kept (--keep)
    starts = [c[-1] for c in test_launch.worker_starts(fake)]
    assert len(starts) == 3
    assert all("trainer.resume=auto" in c for c in starts)
    assert [("beta=1.0" in c, "beta=2.0" in c) for c in starts] == [(True, False), (True, False), (False, True)]
    assert "trainer.run_dir=gs://bucket/sweeps/pacs_beta/beta=2.0" in starts[2]


def test_tpu_sweep_without_type_fails_a_preempted_run_instead_of_waiting(tmp_path, fake, capsys):
    test_launch.queue(fake, "tpu_states", "PREEMPTED")
    argv = [str(sweep_file(tmp_path)), "--mode", "tpu", "--tpu", "tpu-a", "--zone", "z", "--project", "p",
            "--poll-seconds", "0"]
    assert sweep_mod.main(argv) == 1
    out = capsys.readouterr().out
    assert "tpu-a is PREEMPTED; the run stopped unfinished. Pass --type TYPE" in out


def test_tpu_sweep_with_type_needs_runs_on_gs(tmp_path, fake, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base_config": str(DEBUG_CPU), "name": "s", "run_root": str(tmp_path / "runs"),
                                    "grid": {"algorithm.beta": [1.0]}}))
    assert sweep_mod.main([str(path), "--mode", "tpu", "--tpu", "t", "--type", "v4-8", "--dry-run"]) == 2
    assert "set run_root to gs://BUCKET/" in capsys.readouterr().err
