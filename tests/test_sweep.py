"""pacs_jax.sweep: grid expansion, up-front validation, the commands it prints or launches, the
skip of finished runs, and the summary table (from metrics.jsonl files written here)."""

import csv
import itertools
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pacs_jax import sweep as sweep_mod
from pacs_jax.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEBUG_CPU = REPO / "configs" / "debug_cpu.yaml"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def base_config(tmp_path) -> Path:
    # The smallest config that validates (no model is built here).
    return write_yaml(tmp_path / "base.yaml", {"model": {"arch": {"hidden_size": 16}},
                                               "trainer": {"total_steps": 5}})


def sweep_file(tmp_path: Path, base: Path, **fields) -> Path:
    data = {"base_config": str(base), "name": "pacs_beta", "run_root": str(tmp_path / "runs"),
            "overrides": ["trainer.total_steps=20"],
            "grid": {"algorithm.beta": [1.0, 2.0], "algorithm.weight_mode": ["question", None]},
            "seeds": [0, 1, 2]}
    data.update(fields)
    return write_yaml(tmp_path / "sweep.yaml", {k: v for k, v in data.items() if v is not ...})


# ---------------------------------------------------------------------------- expansion


def test_expand_is_the_cartesian_product_with_seeds(tmp_path, base_config):
    sweep = sweep_mod.load_sweep(sweep_file(tmp_path, base_config))
    runs = sweep_mod.expand(sweep)
    # Brute force: every (beta, weight_mode, seed) once, read back from each run's own config.
    expected = set(itertools.product([1.0, 2.0], ["question", None], [0, 1, 2]))
    got = []
    for run in runs:
        config = load_config(base_config, run.overrides)
        got.append((config.algorithm.beta, config.algorithm.weight_mode, config.trainer.seed))
        assert config.trainer.total_steps == 20 == run.total_steps
        assert config.trainer.run_dir == run.run_dir == str(tmp_path / "runs" / run.name)
    assert len(got) == 12 and set(got) == expected
    assert [r.name for r in runs[:4]] == [
        "pacs_beta/beta=1.0,weight_mode=question,seed=0",
        "pacs_beta/beta=1.0,weight_mode=question,seed=1",
        "pacs_beta/beta=1.0,weight_mode=question,seed=2",
        "pacs_beta/beta=1.0,weight_mode=null,seed=0",
    ]
    assert len({r.run_dir for r in runs}) == 12


def test_names_are_safe_paths_and_shared_last_parts_stay_apart(tmp_path, base_config):
    grid = {"data.train": ["synthetic:arithmetic", "data/my set.jsonl"], "model.arch": [{"hidden_size": 8}],
            "rollout.top_k": [0], "sft.steps": [0], "trainer.mini_batches": [1]}
    sweep = sweep_mod.load_sweep(sweep_file(tmp_path, base_config, grid=grid, seeds=...))
    runs = sweep_mod.expand(sweep)
    assert [r.name for r in runs] == [
        "pacs_beta/train=synthetic_arithmetic,arch=_hidden_size_8_,top_k=0,steps=0,mini_batches=1",
        "pacs_beta/train=data_my_set.jsonl,arch=_hidden_size_8_,top_k=0,steps=0,mini_batches=1",
    ]
    assert load_config(base_config, runs[1].overrides).data.train == "data/my set.jsonl"
    assert load_config(base_config, runs[0].overrides).model.arch == {"hidden_size": 8}

    # Two keys ending in .lr: both spelled out.
    two_lrs = {"optimizer.lr": [1e-6], "sft.lr": [0.001]}
    sweep = sweep_mod.load_sweep(sweep_file(tmp_path, base_config, grid=two_lrs, seeds=...))
    [run] = sweep_mod.expand(sweep)
    assert run.name == "pacs_beta/optimizer.lr=1e-06,sft.lr=0.001"
    config = load_config(base_config, run.overrides)
    assert (config.optimizer.lr, config.sft.lr) == (1e-6, 0.001)


