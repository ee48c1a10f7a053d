"""Hosts stop together: two `python -m pacs_jax train` processes joined through jax.distributed
(4 virtual CPU devices each, as two hosts of a slice), SIGTERM to only one of them at random
moments. Both must stop after the same step, that step must be saved (trainer.save_every is
larger than the run, so only the stop saves it), and the run resumed after each stop must end
with the same parameters and optimizer state, bit for bit, as an uninterrupted two-process run.

PACS_JAX_LONG_TESTS=1 sends 10 signals (a few minutes); CI sends 3."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import multihost_worker  # noqa: E402
from test_multihost import free_port, wait_all  # noqa: E402

TOTAL_STEPS = 8
SIGNALS = 10 if os.environ.get("PACS_JAX_LONG_TESTS") == "1" else 3
STOPPED = re.compile(r"stopped by (.+) after step (\d+)")


def launch(tmp_path: Path, run_dir: Path, name: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two trainer processes of one run, told the coordinator, the count and their id in the
    environment, as on two machines that see one shared folder (PACS_JAX_SHARED_FS=1)."""
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    overrides = multihost_worker.trainer_overrides(str(run_dir), TOTAL_STEPS) + ["trainer.save_every=100"]
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))},
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
        "PACS_JAX_SHARED_FS": "1",
    }
    logs = [tmp_path / f"{name}_{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "pacs_jax", "train", "--config", str(config), *overrides],
                                          env={**env, "JAX_PROCESS_ID": str(i)}, stdout=out, stderr=subprocess.STDOUT,
                                          cwd=str(HERE.parent)))
    return procs, logs


def logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        match = re.search(r'"step": (\d+)', line)
        if match:
            steps.append(int(match.group(1)))
    return steps


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def read_state(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint step as NumPy (path -> array), read without a mesh."""
    import jax
    import orbax.checkpoint as ocp

    path = (run_dir / "checkpoints" / str(step) / "state").resolve()
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return {jax.tree_util.keystr(key): np.asarray(leaf) for key, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run_with_signals(tmp_path: Path, run_dir: Path, signals: int, rng: random.Random) -> list[tuple[int, int]]:
    """Launch, SIGTERM one random process at a random moment after this launch's first step,
    check the stop, relaunch; until the run is DONE. Returns (signalled process, stop step) pairs."""
    stops = []
    for launch_index in range(signals + 2):
        procs, logs = launch(tmp_path, run_dir, f"launch{launch_index}")
        start = max(checkpoint_steps(run_dir), default=0)
        target = None
        if len(stops) < signals:
            deadline = time.monotonic() + 900
            while max(logged_steps(run_dir), default=0) <= start and all(p.poll() is None for p in procs):
                assert time.monotonic() < deadline, "no step logged within 900 s"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))  # a step takes about 0.3 s here: any point of a step
            target = rng.randrange(2)
            if procs[target].poll() is None:
                procs[target].send_signal(signal.SIGTERM)
        codes = wait_all(procs, timeout=900)
        texts = [log.read_text() for log in logs]
        found = [sorted(set(STOPPED.findall(text))) for text in texts]  # process 0 also prints it
        if target is not None and codes[target] == -signal.SIGTERM:
            # The signal came after the loop had ended (the handler is gone; a VM going away then
            # takes the process with it): the last step was already saved, a relaunch finishes.
            assert not any(found) and checkpoint_steps(run_dir)[-1] == TOTAL_STEPS, texts[target][-3000:]
            continue
        for i, (code, text) in enumerate(zip(codes, texts)):
            assert code == 0, f"launch {launch_index}, process {i} exited with {code}:\n{text[-4000:]}"
        if (run_dir / "DONE").is_file() and not any(found):
            assert checkpoint_steps(run_dir)[-1] == TOTAL_STEPS
            return stops
        # Both processes stopped, after the same step; that step (and no later one) was saved.
        assert all(len(f) == 1 for f in found), f"launch {launch_index}: {found}"
        (reason_0, step_0), (reason_1, step_1) = found[0][0], found[1][0]
        assert step_0 == step_1, f"launch {launch_index}: process 0 stopped after step {step_0}, process 1 after {step_1}"
        step = int(step_0)
        assert start < step <= TOTAL_STEPS
        assert checkpoint_steps(run_dir)[-1] == step, (checkpoint_steps(run_dir), step)
        assert logged_steps(run_dir)[-1] == step
        reasons = {reason_0, reason_1}
        assert reasons == {"SIGTERM", "a stop request on another host"}, reasons  # only `target` was signalled
        assert "SIGTERM received" in texts[target] and "SIGTERM received" not in texts[1 - target]
        stops.append((target, step))
    raise AssertionError(f"the run did not finish after {signals + 2} launches: {stops}")


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_after_the_same_step(tmp_path):
    rng = random.Random(int(os.environ.get("PACS_JAX_STOP_SEED", "0")))
    interrupted, uninterrupted = tmp_path / "interrupted", tmp_path / "uninterrupted"
    stops = run_with_signals(tmp_path, interrupted, SIGNALS, rng)
    assert len(stops) >= 1, "no signal landed before the end of the run"
    procs, logs = launch(tmp_path, uninterrupted, "uninterrupted")
    codes = wait_all(procs, timeout=900)
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    assert checkpoint_steps(uninterrupted) == [0, TOTAL_STEPS]

    assert logged_steps(interrupted) == logged_steps(uninterrupted) == list(range(1, TOTAL_STEPS + 1))
    a, b = read_state(interrupted, TOTAL_STEPS), read_state(uninterrupted, TOTAL_STEPS)
    assert a.keys() == b.keys() and any("opt_state" in key for key in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bit for bit
    start = read_state(uninterrupted, 0)
    assert any(not np.array_equal(start[k], b[k]) for k in b if "params" in k)  # the steps trained
