"""The command line as a user runs it: generate prints only the completion, convert round-trips
HF <-> Orbax, eval writes pass@k reports for a training checkpoint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    result = subprocess.run([sys.executable, "-m", "pacs_jax", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm2_path):
    """A random tiny Llama that uses SmolLM2's real tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny_chat")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # decisive greedy choices
    model.save_pretrained(folder)
    for item in Path(smollm2_path).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy2(item, folder / item.name)
    return folder, model, tokenizer


def test_generate_prints_only_the_completion(tiny_chat_model):
    folder, model, tokenizer = tiny_chat_model
    prompt = "What is 12 + 30?"
    out = run_cli("generate", "--model", str(folder), "--prompt", prompt, "--chat", "--greedy", "--max-new-tokens", "16")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.rstrip("\n") == expected


def test_convert_hf_orbax_hf_round_trip(tiny_chat_model, tmp_path):
    folder, model, _ = tiny_chat_model
    run_cli("convert", "--from-hf", str(folder), "--to-orbax", str(tmp_path / "orbax"))
    assert (tmp_path / "orbax" / "params").is_dir() and (tmp_path / "orbax" / "tokenizer.json").is_file()
    run_cli("convert", "--from-orbax", str(tmp_path / "orbax"), "--to-hf", str(tmp_path / "hf"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 900, 31, 7, 2000]])
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
    out = run_cli("--help")
    for command in ("train", "eval", "generate", "convert", "sweep", "plot"):
        assert command in out
