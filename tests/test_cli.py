"""The command line as a user runs it: generate prints only the completion, convert round-trips
HF <-> Orbax, eval writes pass@k reports for a training checkpoint."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
# What libtpu prints when JAX probes for a TPU off a TPU VM (item 7 of issue 12): a CPU user sees none of it.
LIBTPU_NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle", "Source Location Trace")


def run_cli(*args, timeout=600, env=None):
    result = subprocess.run([sys.executable, "-m", "pacs_jax", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def user_env() -> dict:
    """The environment of a user's shell on this machine: no JAX_PLATFORMS or XLA_FLAGS from the test setup."""
    return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}


@pytest.fixture(scope="module")
def tiny_chat_model(tiny_hf_chat_model):
    """A random tiny Llama with a BPE tokenizer trained here and a chat template (tests/conftest.py)."""
    return tiny_hf_chat_model


def test_generate_prints_only_the_completion(tiny_chat_model):
    """Run as a CPU user runs it (JAX_PLATFORMS unset): libtpu's TPU probing prints nothing."""
    folder, model, tokenizer = tiny_chat_model
    prompt = "What is 12 + 30?"
    result = subprocess.run(
        [sys.executable, "-m", "pacs_jax", "generate", "--model", str(folder), "--prompt", prompt, "--chat", "--greedy",
         "--max-new-tokens", "16"], cwd=REPO, capture_output=True, text=True, timeout=600, env=user_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [word for word in LIBTPU_NOISE if word in result.stderr], result.stderr
    out = result.stdout
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected.strip() and out.rstrip("\n") == expected


def test_convert_hf_orbax_hf_round_trip(tiny_chat_model, tmp_path):
    folder, model, _ = tiny_chat_model
    run_cli("convert", "--from-hf", str(folder), "--to-orbax", str(tmp_path / "orbax"))
    assert (tmp_path / "orbax" / "params").is_dir() and (tmp_path / "orbax" / "tokenizer.json").is_file()
    run_cli("convert", "--from-orbax", str(tmp_path / "orbax"), "--to-hf", str(tmp_path / "hf"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 300, 31, 7, 200]])
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


TINY = [
    "model.tokenizer=char",
    "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}",
    "data.prompt_template={problem}=", "data.max_prompt_tokens=16", "data.synthetic_size=32",
    "data.val={arith: 'synthetic:arithmetic?seed=3&size=8'}",
    "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.prompt_buckets=[16]",
    "reward.workers=1", "trainer.prompts_per_step=8", "trainer.mini_batches=1", "trainer.tensorboard=false",
    "eval.n_samples=4", "eval.max_new_tokens=6", "eval.prompts_per_batch=8",
]