def test_seeds_only(tmp_path, base_config):
    sweep = sweep_mod.load_sweep(sweep_file(tmp_path, base_config, grid=..., seeds=[3, 4]))
    assert [r.name for r in sweep_mod.expand(sweep)] == ["pacs_beta/seed=3", "pacs_beta/seed=4"]


def test_base_config_relative_to_the_sweep_file(tmp_path, base_config, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = sweep_mod.load_sweep(sweep_file(tmp_path, base_config, base_config="base.yaml"))
    assert sweep.base_config == tmp_path / "base.yaml"


def test_shipped_pacs_beta_sweep(monkeypatch):
    if not DEBUG_CPU.is_file():
        pytest.skip("configs/debug_cpu.yaml is not written yet")
    monkeypatch.chdir(REPO)
    runs = sweep_mod.expand(sweep_mod.load_sweep("configs/sweeps/pacs_beta.yaml"))
    assert [load_config(DEBUG_CPU, r.overrides).algorithm.beta for r in runs] == [1.0, 2.0]


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields,message", [
    ({"grid": {"algorithm.beta": [1.0, -1.0]}},
     "sweep run pacs_beta/beta=-1.0,seed=0: algorithm.beta must be > 0"),
    ({"grid": {"algorithm.betta": [1.0]}}, "unknown key algorithm.betta"),
    ({"grid": {"algorithm.weight_mode": ["question", "everything"]}},
     "sweep run pacs_beta/weight_mode=everything,seed=0: algorithm.weight_mode: 'everything' is not one of"),
    ({"grid": {"algorithm.beta": []}}, "grid.algorithm.beta must be a non-empty list"),
    ({"grid": {"beta": [1.0]}}, "grid key 'beta' must be a dotted config key"),
    ({"grid": {"trainer.seed": [1]}}, "trainer.seed is set by the sweep itself"),
    ({"overrides": ["trainer.run_dir=/x"]}, "trainer.run_dir is set by the sweep itself"),
    ({"overrides": ["algorithm.beta=3.0"]}, "algorithm.beta is both in grid and in overrides"),
    ({"overrides": ["trainer.total_steps"]}, "overrides must be a list of 'section.key=value' strings"),
    ({"seeds": [0, "one"]}, "seeds must be a list of integers"),
    ({"grid": ..., "seeds": ...}, "nothing to sweep"),
    ({"name": "my sweep"}, "name 'my sweep' may only hold"),
    ({"base_config": "nowhere.yaml"}, "base_config nowhere.yaml does not exist"),
    ({"grids": {}}, "unknown key 'grids'"),
    ({"grid": {"data.train": ["a/b", "a_b"]}, "seeds": ...}, "get the same folder name"),
])
def test_validation_errors_name_the_key(tmp_path, base_config, fields, message):
    fields = {"grid": {"algorithm.beta": [1.0]}, "overrides": [], "seeds": [0], **fields}
    with pytest.raises(ConfigError) as info:
        sweep_mod.expand(sweep_mod.load_sweep(sweep_file(tmp_path, base_config, **fields)))
    assert message in str(info.value)


def test_cli_fails_before_running_anything(tmp_path, base_config, capsys):
    path = sweep_file(tmp_path, base_config, grid={"algorithm.beta": [1.0, 0.0]})
    assert sweep_mod.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "sweep run pacs_beta/beta=0.0,seed=0: algorithm.beta must be > 0" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- commands


