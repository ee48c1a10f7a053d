"""The README's first command as a new user runs it: `bash launch/cpu_debug.sh` from a fresh copy
of the repository, with the default config and its default (relative) run directory, then the
README's `eval --checkpoint runs/debug_cpu/checkpoints`. Only the step counts are shortened.

Last round every test passed while this command crashed on its first checkpoint save (Orbax
wants absolute paths; the default run directory is relative and the tests used absolute tmp
paths), so nothing here passes an absolute path to the project.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fresh_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked + untracked-but-not-ignored): no runs/, no .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _user_env() -> dict:
    """The user's environment: the interpreter the project is installed in, no test-only flags
    (no virtual CPU devices, no PYTHONPATH into the original checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH", "VIRTUAL_ENV", "JAX_PLATFORMS")}
    env["PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    clone = _fresh_copy(tmp_path_factory.mktemp("clone"))
    result = subprocess.run(
        ["bash", "launch/cpu_debug.sh", "--no-install", "trainer.total_steps=2", "sft.steps=5",
         "trainer.save_every=1", "trainer.eval_every=2", "eval.max_problems=8"],
        cwd=clone, env=_user_env(), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return clone, result


def test_cpu_debug_script_trains_and_saves_in_the_default_run_dir(debug_run):
    clone, result = debug_run
    run_dir = clone / "runs" / "debug_cpu"
    assert "Traceback" not in result.stderr
    assert (run_dir / "DONE").exists()
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if "reward/mean" in r} == {1, 2}
    assert "runs/debug_cpu" in result.stdout


def test_readme_eval_command_reads_the_relative_checkpoint_dir(debug_run):
    clone, _ = debug_run
    result = subprocess.run(
        [sys.executable, "-m", "pacs_jax", "eval", "--config", "configs/debug_cpu.yaml",
         "--checkpoint", "runs/debug_cpu/checkpoints", "eval.max_problems=8", "eval.n_samples=2"],
        cwd=clone, env=_user_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Traceback" not in result.stderr
    assert "pass@1" in result.stdout + result.stderr


def test_no_install_without_dependencies_says_what_to_do(tmp_path):
    """--no-install with an interpreter that lacks the dependencies stops at once with the fix."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {**_user_env(), "PYTHON": str(bare / "bin" / "python")}
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "cpu_debug.sh"), "--no-install"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "lacks the project's dependencies" in result.stderr
    assert "without --no-install" in result.stderr
    assert "Traceback" not in result.stderr
