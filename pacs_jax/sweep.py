"""Hyper-parameter sweeps: expand a grid file into training runs, run or launch them, summarise.

A sweep file (YAML):

    base_config: configs/debug_cpu.yaml   # relative to the current folder, else to this file
    name: pacs_beta
    run_root: runs/sweeps                 # run dirs go to RUN_ROOT/NAME/...; may be gs://
    overrides: [trainer.total_steps=20]   # applied to every run
    grid:                                 # cartesian product, in file order
      algorithm.beta: [1.0, 2.0]
      algorithm.weight_mode: [question, null]
    seeds: [0, 1, 2]                      # optional: trainer.seed, innermost

Every run's config is loaded and validated before anything starts, so a bad grid value fails at
once naming the run and the key. CLI: `python -m pacs_jax sweep SWEEP.yaml [--mode local|print|tpu]`.

A finished run (DONE, or total_steps steps in metrics.jsonl) is skipped; an unfinished one resumes
from its checkpoints. `--mode tpu` starts each run detached on its VM and watches it with short ssh
calls, so a dropped ssh session fails nothing. With `--type` (the VMs' accelerator type, e.g.
v5litepod-8) each run is driven by launch/spot_loop.sh on its VM (adopted, kept between runs): a
preempted VM is recreated and the run resumes, a stockout is waited out, a crashed or hung run is
started again. Without it a VM found preempted fails its run (and the sweep says to pass --type)
instead of being waited on for ever. The summary (RUN_ROOT/NAME/summary.md and .csv,
read from where the runs wrote, gs:// included) has each run's hyper-parameters, reward, loss and
final val/* pass@k / accuracy; with seeds, summary_seeds.md / .csv hold mean and std over seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import itertools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from pacs_jax.config import ConfigError, load_config

SWEEP_KEYS = {"base_config", "name", "run_root", "overrides", "grid", "seeds"}
DONE_MARKER = "DONE"
REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_TPU = REPO_ROOT / "launch" / "train_tpu.sh"
SPOT_LOOP = REPO_ROOT / "launch" / "spot_loop.sh"
# TPU VM states only a new VM recovers from (launch/common.sh state_kind's "gone").
VM_GONE_STATES = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "DELETING", "HIDDEN", "SUSPENDING", "SUSPENDED",
                  "FAILED", "NOT_FOUND"}
SUMMARY_COLUMNS = [
    "run", "status", "steps", "last reward/mean", "max reward/mean", "last loss", "wall time (s)",
]


@dataclass(frozen=True)
class Sweep:
    base_config: Path
    name: str
    run_root: str
    overrides: list[str]
    grid: dict[str, list]
    seeds: list[int]


@dataclass(frozen=True)
class Run:
    name: str  # SWEEP_NAME/key=value,...: also the run dir under run_root
    run_dir: str
    overrides: list[str]  # everything passed to the trainer after --config, run_dir included
    total_steps: int
    params: dict = field(default_factory=dict)  # grid key -> value, and "seed" with seeds


# ---------------------------------------------------------------------------- the sweep file


def _fail(path: Path | str, message: str) -> ConfigError:
    return ConfigError(f"sweep file {path}: {message}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file's shape (the runs' configs are checked by `expand`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise _fail(path, f"expected a mapping of {sorted(SWEEP_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; allowed keys: {sorted(SWEEP_KEYS)}")
    for key in ("base_config", "name"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _fail(path, f"{key} is required (a string), got {raw.get(key)!r}")
    name = raw["name"]
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise _fail(path, f"name {name!r} may only hold letters, digits, '.', '_' and '-'")

    base = Path(raw["base_config"])
    if not base.is_absolute() and not base.is_file() and (path.parent / base).is_file():
        base = path.parent / base
    if not base.is_file():
        raise _fail(path, f"base_config {raw['base_config']} does not exist (relative paths are "
                          f"taken from the current folder, then from the sweep file's folder)")

    run_root = raw.get("run_root", "runs/sweeps")
    if not isinstance(run_root, str) or not run_root:
        raise _fail(path, f"run_root must be a folder (a string), got {run_root!r}")

    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise _fail(path, f"overrides must be a list of 'section.key=value' strings, got {overrides!r}")

    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise _fail(path, f"grid must map 'section.key' to a list of values, got {grid!r}")
    for key, values in grid.items():
        if not isinstance(key, str) or "." not in key:
            raise _fail(path, f"grid key {key!r} must be a dotted config key like algorithm.beta")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid.{key} must be a non-empty list of values, got {values!r}")

    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(path, f"seeds must be a list of integers, got {seeds!r}")
    if not grid and not seeds:
        raise _fail(path, "nothing to sweep: give a grid, seeds, or both")

    set_by_sweep = {"trainer.run_dir"} | ({"trainer.seed"} if seeds else set())
    override_keys = [o.split("=", 1)[0].strip() for o in overrides]
    for key in [*override_keys, *grid]:
        if key in set_by_sweep:
            raise _fail(path, f"{key} is set by the sweep itself (run_root / seeds); remove it")
    for key in grid:
        if key in override_keys:
            raise _fail(path, f"{key} is both in grid and in overrides; keep one")
    return Sweep(base, name, run_root.rstrip("/"), list(overrides), dict(grid), list(seeds))


def _yaml_value(value: Any) -> str:
    """The value as the config's `key=value` parser (YAML) reads it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("...").strip()


