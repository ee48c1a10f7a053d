"""A run directory's files: where logs go (a local mirror of a gs:// run), copying them to and
from the bucket, the rollout dumps, and moving an earlier run aside (trainer.resume=never)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from etils import epath

from pacs_jax.checkpoint import Checkpointer
from pacs_jax.metrics_log import TENSORBOARD_DIR, WANDB_ID_FILE

ROLLOUTS_DIR = "rollouts"
# What an earlier run left in a run directory; trainer.resume=never moves these aside.
RUN_FILES = ("metrics.jsonl", "config.yaml", "tensorboard", "plots", ROLLOUTS_DIR, "DONE", "wandb_run_id")
# What a remote (gs://) run keeps of its local logs, so that a run resumed on a new VM continues
# them: the metrics, the config, the W&B run id (the same W&B run goes on) and the TensorBoard
# event files (every file of that folder; a resumed session adds its own next to them).
_LOG_FILES = ("metrics.jsonl", "config.yaml", WANDB_ID_FILE)
_LOG_FOLDERS = (TENSORBOARD_DIR,)


def local_run_dir(run_dir: str) -> Path:
    """Where logs are written: run_dir itself, or for a remote (gs://) run a local mirror
    under $PACS_JAX_LOCAL_RUNS (default ~/pacs_jax_runs)."""
    if "://" not in run_dir:
        return Path(run_dir)
    root = Path(os.environ.get("PACS_JAX_LOCAL_RUNS", "~/pacs_jax_runs")).expanduser()
    return root / run_dir.split("://", 1)[1].strip("/").replace("/", "__")


def download_logs(remote: str, local: Path) -> None:
    """A resumed remote run continues the logs it had (the VM that wrote them may be gone)."""
    if "://" not in remote:
        return
    for name in _LOG_FILES:
        source = epath.Path(remote) / name
        if source.exists() and not (local / name).exists():
            (local / name).write_text(source.read_text())
    for folder in _LOG_FOLDERS:
        source = epath.Path(remote) / folder
        if not source.exists():
            continue
        for path in source.iterdir():
            target = local / folder / path.name
            if not target.exists() and path.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())


def upload_logs(local: Path, remote: str, main: bool) -> None:
    if "://" not in remote or not main:
        return
    files = [local / name for name in _LOG_FILES]
    files += [path for folder in _LOG_FOLDERS if (local / folder).is_dir() for path in sorted((local / folder).iterdir())]
    files += sorted((local / "plots").glob("*.png"))
    for path in files:
        if path.is_file():
            target = epath.Path(remote) / path.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def dump_train_rollouts(run_dir: Path, step: int, examples, texts: list[str], lengths, scores, group_size: int) -> None:
    """This step's prompts, responses and rewards as rollouts/train_<step>.jsonl (all processes' rows)."""
    from pacs_jax.evaluate import write_rollouts

    samples = [[(texts[row], lengths[row]) for row in range(i * group_size, (i + 1) * group_size)] for i in range(len(examples))]
    write_rollouts(run_dir / ROLLOUTS_DIR / f"train_{step:06d}.jsonl", examples, samples, scores, group_size, step=step)


def move_earlier_run_aside(checkpointer: Checkpointer, run_dir: str, local_dir: Path, main: bool) -> list[str]:
    """trainer.resume=never: start over without deleting anything. Checkpoint steps move into
    <checkpoint_dir>/replaced-<time>/, the earlier run's logs into <run_dir>/replaced-<time>/.
    Returns the folders that now hold the earlier run."""
    name = f"replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    moved = [checkpointer.move_aside(name)]
    if main:
        folders = {epath.Path(run_dir), epath.Path(local_dir), epath.Path(checkpointer.directory)}
        for folder in folders:  # a gs:// run also has its remote copies of the logs
            present = [folder / item for item in RUN_FILES if (folder / item).exists()]
            if present:
                (folder / name).mkdir(parents=True, exist_ok=True)
                for path in present:
                    path.rename(folder / name / path.name)
                moved.append(folder / name)
    return sorted({str(path) for path in moved if path is not None})
