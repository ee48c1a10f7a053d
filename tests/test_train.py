"""The trainer end to end on a tiny model: every algorithm runs, resume is exact, SIGTERM saves,
a corrupt checkpoint falls back, bad input fails in one line before anything compiles."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pacs_jax.checkpoint import Checkpointer
from pacs_jax.config import ConfigError, load_config
from pacs_jax.policy import restore_policy
from pacs_jax.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.tokenizer=char",
    "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}",
    "data.train=synthetic:arithmetic",
    "data.prompt_template={problem}=",
    "data.max_prompt_tokens=16",
    "data.synthetic_size=64",
    "rollout.group_size=2",
    "rollout.max_new_tokens=6",
    "rollout.prompt_buckets=[16]",
    "reward.workers=1",
    "trainer.prompts_per_step=8",
    "trainer.mini_batches=2",
    "trainer.tensorboard=false",
    "optimizer.lr=1e-3",
    "mesh.data=-1",  # all 8 virtual devices (conftest): the sharded path is what runs
]


def tiny_config(tmp_path, *extra):
    return load_config(None, [*TINY, f"trainer.run_dir={tmp_path}", *extra])


# (thread name, program name) of every program jax lowers in this process: a jitted call that
# finds its program compiled already (here: ahead of time, on the compile-ahead thread) lowers nothing.
LOWERED: list[tuple[str, str]] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, fun_name=None, **kw: LOWERED.append((threading.current_thread().name, fun_name))
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None
)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# GRPO (with its KL term) runs end to end in test_grpo_with_kl_resumes_exactly.
@pytest.mark.parametrize("algorithm", ["pacs", "ppo", "rloo"])
def test_each_algorithm_runs_end_to_end(tmp_path, algorithm):
    config = tiny_config(tmp_path, f"algorithm.name={algorithm}", "trainer.total_steps=2", "trainer.save_every=1")
    LOWERED.clear()
    outputs = train(config)
    # The old-log-prob pass (2 mini-batches: it computes) and the update compiled on the second
    # thread while the first rollout compiled, and the trainer's calls ran those programs.
    passes = [(thread, name) for thread, name in LOWERED if name in ("jit(prepare)", "jit(update)")]
    assert sorted(passes) == [("compile-ahead_0", "jit(prepare)"), ("compile-ahead_0", "jit(update)")]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"])
        assert 0.0 <= record["reward/mean"] <= 1.0
        for key in ("response_length/mean", "time/step_s", "time/rollout_s", "time/reward_s", "time/update_s", "tokens_per_s"):
            assert key in record
    if algorithm == "pacs":
        assert "pacs/critic_accuracy" in records[0]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "DONE").is_file()
    with Checkpointer(outputs["checkpoints"]) as checkpointer:
        assert checkpointer.latest_step() == 2
    policy, _ = restore_policy(config, outputs["checkpoints"])
    assert np.isfinite(np.asarray(policy.embed[...])).all()


# Exact resume (metrics and parameters equal to an uninterrupted run, after SIGINT and after a
# failed step) is tested on the debug config in test_debug_run.py; GRPO with KL below.


def test_corrupt_latest_checkpoint_resumes_from_previous(tmp_path, caplog):
    train(tiny_config(tmp_path, "trainer.total_steps=2", "trainer.save_every=1"))
    # Damage every file of the newest step's train state.
    for path in (tmp_path / "checkpoints" / "2").rglob("*"):
        if path.is_file() and "state" in str(path):
            path.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        train(tiny_config(tmp_path, "trainer.total_steps=3", "trainer.save_every=1"))
    assert any("step 2" in message and "does not restore" in message for message in caplog.messages)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    args = [sys.executable, "-m", "pacs_jax", "train", "--config", "/dev/null", *TINY,
            f"trainer.run_dir={tmp_path}", "trainer.total_steps=1000", "trainer.save_every=1000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output and "checkpoint saved" in output
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        step = checkpointer.latest_step()
    assert step >= 2 and step == read_metrics(tmp_path)[-1]["step"]
    config = load_config(None, [*TINY, f"trainer.run_dir={tmp_path}", "trainer.total_steps=1000"])
    restore_policy(config, str(tmp_path / "checkpoints"), step)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.train=/nonexistent/train.jsonl", "data file not found: /nonexistent/train.jsonl"),
        ("model.path=/nonexistent/model", "/nonexistent/model"),
        ("trainer.prompts_per_step=7", "trainer.mini_batches=2 must divide trainer.prompts_per_step=7"),
        ("trainer.prompts_per_step=4", "trainer.prompts_per_step"),
        ("mesh.tensor=3", "mesh"),
        ("trainer.no_such_key=1", "unknown key trainer.no_such_key"),
        ("algorithm.name=dpo", "algorithm.name: 'dpo' is not one of"),
    ],
)
def test_bad_input_is_one_line_before_compiling(tmp_path, override, message):
    args = [sys.executable, "-m", "pacs_jax", "train", "--config", "/dev/null", *TINY, f"trainer.run_dir={tmp_path}", override]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_empty_dataset_after_filtering_is_an_error(tmp_path):
    config = tiny_config(tmp_path, "data.max_prompt_tokens=3", "rollout.prompt_buckets=[4]")
    with pytest.raises(ValueError, match="no usable prompts"):
        train(config)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="rollout.group_size must be >= 2 for the rloo"):
        load_config(None, ["model.arch={hidden_size: 8}", "algorithm.name=rloo", "rollout.group_size=1"])
    with pytest.raises(ConfigError, match="optimizer.lr: expected a number"):
        load_config(None, ["model.arch={hidden_size: 8}", "optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="rollout.decode_segments must be >= 1"):
        load_config(None, ["model.arch={hidden_size: 8}", "rollout.decode_segments=0"])
    with pytest.raises(ConfigError, match="rollout.prefill_chunk must be >= 0"):
        load_config(None, ["model.arch={hidden_size: 8}", "rollout.prefill_chunk=-8"])
    with pytest.raises(ConfigError, match="rollout.decode_layers: 'unroll' is not one of"):
        load_config(None, ["model.arch={hidden_size: 8}", "rollout.decode_layers=unroll"])
    with pytest.raises(ConfigError, match="trainer.val_before_train=true needs validation sets in data.val"):
        load_config(None, ["model.arch={hidden_size: 8}", "trainer.val_before_train=true"])
    with pytest.raises(ConfigError, match="trainer.dump_rollouts_every must be >= 0"):
        load_config(None, ["model.arch={hidden_size: 8}", "trainer.dump_rollouts_every=-1"])
    with pytest.raises(ConfigError, match="trainer.val_sampling: 'sample' is not one of"):
        load_config(None, ["model.arch={hidden_size: 8}", "trainer.val_sampling=sample"])
    with pytest.raises(ConfigError, match="trainer.eval_every must be >= 0"):
        load_config(None, ["model.arch={hidden_size: 8}", "trainer.eval_every=-5"])
    with pytest.raises(ConfigError, match="trainer.micro_batches=3 must divide"):
        load_config(None, ["model.arch={hidden_size: 8}", "trainer.prompts_per_step=8", "trainer.mini_batches=2", "trainer.micro_batches=3"])


TIMINGS = ("time/", "tokens_per_s", "reward/check_s")


def assert_same_metrics(expected, actual, ignore_prefix: tuple = ()):
    """Two runs logged the same steps with the same values (timings, and keys starting with
    `ignore_prefix`, apart)."""
    skip = (*TIMINGS, *((ignore_prefix,) if isinstance(ignore_prefix, str) else ignore_prefix))
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for ra, rb in zip(expected, actual):
        assert {k for k in ra if not k.startswith(skip)} == {k for k in rb if not k.startswith(skip)}
        for key in ra:
            if not key.startswith(skip):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def assert_same_policy(config_a, dir_a, config_b, dir_b, step):
    """Parameters of two runs' checkpoints at `step` are bit-for-bit equal."""
    pa, _ = restore_policy(config_a, str(dir_a), step)
    pb, _ = restore_policy(config_b, str(dir_b), step)
    for x, y in zip(jax.tree.leaves(jax.tree.map(np.asarray, pa)), jax.tree.leaves(jax.tree.map(np.asarray, pb))):
        np.testing.assert_array_equal(x, y)