def test_print_mode(tmp_path, base_config, capsys):
    assert sweep_mod.main([str(sweep_file(tmp_path, base_config)), "--mode", "print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep pacs_beta: 12 runs under {tmp_path / 'runs' / 'pacs_beta'}"
    commands = [shlex.split(line) for line in lines[1:]]
    assert len(commands) == 12
    assert commands[0] == [
        sys.executable, "-m", "pacs_jax", "train", "--config", str(base_config), "trainer.total_steps=20",
        "algorithm.beta=1.0", "algorithm.weight_mode=question", "trainer.seed=0",
        f"trainer.run_dir={tmp_path}/runs/pacs_beta/beta=1.0,weight_mode=question,seed=0",
    ]
    assert commands[3][-3:-1] == ["algorithm.weight_mode=null", "trainer.seed=0"]
    assert not (tmp_path / "runs").exists()


def test_local_mode_skips_finished_runs(tmp_path, base_config, capsys):
    """Runs that are finished (DONE, or total_steps steps logged) are not trained again: were one
    started, `python -m pacs_jax train` would fail on the nonexistent model and the sweep with it."""
    path = sweep_file(tmp_path, base_config, grid={"algorithm.beta": [1.0, 2.0]}, seeds=...,
                      overrides=["trainer.total_steps=3", "model.path=/nonexistent/model"])
    first, second = sweep_mod.expand(sweep_mod.load_sweep(path))
    Path(first.run_dir).mkdir(parents=True)
    (Path(first.run_dir) / "DONE").write_text("")
    Path(second.run_dir).mkdir(parents=True)
    # Steps 0, 1, 1 (logged again after a resume), 2: three distinct steps = total_steps.
    rows = [{"step": s, "reward/mean": 0.5} for s in (0, 1, 1, 2)]
    (Path(second.run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert sweep_mod.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("finished already, skipped") == 2
    assert (tmp_path / "runs" / "pacs_beta" / "summary.md").is_file()

    # One step short: the run is started (and fails: there is no such model); the sweep says so.
    # A validation before training (trainer.val_before_train, step 0 without a reward) is no step.
    validation = {"step": 0, "val/arithmetic_val/pass@1": 0.1}
    (Path(second.run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [validation, *rows[1:]]))
    assert not sweep_mod.is_finished(second) and sweep_mod.is_finished(first)
    assert sweep_mod.main([str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("finished already, skipped") == 1
    assert f"{second.name}: FAILED" in captured.out and "1 run(s) failed" in captured.err


def test_tpu_mode_dry_run_launches_one_job_per_run(tmp_path, capfd):
    if not DEBUG_CPU.is_file():
        pytest.skip("configs/debug_cpu.yaml is not written yet (tpu mode needs a config inside the repo)")
    path = sweep_file(tmp_path, DEBUG_CPU, run_root="gs://bucket/sweeps", grid={"algorithm.beta": [1.0, 2.0]},
                      seeds=..., overrides=[])
    argv = [str(path), "--mode", "tpu", "--dry-run", "--tpu", "tpu-a,tpu-b", "--zone", "z", "--project", "p"]
    assert sweep_mod.main(argv) == 0
    out = capfd.readouterr().out
    starts = [shlex.split(line[2:]) for line in out.splitlines()
              if line.startswith("+ gcloud") and "tpu_worker.sh start" in line]
    assert len(starts) == 2
    for start, tpu, beta in zip(sorted(starts, key=lambda c: c[5]), ["tpu-a", "tpu-b"], ["1.0", "2.0"]):
        assert start[5] == tpu and "--worker=all" in start
        remote = shlex.split(start[-1].removeprefix("--command="))
        assert remote[-3:] == ["configs/debug_cpu.yaml", f"algorithm.beta={beta}",
                               f"trainer.run_dir=gs://bucket/sweeps/pacs_beta/beta={beta}"]


def test_tpu_mode_needs_a_config_inside_the_repo_and_a_tpu(tmp_path, base_config, capsys):
    path = sweep_file(tmp_path, base_config)
    assert sweep_mod.main([str(path), "--mode", "tpu", "--dry-run", "--tpu", "t"]) == 2
    assert "must be inside the repository" in capsys.readouterr().err
    assert sweep_mod.main([str(path), "--mode", "tpu", "--dry-run"]) == 2
    assert "--mode tpu needs --tpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------- summary


def test_summary_table(tmp_path):
    rng = np.random.default_rng(0)
    out_dir = tmp_path / "pacs_beta"
    expected = {}
    for name, steps, done in [("beta=1.0", 6, True), ("beta=2.0", 4, False)]:
        run_dir = out_dir / name
        run_dir.mkdir(parents=True)
        reward = rng.uniform(0, 1, steps)
        loss = rng.normal(0, 1, steps)
        step_s = rng.uniform(1, 3, steps)
        rows = [{"step": int(s), "reward/mean": float(reward[s]), "loss": float(loss[s]),
                 "time/step_s": float(step_s[s])} for s in range(steps)]
        # Step 1 redone after a resume (its time counts too: it was spent), a row without rewards
        # (an eval row), and a line cut short by a preemption.
        rows.insert(2, {"step": 1, "reward/mean": float(reward[1]), "loss": float(loss[1]), "time/step_s": 100.0})
        rows.insert(3, {"step": 1, "eval/pass@1": 0.25})
        text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "rew'
        (run_dir / "metrics.jsonl").write_text(text)
        if done:
            (run_dir / "DONE").write_text("")
        else:
            (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"total_steps": 10}}))
        expected[name] = {
            "run": name, "status": "done" if done else "incomplete", "steps": steps,
            "last reward/mean": reward[-1], "max reward/mean": reward.max(), "last loss": loss[-1],
            "wall time (s)": step_s.sum() + 100.0,
        }
    (out_dir / "empty").mkdir()
    expected["empty"] = {"run": "empty", "status": "no metrics", "steps": 0, "last reward/mean": None,
                         "max reward/mean": None, "last loss": None, "wall time (s)": None}

    rows = sweep_mod.summarize([out_dir / n for n in expected], out_dir)
    assert [r["run"] for r in rows] == list(expected)
    for row in rows:
        want = expected[row["run"]]
        # pytest >= 9.2 refuses approx over a dict holding strings: compare the numbers apart.
        assert row.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, (float, np.floating)):
                assert row[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert row[key] == value, key

    with open(out_dir / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == list(expected)
    for r in table:
        want = expected[r["run"]]
        assert r["status"] == want["status"] and int(r["steps"]) == want["steps"]
        for key in ("last reward/mean", "max reward/mean", "last loss", "wall time (s)"):
            assert (r[key] == "") if want[key] is None else float(r[key]) == pytest.approx(want[key], rel=1e-12)

    md = (out_dir / "summary.md").read_text().splitlines()
    assert md[0] == "| run | status | steps | last reward/mean | max reward/mean | last loss | wall time (s) |"
    assert len(md) == 2 + 3
    first = [c.strip() for c in md[2].strip("|").split("|")]
    want = expected["beta=1.0"]
    assert first[:3] == ["beta=1.0", "done", "6"]
    assert [float(c) for c in first[3:]] == pytest.approx(
        [want["last reward/mean"], want["max reward/mean"], want["last loss"], want["wall time (s)"]], rel=1e-3)
    assert md[4].endswith("| - | - | - | - |")


# ---------------------------------------------------------------------------- end to end (needs the trainer)


@pytest.mark.slow
def test_sweep_of_two_tiny_runs_on_cpu(tmp_path, capsys):
    path = write_yaml(tmp_path / "tiny.yaml", {
        "base_config": str(DEBUG_CPU),
        "name": "tiny",
        "run_root": str(tmp_path / "runs"),
        # prompts_per_step: a multiple of the 8 virtual devices conftest creates (mesh.data=-1).
        "overrides": ["trainer.total_steps=2", "trainer.prompts_per_step=8", "trainer.mini_batches=1",
                      "trainer.micro_batches=1", "rollout.group_size=2", "rollout.max_new_tokens=8",
                      "trainer.eval_every=0", "trainer.save_every=0", "sft.steps=0", "trainer.tensorboard=false",
                      "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
                      "num_attention_heads: 2, num_key_value_heads: 1}"],
        "grid": {"algorithm.beta": [1.0, 2.0]},
    })
    assert sweep_mod.main([str(path)]) == 0
    root = tmp_path / "runs" / "tiny"
    for beta in ("1.0", "2.0"):
        lines = (root / f"beta={beta}" / "metrics.jsonl").read_text().splitlines()
        # Two training steps (debug_cpu.yaml also validates before training, logged as step 0).
        assert {json.loads(line)["step"] for line in lines if "reward/mean" in json.loads(line)} == {1, 2}
        assert load_config(root / f"beta={beta}" / "config.yaml").algorithm.beta == float(beta)
    with open(root / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["beta=1.0", "beta=2.0"]
    assert all(int(r["steps"]) == 2 and 0.0 <= float(r["last reward/mean"]) <= 1.0 for r in table)
    assert (root / "summary.md").is_file()

    # Run again: both runs are finished, nothing is trained.
    capsys.readouterr()
    assert sweep_mod.main([str(path)]) == 0
    assert capsys.readouterr().out.count("finished already, skipped") == 2


# ---------------------------------------------------------------------------- hyper-parameters, val, seeds


def test_summary_has_hyperparameters_final_val_and_seed_means(tmp_path):
    out_dir = tmp_path / "sweep"
    params, dirs = [], []
    pass1 = {(1.0, 0): 0.2, (1.0, 1): 0.4, (2.0, 0): 0.5, (2.0, 1): 0.7}
    for (beta, seed), p1 in pass1.items():
        run_dir = out_dir / f"beta={beta},seed={seed}"
        run_dir.mkdir(parents=True)
        rows = [{"step": 1, "reward/mean": 0.1, "loss": 1.0},
                {"step": 2, "reward/mean": 0.3 + seed, "loss": 0.5, "val/math500/pass@1": p1 / 2,
                 "val/math500/pass@4": 0.9, "val/math500/response_length/mean": 100.0},
                {"step": 3, "reward/mean": 0.2 + seed, "loss": 0.4, "val/math500/pass@1": p1,
                 "val/math500/accuracy": p1}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        params.append({"algorithm.beta": beta, "seed": seed})
        dirs.append(run_dir)
    rows = sweep_mod.summarize(dirs, out_dir, params)
    first = rows[0]
    assert first["algorithm.beta"] == 1.0 and first["seed"] == 0
    # The newest value of each val/*/pass@k and accuracy (pass@4 was logged at step 2 only).
    assert first["val/math500/pass@1"] == 0.2 and first["val/math500/pass@4"] == 0.9
    assert "val/math500/response_length/mean" not in first
    with open(out_dir / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:3] == ["run", "algorithm.beta", "seed"]
    assert list(table[0])[-3:] == ["val/math500/accuracy", "val/math500/pass@1", "val/math500/pass@4"]
    with open(out_dir / "summary_seeds.csv", newline="") as f:
        seeds = list(csv.DictReader(f))
    assert [(float(r["algorithm.beta"]), int(r["runs"])) for r in seeds] == [(1.0, 2), (2.0, 2)]
    for row, values in zip(seeds, [[0.2, 0.4], [0.5, 0.7]]):
        assert float(row["val/math500/pass@1 mean"]) == pytest.approx(np.mean(values))
        assert float(row["val/math500/pass@1 std"]) == pytest.approx(np.std(values, ddof=1))
        assert float(row["last reward/mean mean"]) == pytest.approx(0.7)  # 0.2 and 1.2
    md = (out_dir / "summary_seeds.md").read_text().splitlines()
    assert md[0].startswith("| algorithm.beta | runs | last reward/mean |")
    assert "0.3 ± 0.14" in md[2]  # pass@1 of beta 1.0: mean 0.3, std 0.141


# ---------------------------------------------------------------------------- tpu mode against a fake gcloud

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# gcloud for the sweep's tpu mode: gs://X is the file $FAKE/X; every call recorded. `tpu-vm ssh ...
# status` answers from $FAKE/status, one line per call: "unreachable" (ssh fails) or a status,
# optionally "|PATH" to create gs://PATH (the run finishing) as it answers.
echo "$*" >> "$FAKE/calls"
case "$1 $2" in
  "storage cat") f="$FAKE/${3#gs://}"; [[ -f $f ]] && cat "$f" && exit 0; exit 1 ;;
  "storage cp") mkdir -p "$(dirname "$FAKE/${4#gs://}")"; cp "$3" "$FAKE/${4#gs://}"; exit 0 ;;
esac
if [[ "$*" == *"tpu_worker.sh status"* ]]; then
  line="$(head -n 1 "$FAKE/status")"; tail -n +2 "$FAKE/status" > "$FAKE/status.tmp"; mv "$FAKE/status.tmp" "$FAKE/status"
  [[ $line == unreachable ]] && { echo "ssh: connect to host: Connection timed out" >&2; exit 255; }
  if [[ $line == *"|"* ]]; then mkdir -p "$(dirname "$FAKE/${line#*|}")"; touch "$FAKE/${line#*|}"; fi
  echo "${line%%|*}"
fi
exit 0
'''


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    folder = tmp_path / "fake"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "gcloud").write_text(FAKE_GCLOUD)
    (folder / "bin" / "gcloud").chmod(0o755)
    (folder / "calls").write_text("")
    monkeypatch.setenv("PATH", f"{folder / 'bin'}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE", str(folder))
    return folder


def tpu_sweep(tmp_path) -> Path:
    return sweep_file(tmp_path, DEBUG_CPU, run_root="gs://bucket/sweeps", grid={"algorithm.beta": [1.0]},
                      seeds=..., overrides=[])


def test_tpu_mode_dropped_ssh_does_not_fail_a_run_and_rerun_skips_it(tmp_path, fake_gcloud, capsys):
    (fake_gcloud / "status").write_text("unreachable\nrunning 12|bucket/sweeps/pacs_beta/beta=1.0/DONE\n")
    argv = [str(tpu_sweep(tmp_path)), "--mode", "tpu", "--tpu", "tpu-a", "--zone", "z", "--project", "p",
            "--poll-seconds", "0"]
    assert sweep_mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "tpu-a did not answer over ssh; the run goes on there" in out
    calls = (fake_gcloud / "calls").read_text().splitlines()
    starts = [c for c in calls if "tpu_worker.sh start" in c]
    assert len(starts) == 1 and "trainer.run_dir=gs://bucket/sweeps/pacs_beta/beta=1.0" in starts[0]
    # No log streaming: the start returns at once and the sweep watches with short ssh calls.
    assert not any("tpu_worker.sh follow" in c for c in calls)
    assert (fake_gcloud / "bucket/sweeps/pacs_beta/summary.md").read_text().splitlines()[2].startswith(
        "| beta=1.0 | 1 | done |")

    # Again: the run is finished, nothing starts.
    assert sweep_mod.main(argv) == 0
    assert "finished already, skipped" in capsys.readouterr().out
    assert len([c for c in (fake_gcloud / "calls").read_text().splitlines() if "tpu_worker.sh start" in c]) == 1


def test_tpu_mode_a_stopped_trainer_fails_the_run(tmp_path, fake_gcloud, capsys):
    (fake_gcloud / "status").write_text("running 12\nexited 1\n")
    argv = [str(tpu_sweep(tmp_path)), "--mode", "tpu", "--tpu", "tpu-a", "--zone", "z", "--project", "p",
            "--poll-seconds", "0"]
    assert sweep_mod.main(argv) == 1
    captured = capsys.readouterr()
    assert "the trainer on tpu-a stopped unfinished (exited 1)" in captured.out
    assert "running the sweep again resumes it" in captured.out and "1 run(s) failed" in captured.err