def test_eval_of_a_training_checkpoint_and_export(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", "--config", "/dev/null", *TINY, f"trainer.run_dir={run_dir}", "trainer.total_steps=1")
    out = run_cli("eval", "--config", str(run_dir / "config.yaml"), "--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "eval"))
    assert "pass@1" in out
    metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    arith = metrics["sources"]["arith"]
    assert set(arith) >= {"pass@1", "pass@2", "pass@4", "accuracy", "response_length/mean"} and arith["n_problems"] == 8
    assert arith["pass@1"] <= arith["pass@2"] <= arith["pass@4"]
    rollouts = (tmp_path / "eval" / "eval_rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 8 * 4
    run_cli("convert", "--from-run", str(run_dir), "--to-hf", str(tmp_path / "export"))
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.config.num_hidden_layers == 1
    run_cli("plot", str(run_dir), "--out", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "reward.png").stat().st_size > 0


def test_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "pacs_jax", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=user_env())
    assert result.returncode == 0, result.stderr
    for command in ("train", "eval", "generate", "convert", "sweep", "plot", "compile"):
        assert command in result.stdout
    assert result.stderr == ""


@pytest.mark.slow
def test_compile_the_debug_config_as_a_user_types_it():
    """The char tokenizer's vocabulary is known without files, so the main config compiles for a
    TPU slice as it is; libtpu, loaded for the topology, prints nothing on this CPU machine."""
    result = subprocess.run(
        [sys.executable, "-m", "pacs_jax", "compile", "--config", "configs/debug_cpu.yaml", "--topology", "v5e-4"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=user_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fits: every program compiles for v5e-4" in result.stdout
    from pacs_jax.models.tokenizer import CharTokenizer

    assert f"vocab {CharTokenizer().vocab_size}," in result.stdout
    assert not [word for word in LIBTPU_NOISE if word in result.stderr], result.stderr


def test_cpu_default_leaves_a_platform_the_user_chose_or_a_tpu_vm_alone(monkeypatch):
    import importlib.util

    import pacs_jax

    monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")
    assert not pacs_jax.default_to_cpu_without_accelerator()
    assert os.environ["JAX_PLATFORMS"] == "cpu,tpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-64")  # a TPU VM's environment
    assert not pacs_jax.default_to_cpu_without_accelerator()
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
    # With libtpu installed (the test extras) JAX would probe for a TPU; on a machine without an
    # accelerator (CI's) the default is the CPU.
    assert importlib.util.find_spec("libtpu") is not None
    accelerator = Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("accel*"))
    assert pacs_jax.default_to_cpu_without_accelerator() is not accelerator
    assert os.environ.get("JAX_PLATFORMS") == (None if accelerator else "cpu")


def test_a_rerun_reads_its_programs_from_the_compile_cache(tmp_path):
    """trainer.compile_cache: the first run writes its programs there, a second run of the same
    config (a rerun, a resume, a sweep point) reads the rollout and the update back."""
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_LOG_COMPILES": "1"}  # jax then logs each persistent-cache hit
    args = ("train", "--config", "/dev/null", *TINY, "trainer.total_steps=1", f"trainer.compile_cache={cache}")
    first = subprocess.run([sys.executable, "-m", "pacs_jax", *args, f"trainer.run_dir={tmp_path / 'a'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Persistent compilation cache hit" not in first.stderr and any(cache.iterdir())
    second = subprocess.run([sys.executable, "-m", "pacs_jax", *args, f"trainer.run_dir={tmp_path / 'b'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    hits = set(re.findall(r"Persistent compilation cache hit for '(\w+)'", second.stderr))
    # The rollout is the compacting engine's programs on CPU (pacs_jax/sampler/compact.py), then the update.
    assert {"jit__start", "jit__decode", "jit__finish", "jit_update"} <= hits, second.stderr[-3000:]


def test_train_prints_each_validation_and_a_summary(tmp_path):
    """The console as a user reads it: one line per validation set at each validation, and at the
    end the reward over the first and last steps and held-out pass@1 before -> after, each equal to
    what metrics.jsonl holds. A run of 0 steps (a warm-up and export only) prints no summary."""
    run_dir = tmp_path / "run"
    out = run_cli("train", "--config", "/dev/null", *TINY, f"trainer.run_dir={run_dir}", "trainer.total_steps=2",
                  "trainer.eval_every=2", "trainer.val_before_train=true", "trainer.val_sampling=eval")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0], records[-1]
    for record in (before, after):
        passes = " ".join(f"pass@{k} {record[f'val/arith/pass@{k}']:.3f}" for k in (1, 2, 4))
        assert f"validation at step {record['step']} | arith | {passes} | 8 problems" in out
    rewards = [r["reward/mean"] for r in records if "reward/mean" in r]
    assert f"reward:      {np.mean(rewards):.3f} (first 2 steps) -> {np.mean(rewards):.3f} (last 2 steps)" in out
    assert f"val/arith/pass@1: {before['val/arith/pass@1']:.3f} (step 0) -> {after['val/arith/pass@1']:.3f} (step 2)" in out
    out = run_cli("train", "--config", "/dev/null", *TINY, f"trainer.run_dir={tmp_path / 'zero'}", "trainer.total_steps=0")
    assert "done: 0 steps" in out and "reward:" not in out