def test_grpo_with_kl_resumes_exactly(tmp_path):
    # The KL term's reference policy is part of the checkpoint; the restore target must hold it.
    grpo = ["algorithm.name=grpo", "algorithm.kl_coef=0.1", "trainer.save_every=2"]
    straight = tiny_config(tmp_path / "straight", *grpo, "trainer.total_steps=3")
    train(straight)
    train(tiny_config(tmp_path / "split", *grpo, "trainer.total_steps=2"))
    resumed = tiny_config(tmp_path / "split", *grpo, "trainer.total_steps=3")
    outputs = train(resumed)
    assert outputs["step"] == 3
    records = read_metrics(tmp_path / "split")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and 0 <= r["reward/mean"] <= 1 for r in records)
    assert any("kl" in key for key in records[0])  # the KL term is on
    assert_same_metrics(read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split"))
    assert_same_policy(straight, tmp_path / "straight" / "checkpoints", resumed, tmp_path / "split" / "checkpoints", 3)


def test_resume_never_starts_over_and_keeps_the_earlier_run(tmp_path):
    earlier = tiny_config(tmp_path, "trainer.total_steps=2", "trainer.save_every=1")
    train(earlier)
    earlier_metrics = (tmp_path / "metrics.jsonl").read_text()
    # A changed model no longer restores; the error recommends resume=never, which must then work.
    wider = ["model.arch={hidden_size: 64, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}"]
    with pytest.raises(RuntimeError, match="trainer.resume=never"):
        train(tiny_config(tmp_path, "trainer.total_steps=2", "trainer.save_every=1", *wider))
    config = tiny_config(tmp_path, "trainer.total_steps=2", "trainer.save_every=1", "trainer.resume=never")
    assert train(config)["step"] == 2
    # Nothing was deleted: the earlier run's checkpoints and logs are in replaced-<time> folders,
    # where Orbax no longer lists them.
    (old_checkpoints,) = (tmp_path / "checkpoints").glob("replaced-*")
    assert sorted(p.name for p in old_checkpoints.iterdir()) == ["0", "1", "2", "DONE"]
    (old_logs,) = tmp_path.glob("replaced-*")
    assert (old_logs / "metrics.jsonl").read_text() == earlier_metrics and (old_logs / "DONE").is_file()
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [0, 1, 2]
    # Started over: its own steps only, the same as the earlier run from an empty directory.
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert_same_metrics(read_metrics(old_logs), read_metrics(tmp_path))
    assert_same_policy(earlier, old_checkpoints, config, tmp_path / "checkpoints", 2)


class Injected(RuntimeError):
    """A fault injected into one phase of the real trainer (the model, data and update are real)."""


def _fail_at(function, step_to_fail: int, before: bool = True):
    """`function` wrapped to raise Injected at its `step_to_fail`-th call (before calling it, like a
    compile-time RESOURCE_EXHAUSTED, or after it returned)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == step_to_fail:
            raise Injected(f"injected failure at call {calls[0]}")
        out = function(*args, **kwargs)
        if not before and calls[0] == step_to_fail:
            raise Injected(f"injected failure after call {calls[0]}")
        return out

    return wrapped


def test_update_that_fails_before_running_saves_the_steps_before_it(tmp_path, monkeypatch):
    """Step 3's update raises before it runs (as a compile error on a new shape would): the state
    was not donated, so step 2 is saved (save_every=50 saved nothing since step 0), and the rerun
    ends where an uninterrupted run ends."""
    from pacs_jax import train as train_module

    real_make = train_module.make_update_fn
    monkeypatch.setattr(train_module, "make_update_fn", lambda *a, **k: _fail_at(real_make(*a, **k), 3))
    config = tiny_config(tmp_path / "failed", "trainer.total_steps=4", "trainer.save_every=50")
    with pytest.raises(Injected):
        train(config)
    with Checkpointer(tmp_path / "failed" / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [0, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "failed")] == [1, 2]
    monkeypatch.setattr(train_module, "make_update_fn", real_make)
    train(config)
    straight = tiny_config(tmp_path / "straight", "trainer.total_steps=4", "trainer.save_every=50")
    train(straight)
    assert [r["step"] for r in read_metrics(tmp_path / "failed")] == [1, 2, 3, 4]
    assert_same_metrics(read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "failed"))
    assert_same_policy(straight, tmp_path / "straight" / "checkpoints", config, tmp_path / "failed" / "checkpoints", 4)


def test_update_that_failed_while_running_saves_nothing_mislabelled(tmp_path, monkeypatch):
    """Step 2's update ran (donating step 1's state) and its result was lost: there is no state
    left to save, and no checkpoint claims to be step 1 or 2."""
    from pacs_jax import train as train_module

    real_make = train_module.make_update_fn
    monkeypatch.setattr(train_module, "make_update_fn", lambda *a, **k: _fail_at(real_make(*a, **k), 2, before=False))
    config = tiny_config(tmp_path, "trainer.total_steps=3", "trainer.save_every=50")
    with pytest.raises(Injected):
        train(config)
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [0]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_failure_while_logging_a_step_leaves_no_hole_in_the_log(tmp_path, monkeypatch):
    """Validation of step 2 fails after its update: step 2 is saved and its record is logged,
    so the resumed log reads 1, 2, 3, 4, equal to an uninterrupted run's."""
    from pacs_jax import train as train_module

    val = ["trainer.eval_every=2", "data.val={v: synthetic:arithmetic}", "eval.max_problems=4", "eval.prompts_per_batch=8"]
    real_validate = train_module.validate
    monkeypatch.setattr(train_module, "validate", _fail_at(real_validate, 1))
    config = tiny_config(tmp_path / "failed", "trainer.total_steps=4", "trainer.save_every=50", *val)
    with pytest.raises(Injected):
        train(config)
    assert [r["step"] for r in read_metrics(tmp_path / "failed")] == [1, 2]
    with Checkpointer(tmp_path / "failed" / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [0, 2]
    monkeypatch.setattr(train_module, "validate", real_validate)
    train(config)
    records = read_metrics(tmp_path / "failed")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    straight = tiny_config(tmp_path / "straight", "trainer.total_steps=4", "trainer.save_every=50", *val)
    train(straight)
    # Step 2's validation is what failed, so its record lacks the val/ keys; everything else equal.
    assert_same_metrics(read_metrics(tmp_path / "straight"), records, ignore_prefix="val/")


def test_dynamic_sampling_trains_on_varied_groups_and_resumes_exactly(tmp_path):
    """DAPO's dynamic sampling through the real trainer: rounds of prompts until the batch holds
    prompts_per_step groups whose rewards vary; the update's batch (the dumped rollouts) holds
    only such groups when the rounds sufficed; the data position counts every prompt sampled, so a
    split run equals a straight one."""
    dynamic = ["algorithm.name=grpo", "trainer.dynamic_sampling=true", "trainer.dynamic_sampling_max_rounds=4",
               "reward.verifier=verifiers_for_tests:first_char_even", "trainer.dump_rollouts_every=1", "trainer.save_every=2"]
    straight = tiny_config(tmp_path / "straight", *dynamic, "trainer.total_steps=3")
    train(straight)
    records = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        rounds, kept = record["filter/rounds"], record["filter/kept_groups"]
        assert 1 <= rounds <= 4 and record["filter/prompts_sampled"] == rounds * 8
        assert kept == 8 or rounds == 4
        lines = [json.loads(x) for x in (tmp_path / "straight" / "rollouts" / f"train_{record['step']:06d}.jsonl").read_text().splitlines()]
        assert len(lines) == 16  # 8 groups of 2
        scores = np.array([line["score"] for line in lines]).reshape(8, 2)
        # Each logged reward is the verifier's on the dumped response (the rows were gathered right).
        assert [line["score"] for line in lines] == [1.0 if line["response"] and ord(line["response"][0]) % 2 == 0 else 0.0 for line in lines]
        assert int((scores[:, 0] != scores[:, 1]).sum()) == kept
        assert record["reward/mean"] == pytest.approx(scores.mean())
    assert any(r["filter/rounds"] > 1 for r in records)  # more prompts were really sampled
    train(tiny_config(tmp_path / "split", *dynamic, "trainer.total_steps=2"))
    resumed = tiny_config(tmp_path / "split", *dynamic, "trainer.total_steps=3")
    train(resumed)
    assert_same_metrics(records, read_metrics(tmp_path / "split"))
    assert_same_policy(straight, tmp_path / "straight" / "checkpoints", resumed, tmp_path / "split" / "checkpoints", 3)