def _name_value(value: Any) -> str:
    if value is None or isinstance(value, (bool, list, dict)):
        return _yaml_value(value).replace(" ", "")
    return str(value)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """algorithm.beta -> beta, unless two grid keys share their last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def _join(root: str, *parts: str) -> str:
    if root.startswith("gs://"):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def expand(sweep: Sweep) -> list[Run]:
    """All runs of the sweep (grid in file order, seeds innermost), each config validated."""
    keys = list(sweep.grid)
    short = _short_keys(keys)
    combos = list(itertools.product(*(sweep.grid[k] for k in keys)))
    seeds: list[int | None] = list(sweep.seeds) or [None]
    runs, seen = [], {}
    for combo, seed in itertools.product(combos, seeds):
        parts = [f"{short[k]}={_name_value(v)}" for k, v in zip(keys, combo)]
        overrides = list(sweep.overrides) + [f"{k}={_yaml_value(v)}" for k, v in zip(keys, combo)]
        if seed is not None:
            parts.append(f"seed={seed}")
            overrides.append(f"trainer.seed={seed}")
        leaf = _safe(",".join(parts))
        name = f"{sweep.name}/{leaf}"
        if leaf in seen:
            raise ConfigError(f"sweep {sweep.name}: runs {seen[leaf]} and {','.join(parts)} get the "
                              f"same folder name {leaf!r}; make the grid values differ in letters or digits")
        seen[leaf] = ",".join(parts)
        run_dir = _join(sweep.run_root, sweep.name, leaf)
        overrides.append(f"trainer.run_dir={run_dir}")
        try:
            config = load_config(sweep.base_config, overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep run {name}: {e}") from None
        params = dict(zip(keys, combo)) | ({"seed": seed} if seed is not None else {})
        runs.append(Run(name, run_dir, overrides, config.trainer.total_steps, params))
    return runs


# ---------------------------------------------------------------------------- run folders (local or gs://)


def _gcloud() -> str:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise RuntimeError("gcloud is not installed: it is needed to read and write gs:// paths "
                           "(https://cloud.google.com/sdk/docs/install)")
    return gcloud


def _read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if path.startswith("gs://"):
        done = subprocess.run([_gcloud(), "storage", "cat", path], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None
    p = Path(path)
    return p.read_text() if p.is_file() else None


def _write_text(path: str, text: str) -> None:
    if path.startswith("gs://"):
        with tempfile.NamedTemporaryFile("w", suffix=Path(path).suffix, delete=False) as f:
            f.write(text)
        try:
            subprocess.run([_gcloud(), "storage", "cp", f.name, path], check=True)
        finally:
            Path(f.name).unlink()
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl rows; a line cut short by a crash or a preemption is skipped."""
    text = _read_text(_join(run_dir, "metrics.jsonl"))
    rows = []
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _steps_done(rows: list[dict]) -> int:
    # Distinct steps with a training reward, so rows logged again after a resume count once, 0- or
    # 1-based alike, and the validation before training (step 0, no reward) is not a step.
    return len({row["step"] for row in rows if "step" in row and "reward/mean" in row})


