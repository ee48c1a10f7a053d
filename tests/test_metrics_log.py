"""MetricsLogger: metrics.jsonl, TensorBoard event records, console line, resume truncation;
plot_runs: PNG curves for several runs."""

import importlib.util
import io
import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from pacs_jax.metrics_log import MetricsLogger, read_metrics
from pacs_jax.plot import main as plot_main
from pacs_jax.plot import plot_runs


def strict_lines(path: Path) -> list[dict]:
    """Parse metrics.jsonl rejecting the non-standard NaN / Infinity literals."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def read_events(directory: Path) -> list:
    """Every Event of every TFRecord file under `directory`, parsed by hand:
    [uint64 length][uint32 crc][length bytes][uint32 crc] per record."""
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            assert len(payload) == length, f"{path} is cut off"
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
            offset += 12 + length + 4
    return events


def scalars(events) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


def test_jsonl_tensorboard_and_console(tmp_path):
    console = io.StringIO()
    logger = MetricsLogger(tmp_path, total_steps=10, config={"trainer": {"seed": 3}}, console=console)
    logger.log(1, {"reward/mean": jnp.float32(0.25), "loss": np.float32(0.1), "time/step_s": 2.0, "n": 7})
    logger.log(2, {"reward/mean": 0.5, "loss": math.nan, "grad_norm": jnp.array([math.inf]), "time/step_s": 2.0,
                   "pacs": {"critic_accuracy": np.float64(0.75)}})
    logger.close()

    records = strict_lines(tmp_path / "metrics.jsonl")
    assert records == [
        {"step": 1, "reward/mean": 0.25, "loss": float(np.float32(0.1)), "time/step_s": 2.0, "n": 7.0},
        {"step": 2, "reward/mean": 0.5, "loss": "NaN", "grad_norm": "Infinity", "time/step_s": 2.0,
         "pacs/critic_accuracy": 0.75},
    ]
    assert all(type(v) is float for r in records for k, v in r.items() if k != "step" and not isinstance(v, str))
    decoded = read_metrics(tmp_path)
    assert math.isnan(decoded[1]["loss"]) and decoded[1]["grad_norm"] == math.inf

    events = scalars(read_events(tmp_path / "tensorboard"))
    assert events[("reward/mean", 1)] == 0.25 and events[("reward/mean", 2)] == 0.5
    assert events[("loss", 1)] == np.float32(0.1) and math.isnan(events[("loss", 2)])
    assert events[("pacs/critic_accuracy", 2)] == 0.75 and events[("grad_norm", 2)] == math.inf

    lines = console.getvalue().splitlines()
    assert len(lines) == 2
    # 2.0 s/step and 8 steps left after step 2 -> 16 s.
    assert lines[1] == "step 2/10 (20.0%) | reward 0.500 | loss nan | gnorm inf | 2.00 s/step | ETA 0:00:16"


def test_truncate_after_drops_later_steps_and_cut_off_line(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, console=None) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward/mean": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # the process died mid-write
    with pytest.warns(UserWarning, match="cut-off last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

    with MetricsLogger(tmp_path, total_steps=10, console=None) as logger:  # resumed from step 3
        assert logger.truncate_after(3) == 3
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        logger.log(4, {"reward/mean": 0.99})
    records = strict_lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in records] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.99)]

    # TensorBoard: the resumed session starts with a purge marker at step 4, so the viewer
    # hides the first session's step 4 and 5.
    events = read_events(tmp_path / "tensorboard")
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert 4 in starts
    assert scalars(events)[("reward/mean", 4)] == np.float32(0.99)


def test_only_main_process_writes(tmp_path):
    console = io.StringIO()
    logger = MetricsLogger(tmp_path / "run", total_steps=5, is_main_process=False, console=console)
    assert logger.log(1, {"loss": 1.0}) == {}
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not (tmp_path / "run").exists() and console.getvalue() == ""


def test_bad_values_and_files_are_named(tmp_path):
    with MetricsLogger(tmp_path, total_steps=5, tensorboard=False, console=None) as logger:
        with pytest.raises(TypeError, match=r"metrics\['reward/all'\].*shape \(3,\)"):
            logger.log(1, {"reward": {"all": np.ones(3)}})
        with pytest.raises(TypeError, match=r"metrics\['note'\]"):
            logger.log(1, {"note": "hello"})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="run directory"):
        read_metrics(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="trainer.run_dir"):
        MetricsLogger("gs://bucket/run", total_steps=5)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_requested_but_missing_warns(tmp_path):
    with pytest.warns(UserWarning, match="pip install wandb"):
        logger = MetricsLogger(tmp_path, total_steps=5, tensorboard=False, wandb=True, console=None)
    logger.log(1, {"loss": 0.5})  # logging goes on without it
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_runs_overlays_two_runs(tmp_path):
    for name, offset in (("run_a", 0.0), ("run_b", 0.2)):
        with MetricsLogger(tmp_path / name, total_steps=20, tensorboard=False, console=None) as logger:
            for step in range(1, 21):
                metrics = {"reward/mean": offset + step / 40, "response_length/mean": 100 + step, "loss": 1 / step}
                if name == "run_b":
                    metrics["pacs/critic_accuracy"] = 0.5 + step / 50
                logger.log(step, metrics)
    paths = plot_runs([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "plots")
    names = sorted(p.name for p in paths)
    # grad_norm is in neither run, so it has no plot; critic accuracy is in one run.
    assert names == ["critic_accuracy.png", "loss.png", "response_length.png", "reward.png"]
    for path in paths:
        width, height = png_size(path)
        assert width > 100 and height > 100 and path.stat().st_size > 5000

    assert plot_main([str(tmp_path / "run_a"), "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["loss.png", "response_length.png", "reward.png"]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "plots")


def test_default_console_is_the_stdout_of_print_time(tmp_path, monkeypatch):
    # The default must not pin the sys.stdout of import time (a closed pytest capture, a redirect).
    logger = MetricsLogger(tmp_path, total_steps=3, tensorboard=False)
    later = io.StringIO()
    monkeypatch.setattr("sys.stdout", later)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert later.getvalue().startswith("step 1/3")
