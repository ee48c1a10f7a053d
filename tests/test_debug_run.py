"""The main job's own features, run the way configs/debug_cpu.yaml uses them (shrunk to tiny
shapes and a few steps): the SFT warm-up, validation before training and every eval_every steps,
TensorBoard, rollout dumps, a separate checkpoint_dir, export_hf, SIGINT, the save after a failed
step; and a run on an HF model folder whose tokenizer has a chat template.

One uninterrupted run (module fixture) is the reference the interrupted runs must equal."""

import json
import os
import signal
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from pacs_jax.checkpoint import Checkpointer
from pacs_jax.config import load_config
from pacs_jax.models.tokenizer import load_tokenizer
from pacs_jax.rewards.math import score as math_score
from pacs_jax.rewards.pool import VerifierPool
from pacs_jax.policy import load_policy, restore_policy
from pacs_jax.train import train

from conftest import build_tiny_hf_chat_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "configs" / "debug_cpu.yaml"
# configs/debug_cpu.yaml with tiny shapes and a few steps; every feature it switches on stays on.
SHRINK = [
    "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,"
    " num_key_value_heads: 1, max_position_embeddings: 64, tie_word_embeddings: true}",
    "data.synthetic_size=64",
    "data.val={arithmetic_val: 'synthetic:arithmetic?seed=1&size=8'}",
    "rollout.group_size=2",
    "reward.workers=1",
    "sft.steps=60",
    "sft.lr=1e-2",  # enough for the tiny model to learn the answer format (\boxed{}), not the sums
    "sft.batch_size=8",
    "eval.prompts_per_batch=8",
    "trainer.total_steps=4",
    "trainer.prompts_per_step=8",
    "trainer.mini_batches=2",
    "trainer.save_every=2",
    "trainer.eval_every=2",
    "trainer.dump_rollouts_every=2",
]
TRAIN_ROWS = 8 * 2  # prompts_per_step x group_size
TIMINGS = ("time/", "tokens_per_s", "reward/check_s")


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in TIMINGS)}


def debug_config(run_dir, *extra):
    return load_config(DEBUG_CONFIG, [*SHRINK, f"trainer.run_dir={run_dir}", *extra])


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def policy_arrays(config, checkpoint_dir, step):
    policy, _ = restore_policy(config, str(checkpoint_dir), step)
    return [np.asarray(x) for x in jax.tree.leaves(policy)]


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TFRecord event files under `folder`, read with the protobuf alone."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("debug_run")
    config = debug_config(root / "run", f"trainer.checkpoint_dir={root / 'ckpt'}", f"trainer.export_hf={root / 'hf'}")
    outputs = train(config)
    return config, root, outputs


def test_debug_config_switches_on_what_this_file_tests():
    # If the shipped config stops using a feature, this file no longer tests the user's path.
    config = load_config(DEBUG_CONFIG)
    t = config.trainer
    assert config.sft.steps > 0 and t.eval_every > 0 and t.tensorboard and t.val_before_train and t.dump_rollouts_every > 0