def is_finished(run: Run) -> bool:
    """The trainer wrote DONE, or metrics.jsonl holds total_steps steps."""
    if _read_text(_join(run.run_dir, DONE_MARKER)) is not None:
        return True
    return _steps_done(read_metrics(run.run_dir)) >= run.total_steps


# ---------------------------------------------------------------------------- commands


def train_command(sweep: Sweep, run: Run) -> list[str]:
    return [sys.executable, "-m", "pacs_jax", "train", "--config", str(sweep.base_config), *run.overrides]


def _repo_config(sweep: Sweep) -> str:
    config = Path(sweep.base_config).resolve()
    try:
        return str(config.relative_to(REPO_ROOT))
    except ValueError:
        raise ConfigError(f"base_config {sweep.base_config} must be inside the repository {REPO_ROOT} "
                          f"for --mode tpu: the TPU workers get a copy of the repository") from None


def tpu_command(sweep: Sweep, run: Run, tpu: str, zone: str | None, project: str | None,
                dry_run: bool) -> list[str]:
    """launch/train_tpu.sh for one run, detached: it returns once training has started on every
    worker (`wait_on_tpu` then watches it)."""
    cmd = ["bash", str(TRAIN_TPU), "--name", tpu, "--config", _repo_config(sweep), "--detach"]
    cmd += ["--zone", zone] if zone else []
    cmd += ["--project", project] if project else []
    cmd += ["--dry-run"] if dry_run else []
    return [*cmd, "--", *run.overrides]


def spot_command(sweep: Sweep, run: Run, tpu: str, tpu_type: str, zone: str | None, project: str | None,
                 dry_run: bool, queued: bool = False) -> list[str]:
    """launch/spot_loop.sh for one run on `tpu`: it adopts the VM (or creates it), recreates it
    when it is preempted, resumes the run, and returns once the run has written DONE. The VM is
    kept for the next run (--keep)."""
    if not run.run_dir.startswith("gs://"):
        raise ConfigError(f"--type runs the sweep through launch/spot_loop.sh, which keeps runs on gs:// (a "
                          f"preempted VM loses its disk): set run_root to gs://BUCKET/..., got {sweep.run_root}")
    cmd = ["bash", str(SPOT_LOOP), "--name", tpu, "--type", tpu_type, "--config", _repo_config(sweep),
           "--run-dir", run.run_dir, "--adopt", "--keep"]
    cmd += ["--queued"] if queued else []
    cmd += ["--zone", zone] if zone else []
    cmd += ["--project", project] if project else []
    cmd += ["--dry-run"] if dry_run else []
    return [*cmd, "--", *[o for o in run.overrides if not o.startswith("trainer.run_dir=")]]


def run_local(sweep: Sweep, runs: list[Run]) -> list[str]:
    """Train the runs one after another; skip finished ones. Returns the names of failed runs."""
    failed = []
    for i, run in enumerate(runs, 1):
        if is_finished(run):
            print(f"[{i}/{len(runs)}] {run.name}: finished already, skipped", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run.name}: {shlex.join(train_command(sweep, run))}", flush=True)
        if subprocess.run(train_command(sweep, run)).returncode != 0:
            print(f"[{i}/{len(runs)}] {run.name}: FAILED", flush=True)
            failed.append(run.name)
    return failed


