"""Per-step metrics: run_dir/metrics.jsonl, TensorBoard, optional Weights & Biases, and a
one-line status per step on the console. Only the main process writes anything.

metrics.jsonl holds one JSON object per line: `{"step": 12, "reward/mean": 0.41, ...}`.
Values are Python floats; non-finite values are written as the strings "NaN", "Infinity"
and "-Infinity" (so every line stays strict JSON and a NaN loss stays distinguishable from
an infinite one); `read_metrics` turns them back into floats.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# Console status line: (metrics key, label, format).
STATUS_FIELDS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("response_length/mean", "len", "{:.1f}"),
    ("loss", "loss", "{:.4g}"),
    ("grad_norm", "gnorm", "{:.3g}"),
)


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{key: float}, nested dicts joined with "/"; scalars from numpy / jax become floats.

    Raises TypeError naming the key for non-scalar arrays and non-numeric values.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
            continue
        if isinstance(value, (bool, int, float)):
            flat[name] = float(value)
            continue
        array = np.asarray(value)  # numpy scalars, jax arrays (one device fetch)
        if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(
                f"metrics[{name!r}] must be a number or a one-element array, got "
                f"{type(value).__name__} with shape {array.shape} and dtype {array.dtype}; reduce it "
                "(e.g. .mean()) before logging"
            )
        flat[name] = float(array.reshape(()))
    return flat


def _encode(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _decode(record: dict) -> dict:
    return {k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of run_dir/metrics.jsonl, in file order, non-finite strings as floats.

    A cut-off last line (a process killed mid-write) is skipped; a broken line anywhere else
    raises ValueError naming the file and line.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory?)")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(_decode(json.loads(line)))
        except json.JSONDecodeError as error:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: skipping a cut-off last line ({error})")
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({error})") from error
    return records


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsLogger:
    """Writes one record per `log(step, metrics)` to every enabled sink.

    Console: one plain line per step (reads the same in a terminal and in a log file), e.g.
    `step 12/300 (4.0%) | reward 0.412 | len 231.5 | loss 0.0123 | gnorm 0.8 | 3.21 s/step | ETA 0:15:24`.
    s/step is the `time/step_s` metric when given, else the wall time between `log` calls,
    averaged over the last 10 steps.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        total_steps: int,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "pacs_jax",
        config: dict | None = None,
        is_main_process: bool = True,
        console: TextIO | None | str = "stdout",
    ):
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.active = is_main_process
        # "stdout": whatever sys.stdout is when a line is printed (a default of sys.stdout itself
        # would pin the stream of import time, which test capture or a redirect may have closed).
        self.console = console
        self._step_seconds: deque[float] = deque(maxlen=10)
        self._last_log_time: float | None = None
        self._tensorboard = None
        self._wandb_run = None
        if not self.active:
            return
        if "://" in str(run_dir):
            raise ValueError(
                f"metrics are written to a local run directory, got {run_dir}; set trainer.run_dir to a "
                "local path (checkpoints may still go to gs://)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._config = config
        if tensorboard:
            self._open_tensorboard(purge_step=None)
        if wandb:
            self._open_wandb(wandb_project, config)

    # ------------------------------------------------------------------ sinks

    def _open_tensorboard(self, purge_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        # purge_step makes TensorBoard hide events at steps >= it from earlier sessions.
        self._tensorboard = SummaryWriter(
            logdir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=30
        )
        if self._config is not None and purge_step is None:
            self._tensorboard.add_text("config", "```\n" + json.dumps(self._config, indent=2, default=str) + "\n```")

    def _open_wandb(self, project: str, config: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            warnings.warn(
                "trainer.wandb=true but the wandb package is not installed; `pip install wandb` "
                "(and `wandb login`) or set trainer.wandb=false. Continuing without Weights & Biases.",
                stacklevel=3,
            )
            return
        # A fixed id per run directory, so a resumed run continues the same W&B run.
        id_file = self.run_dir / WANDB_ID_FILE
        if not id_file.is_file():
            id_file.write_text(wandb.util.generate_id())
        self._wandb_run = wandb.init(
            project=project,
            name=self.run_dir.name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(self.run_dir),
            config=config,
        )

    # ------------------------------------------------------------------ logging

    def log(self, step: int, metrics: dict) -> dict[str, float]:
        """Write one step's metrics everywhere; returns the flattened float values ({} on
        processes other than the main one, which neither read nor write anything)."""
        if not self.active:
            return {}
        values = flatten_metrics(metrics)
        now = time.monotonic()
        if "time/step_s" in values:
            self._step_seconds.append(values["time/step_s"])
        elif self._last_log_time is not None:
            self._step_seconds.append(now - self._last_log_time)
        self._last_log_time = now
        record = {"step": int(step), **{k: _encode(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, global_step=int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))
        if self.console is not None:
            console = sys.stdout if self.console == "stdout" else self.console
            print(self.status_line(int(step), values), file=console, flush=True)
        return values

    def status_line(self, step: int, values: dict[str, float]) -> str:
        percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
        parts = [f"step {step}/{self.total_steps} ({percent:.1f}%)"]
        for key, label, fmt in STATUS_FIELDS:
            if key in values:
                parts.append(f"{label} {fmt.format(values[key])}")
        if self._step_seconds:
            seconds_per_step = sum(self._step_seconds) / len(self._step_seconds)
            parts.append(f"{seconds_per_step:.2f} s/step")
            parts.append(f"ETA {format_duration(seconds_per_step * max(self.total_steps - step, 0))}")
        return " | ".join(parts)

    def truncate_after(self, step: int) -> int:
        """Drop records of steps > `step` (logged before a preemption whose checkpoint never
        landed) and a cut-off last line; TensorBoard hides its events after `step` too.
        Returns how many records were dropped."""
        if not self.active or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError) as error:
                if number == len(lines):  # cut off mid-write
                    dropped += 1
                    continue
                raise ValueError(f"{self.path}:{number}: not a metrics record ({error})") from error
            if record_step <= step:
                kept.append(line)
            else:
                dropped += 1
        temporary = self.path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)  # atomic: a crash here leaves the old or the new file
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._open_tensorboard(purge_step=step + 1)
        self._last_log_time = None
        self._step_seconds.clear()
        return dropped

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