def test_debug_run_logs_validation_and_training(debug_run):
    config, root, outputs = debug_run
    assert outputs["step"] == 4
    records = read_metrics(root / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    # Step 0: validation of the warmed-up policy before any RL step, nothing else.
    assert {k for k in records[0] if k != "step"} and all(k.startswith("val/") for k in records[0] if k != "step")
    n = config.eval.n_samples  # debug_cpu.yaml validates with the eval section's sampling (pass@k)
    for record in (records[0], records[2], records[4]):
        assert record["val/arithmetic_val/n_samples"] == n and record["val/arithmetic_val/n_problems"] == 8
        assert f"val/arithmetic_val/pass@{n}" in record
    assert not any(k.startswith("val/") for k in records[1]) and "reward/mean" in records[1]
    # The SFT warm-up ran: a random policy never writes \boxed{}, the warmed-up one mostly does.
    assert records[0]["val/arithmetic_val/format_ok"] > 0.5

    # TensorBoard inside the trainer: the same numbers as metrics.jsonl.
    scalars = tensorboard_scalars(root / "run" / "tensorboard")
    for record in records:
        for key, value in record.items():
            if key != "step":
                # tensorboardX writes "pass@1" as "pass_1"
                assert scalars[key.replace("@", "_")][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_debug_run_dumps_generations_with_their_rewards(debug_run):
    config, root, _ = debug_run
    records = {r["step"]: r for r in read_metrics(root / "run")}
    dumps = root / "run" / "rollouts"
    assert sorted(p.name for p in dumps.iterdir()) == [
        "train_000002.jsonl", "train_000004.jsonl", "val_000000.jsonl", "val_000002.jsonl", "val_000004.jsonl",
    ]
    for step in (2, 4):
        lines = read_jsonl(dumps / f"train_{step:06d}.jsonl")
        assert len(lines) == TRAIN_ROWS and {line["step"] for line in lines} == {step}
        # Each dumped reward is what the verifier gives the dumped text (re-checked here directly),
        # and together they are the step's logged reward.
        for line in lines:
            assert line["score"] == math_score(line["response"], line["answer"])
            assert line["prompt"].endswith("=") and line["problem"] in line["prompt"]
        assert np.mean([line["score"] for line in lines]) == pytest.approx(records[step]["reward/mean"])
        assert np.mean([line["response_length"] for line in lines]) == pytest.approx(records[step]["response_length/mean"])
    for step in (0, 2, 4):
        lines = read_jsonl(dumps / f"val_{step:06d}.jsonl")
        assert len(lines) == 8 * config.eval.n_samples
        for line in lines:
            assert line["score"] == math_score(line["response"], line["answer"])
        assert np.mean([line["score"] for line in lines]) == pytest.approx(records[step]["val/arithmetic_val/accuracy"])


def test_debug_run_checkpoints_sft_and_export(debug_run):
    config, root, outputs = debug_run
    # trainer.checkpoint_dir: the checkpoints go there, not into the run directory.
    assert not (root / "run" / "checkpoints").exists()
    with Checkpointer(root / "ckpt") as checkpointer:
        assert checkpointer.all_steps() == [0, 2, 4]
    assert (root / "run" / "DONE").read_text() == "4\n" and (root / "ckpt" / "DONE").read_text() == "4\n"
    # Step 0 is the policy after the SFT warm-up: not the random initialisation.
    initial = [np.asarray(x) for x in jax.tree.leaves(load_policy(config, load_tokenizer("char")))]
    warmed = policy_arrays(config, root / "ckpt", 0)
    assert any(not np.array_equal(a, b) for a, b in zip(initial, warmed))

    # export_hf: transformers reads the folder and computes the final policy's logits.
    import torch
    from transformers import AutoModelForCausalLM

    policy, tokenizer = restore_policy(config, str(root / "ckpt"), 4)
    ids = np.array([tokenizer.encode("12+34=46")], np.int32)
    ours = np.asarray(policy(jax.numpy.asarray(ids)), np.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(outputs["export_hf"]), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_sigint_and_a_failure_before_the_update_resume_exactly(debug_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C finishes the step and saves it; an exception before step N's update leaves step N-1
    (never N) as the newest checkpoint; reruns end exactly where the uninterrupted run did."""
    reference_config, root, _ = debug_run
    submit = VerifierPool.submit
    training_batches = []  # the training loop's reward batches (validation's have n_samples x 8 rows)

    def submit_then(action_at: int, action):
        def patched(self, responses, ground_truths):
            if len(responses) == TRAIN_ROWS:
                training_batches.append(len(training_batches) + 1)
                if len(training_batches) == action_at:
                    action()
            return submit(self, responses, ground_truths)

        return patched

    # 1. SIGINT while step 1 is checking its answers: step 1 finishes, is saved, the run returns.
    monkeypatch.setattr(VerifierPool, "submit", submit_then(1, lambda: os.kill(os.getpid(), signal.SIGINT)))
    outputs = train(debug_config(tmp_path))
    assert outputs["step"] == 1
    assert "stopped by SIGINT after step 1; checkpoint saved" in capsys.readouterr().out
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        assert checkpointer.latest_step() == 1

    # 2. The rerun fails in step 4's rewards, after its prompts were drawn, before its update:
    #    step 3 (complete, not due for a save) is saved, not step 4.
    def fail():
        raise RuntimeError("verifier crashed")

    training_batches.clear()
    monkeypatch.setattr(VerifierPool, "submit", submit_then(3, fail))  # 3rd batch of this run = step 4
    with pytest.raises(RuntimeError, match="verifier crashed"):
        train(debug_config(tmp_path))
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        assert checkpointer.latest_step() == 3

    # 3. The rerun takes step 4 again and ends with the uninterrupted run's parameters and metrics.
    monkeypatch.setattr(VerifierPool, "submit", submit)
    config = debug_config(tmp_path)
    assert train(config)["step"] == 4
    expected, actual = read_metrics(root / "run"), read_metrics(tmp_path)
    assert [r["step"] for r in actual] == [0, 1, 2, 3, 4]
    for ra, rb in zip(expected, actual):
        assert without_timings(ra) == without_timings(rb)
    for a, b in zip(policy_arrays(reference_config, root / "ckpt", 4), policy_arrays(config, tmp_path / "checkpoints", 4)):
        np.testing.assert_array_equal(a, b)


INSTRUCTION = " Please reason step by step, and put your final answer within \\boxed{}."
CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """conftest's tiny HF folder (a trained BPE tokenizer, a chat template, a random Llama), its
    tokenizer trained on the prompts this test writes so they fit the 64-token bucket."""
    rng = np.random.default_rng(0)
    corpus = [f"{a}+{b}{INSTRUCTION} \\boxed{{{a + b}}}" for a, b in rng.integers(0, 100, size=(500, 2))]
    folder, _, _ = build_tiny_hf_chat_folder(
        tmp_path_factory.mktemp("tiny_llama"), corpus=corpus, chat_template=CHAT_TEMPLATE,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )
    return folder


def test_hf_model_folder_with_chat_template_trains(tiny_hf_model, tmp_path):
    """Trains from an HF folder; its greedy validation (the default val_sampling) writes what
    transformers' greedy generate writes from the exported final policy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(None, [
        f"model.path={tiny_hf_model}", "data.train=synthetic:arithmetic", "data.synthetic_size=64",
        "data.val={val: 'synthetic:arithmetic?seed=3&size=4'}", "trainer.eval_every=2", "eval.max_new_tokens=6",
        "eval.prompts_per_batch=4", "eval.n_samples=8", "eval.temperature=1.0",  # greedy validation ignores these two
        "data.max_prompt_tokens=64", "rollout.prompt_buckets=[64]", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "reward.workers=1", "trainer.prompts_per_step=8", "trainer.mini_batches=2", "trainer.total_steps=2",
        "trainer.tensorboard=false", "trainer.dump_rollouts_every=1", f"trainer.run_dir={tmp_path / 'run'}",
        f"trainer.export_hf={tmp_path / 'export'}",
    ])
    assert config.data.prompt_template == "chat" and config.model.tokenizer == ""  # the folder's tokenizer
    assert train(config)["step"] == 2
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    # The prompts went through the folder's chat template, as transformers renders it.
    reference = AutoTokenizer.from_pretrained(str(tiny_hf_model))
    lines = read_jsonl(tmp_path / "run" / "rollouts" / "train_000001.jsonl")
    assert len(lines) == TRAIN_ROWS
    for line in lines:
        messages = [{"role": "user", "content": line["problem"] + INSTRUCTION}]
        assert line["prompt"] == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert line["prompt"].startswith("<|user|>") and line["prompt"].endswith("<|assistant|>")
    # The export carries the tokenizer and its template along with the weights.
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert exported.chat_template == CHAT_TEMPLATE and len(exported) == len(reference)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), torch_dtype=torch.float32)
    assert model.config.vocab_size == len(reference)

    assert records[1]["val/val/n_samples"] == 1 and "val/val/pass@2" not in records[1]
    lines = read_jsonl(tmp_path / "run" / "rollouts" / "val_000002.jsonl")
    assert len(lines) == 4 and len({line["response"] for line in lines}) > 1
    for line in lines:
        ids = torch.tensor([reference(line["prompt"], add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=reference.eos_token_id,
                                 pad_token_id=reference.pad_token_id)
        new_tokens = out[0, ids.shape[1]:].tolist()
        if reference.eos_token_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(reference.eos_token_id) + 1]
        assert line["response"] == reference.decode(new_tokens, skip_special_tokens=True), line
        assert line["response_length"] == len(new_tokens)
    assert records[1]["val/val/accuracy"] == pytest.approx(np.mean([line["score"] for line in lines]))