def worker_status(tpu: str, zone: str | None, project: str | None) -> str | None:
    """Worker 0's training status on `tpu` ("running PID", "exited RC", "killed", "none"), or None
    when ssh did not answer."""
    cmd = [_gcloud(), "compute", "tpus", "tpu-vm", "ssh", tpu, "--worker=0"]
    cmd += [f"--zone={zone}"] if zone else []
    cmd += [f"--project={project}"] if project else []
    cmd += ["--command=bash $HOME/pacs_jax/launch/tpu_worker.sh status"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not re.match(r"(running|exited|killed|none)\b", lines[-1]):
        return None
    return lines[-1]


def vm_state(tpu: str, zone: str | None, project: str | None) -> str | None:
    """The TPU VM's state (READY, PREEMPTED, ...), NOT_FOUND, or None when gcloud did not say."""
    cmd = [_gcloud(), "compute", "tpus", "tpu-vm", "describe", tpu, "--format=value(state)"]
    cmd += [f"--zone={zone}"] if zone else []
    cmd += [f"--project={project}"] if project else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return "NOT_FOUND" if re.search(r"NOT_FOUND|was not found", done.stderr) else None
    return done.stdout.strip() or None


def wait_on_tpu(run: Run, tpu: str, zone: str | None, project: str | None, poll_s: float) -> bool:
    """Watch a run started on `tpu` until it is finished (True) or its trainer has stopped without
    finishing (False). A dropped or refused ssh session is not a failure: the run goes on on the
    VM, and the next look tells; but a VM that is gone (preempted) fails the run at once."""
    import time

    while True:
        time.sleep(poll_s)
        if is_finished(run):
            return True
        status = worker_status(tpu, zone, project)
        if status is None:
            state = vm_state(tpu, zone, project)
            if state in VM_GONE_STATES:
                print(f"{run.name}: {tpu} is {state}; the run stopped unfinished. Pass --type TYPE (e.g. --type "
                      f"v5litepod-8) to have the sweep recreate preempted VMs and resume their runs "
                      f"(launch/spot_loop.sh); running the sweep again resumes it", flush=True)
                return False
            print(f"{run.name}: {tpu} did not answer over ssh; the run goes on there, looking again in {poll_s:g} s",
                  flush=True)
        elif not status.startswith("running"):
            if is_finished(run):
                return True
            print(f"{run.name}: the trainer on {tpu} stopped unfinished ({status}); the log is "
                  f"~/pacs_jax_run/train.log on {tpu}; running the sweep again resumes it", flush=True)
            return False


def run_tpu(sweep: Sweep, runs: list[Run], tpus: list[str], zone: str | None, project: str | None,
            dry_run: bool, poll_s: float = 60, tpu_type: str | None = None, queued: bool = False) -> list[str]:
    """Runs dealt round-robin to the TPU VMs; each VM trains its share one after another. A
    finished run is skipped, an unfinished one resumes from its checkpoints (trainer.resume=auto).
    With `tpu_type` each run goes through launch/spot_loop.sh, which outlasts preemptions."""
    if not tpus:
        raise ConfigError("--mode tpu needs --tpu NAME[,NAME...] (VMs made by launch/create_tpu.sh "
                          "and launch/setup_tpu.sh)")
    if not sweep.run_root.startswith("gs://"):
        print(f"warning: run_root {sweep.run_root} is on the TPU VMs' own disks; use gs://BUCKET/... "
              f"to keep the runs when the VMs go", file=sys.stderr, flush=True)
    # Every command is built before the first starts, so a bad base_config stops the whole sweep.
    if tpu_type:
        commands = [(run, spot_command(sweep, run, tpus[i % len(tpus)], tpu_type, zone, project, dry_run, queued))
                    for i, run in enumerate(runs)]
    else:
        commands = [(run, tpu_command(sweep, run, tpus[i % len(tpus)], zone, project, dry_run))
                    for i, run in enumerate(runs)]
    queues = [commands[i::len(tpus)] for i in range(len(tpus))]

    def work(queue: list[tuple[Run, list[str]]]) -> list[str]:
        failed = []
        for run, cmd in queue:
            if not dry_run and is_finished(run):
                print(f"{run.name}: finished already, skipped", flush=True)
                continue
            print(f"# {run.name}: {shlex.join(cmd)}", flush=True)
            if tpu_type:
                # The spot loop returns when the run is done, or when it gave up (and said why).
                if subprocess.run(cmd).returncode != 0:
                    print(f"{run.name}: launch/spot_loop.sh gave up on it (see above); running the sweep again "
                          f"resumes it", flush=True)
                    failed.append(run.name)
            elif subprocess.run(cmd).returncode != 0:
                print(f"{run.name}: starting it on {cmd[cmd.index('--name') + 1]} failed", flush=True)
                failed.append(run.name)
            elif not dry_run and not wait_on_tpu(run, cmd[cmd.index("--name") + 1], zone, project, poll_s):
                failed.append(run.name)
        return failed

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(tpus)) as pool:
        return [name for failed in pool.map(work, queues) for name in failed]


# ---------------------------------------------------------------------------- summary


def _last(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    return float(values[-1]) if values else None


def _summary_row(run_dir: str, label: str) -> dict:
    rows = read_metrics(run_dir)
    rewards = [row["reward/mean"] for row in rows if isinstance(row.get("reward/mean"), (int, float))]
    # Every logged step took its time, steps redone after a resume included.
    step_times = [row["time/step_s"] for row in rows if isinstance(row.get("time/step_s"), (int, float))]
    config = yaml.safe_load(_read_text(_join(run_dir, "config.yaml")) or "") or {}
    total = (config.get("trainer") or {}).get("total_steps") if isinstance(config, dict) else None
    steps = _steps_done(rows)
    if _read_text(_join(run_dir, DONE_MARKER)) is not None or (total is not None and steps >= total):
        status = "done"
    else:
        status = "incomplete" if rows else "no metrics"
    return {
        "run": label,
        "status": status,
        "steps": steps,
        "last reward/mean": float(rewards[-1]) if rewards else None,
        "max reward/mean": float(max(rewards)) if rewards else None,
        "last loss": _last(rows, "loss"),
        "wall time (s)": float(sum(step_times)) if step_times else None,
    }


# Final validation numbers shown per run: pass@k and accuracy of every validation set.
VAL_KEY = re.compile(r"^val/.+/(pass@\d+|accuracy)$")
# Columns averaged over seeds (with the validation columns a sweep has).
SEED_MEAN_COLUMNS = ["last reward/mean", "max reward/mean", "last loss"]


def _final_val(rows: list[dict]) -> dict[str, float]:
    """The newest value of every val/<set>/pass@k and accuracy the run logged."""
    final: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if VAL_KEY.match(key) and isinstance(value, (int, float)):
                final[key] = float(value)
    return final


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(rows: list[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if row.get(c) is None else row[c]) for c in columns} for row in rows)
    return out.getvalue()


def summary_columns(rows: list[dict], param_keys: Sequence[str] = ()) -> list[str]:
    """run, the hyper-parameters, SUMMARY_COLUMNS' metrics, then every final val/* column."""
    val = sorted({k for row in rows for k in row if VAL_KEY.match(k)})
    return ["run", *param_keys, *SUMMARY_COLUMNS[1:], *val]


def seed_summary(rows: list[dict], param_keys: Sequence[str]) -> tuple[list[dict], list[str]]:
    """Runs that differ only in their seed, averaged: one row per grid point with the number of
    runs and mean / std (sample std; 0 for one run) of the reward, loss and final val/* columns."""
    grid_keys = [k for k in param_keys if k != "seed"]
    metrics = SEED_MEAN_COLUMNS + sorted({k for row in rows for k in row if VAL_KEY.match(k)})
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row.get(k)) for k in grid_keys), []).append(row)
    out = []
    for members in groups.values():
        agg = {k: members[0].get(k) for k in grid_keys} | {"runs": len(members)}
        for metric in metrics:
            values = [m[metric] for m in members if isinstance(m.get(metric), (int, float))]
            mean = float(np.mean(values)) if values else None
            std = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)
            agg[f"{metric} mean"], agg[f"{metric} std"] = mean, std
        out.append(agg)
    columns = [*grid_keys, "runs", *[f"{m} {s}" for m in metrics for s in ("mean", "std")]]
    return out, columns


def _seed_markdown(rows: list[dict], columns: list[str]) -> str:
    """mean ± std in one cell per metric."""
    metrics = [c.removesuffix(" mean") for c in columns if c.endswith(" mean")]
    head = [c for c in columns if not c.endswith((" mean", " std"))]
    lines = ["| " + " | ".join([*head, *metrics]) + " |", "|" + "---|" * (len(head) + len(metrics))]
    for row in rows:
        cells = [_cell(row.get(c)) for c in head]
        for m in metrics:
            mean, std = row.get(f"{m} mean"), row.get(f"{m} std")
            cells.append("-" if mean is None else f"{mean:.4g} ± {std:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
              params: Sequence[dict] | None = None) -> list[dict]:
    """One row per run dir (SUMMARY_COLUMNS, the run's hyper-parameters from `params`, and its
    final val/* pass@k and accuracy; None where a metric was never logged). Run dirs may be gs://.

    With `out_dir`, also writes out_dir/summary.md and summary.csv (each run named by its path
    relative to out_dir), and when runs differ by seed, summary_seeds.md / .csv with the mean
    and std over seeds of each grid point.
    """
    out = str(out_dir).rstrip("/") if out_dir is not None else None
    params = list(params) if params is not None else [{} for _ in run_dirs]
    param_keys = list(dict.fromkeys(k for p in params for k in p))
    rows = []
    for run_dir, run_params in zip(map(str, run_dirs), params):
        label = run_dir[len(out) + 1:] if out and run_dir.startswith(out + "/") else run_dir
        row = _summary_row(run_dir, label)
        rows.append({"run": row.pop("run"), **run_params, **row, **_final_val(read_metrics(run_dir))})
    if out is not None:
        columns = summary_columns(rows, param_keys)
        _write_text(_join(out, "summary.md"), _markdown(rows, columns))
        _write_text(_join(out, "summary.csv"), _csv(rows, columns))
        if "seed" in param_keys:
            seeds, seed_columns = seed_summary(rows, param_keys)
            _write_text(_join(out, "summary_seeds.md"), _seed_markdown(seeds, seed_columns))
            _write_text(_join(out, "summary_seeds.csv"), _csv(seeds, seed_columns))
    return rows


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pacs_jax sweep",
        description="Expand a sweep file into training runs; run them here (local), print the "
                    "commands (print), or launch them on TPU VMs (tpu); then write summary.md/.csv.",
    )
    parser.add_argument("sweep_file")
    parser.add_argument("--mode", choices=["local", "print", "tpu"], default="local")
    parser.add_argument("--dry-run", action="store_true",
                        help="local: print the commands only; tpu: pass --dry-run to train_tpu.sh")
    parser.add_argument("--tpu", default="", help="tpu mode: VM name(s), comma-separated")
    parser.add_argument("--zone", default=None, help="tpu mode (default: $ZONE or gcloud's config)")
    parser.add_argument("--project", default=None, help="tpu mode (default: $PROJECT or gcloud's config)")
    parser.add_argument("--type", default=None, dest="tpu_type",
                        help="tpu mode: the VMs' accelerator type (e.g. v5litepod-8); each run then goes through "
                             "launch/spot_loop.sh, which recreates a preempted VM and resumes the run")
    parser.add_argument("--queued", action="store_true",
                        help="tpu mode with --type: recreate VMs through queued resources")
    parser.add_argument("--summary-only", action="store_true", help="only (re)write the summary")
    parser.add_argument("--poll-seconds", type=float, default=60,
                        help="tpu mode: how often to look whether a run has finished (default 60)")
    args = parser.parse_args(argv)

    try:
        sweep = load_sweep(args.sweep_file)
        runs = expand(sweep)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary_dir = _join(sweep.run_root, sweep.name)
    print(f"sweep {sweep.name}: {len(runs)} runs under {summary_dir}", flush=True)

    failed: list[str] = []
    if args.mode == "print" or (args.mode == "local" and args.dry_run):
        for run in runs:
            print(shlex.join(train_command(sweep, run)))
        return 0
    if args.mode == "local" and not args.summary_only:
        failed = run_local(sweep, runs)
    elif args.mode == "tpu" and not args.summary_only:
        tpus = [t for t in args.tpu.split(",") if t]
        try:
            failed = run_tpu(sweep, runs, tpus, args.zone, args.project, args.dry_run, args.poll_seconds,
                             args.tpu_type, args.queued)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.dry_run:
            return 1 if failed else 0

    rows = summarize([run.run_dir for run in runs], summary_dir, [run.params for run in runs])
    param_keys = list(dict.fromkeys(k for run in runs for k in run.params))
    print(_markdown(rows, summary_columns(rows, param_keys)))
    if "seed" in param_keys:
        print(_seed_markdown(*seed_summary(rows, param_keys)))
    print(f"summary: {_join(summary_dir, 'summary.md')} and summary.csv")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
