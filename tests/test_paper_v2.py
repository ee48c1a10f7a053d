"""Paper v2's evaluation and prompt: the `beyondaime` format, the system message and the chat
template's thinking switch reach the prompt, and `python -m pacs_jax eval` is resumable (a rerun
after an interruption samples only the unfinished benchmarks and ends equal to an uninterrupted
evaluation) and writes eval_table.md in v2's layout."""

import argparse
import json
from pathlib import Path

import pytest

from pacs_jax import evaluate_cli
from pacs_jax.config import ConfigError, load_config
from pacs_jax.data import build_examples, load_rows
from pacs_jax.evaluate import pass_at_k, v2_table, v2_title
from pacs_jax.models.tokenizer import load_tokenizer
from pacs_jax.rewards.pool import VerifierPool

REPO = Path(__file__).resolve().parents[1]

# The parts of Qwen3's chat template (tokenizer_config.json of Qwen/Qwen3-8B) that a one-turn prompt
# exercises: ChatML turns, and after the assistant header the empty think block of enable_thinking=false.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
V2_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 1+1? Please reason "
             "step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_beyondaime_rows_read_as_problem_and_integer_answer(tmp_path):
    # The public release's columns (ByteDance-Seed/BeyondAIME, split test): problem, answer (an integer).
    path = tmp_path / "beyondaime" / "test.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"problem": "Find $n$.", "answer": 1234}) + "\n" + json.dumps({"problem": "Find $m$.", "answer": 7}) + "\n")
    config = load_config(None, ["model.tokenizer=char", "model.arch={hidden_size: 8}", "data.format=beyondaime"])
    rows = load_rows(str(path), config.data)
    assert rows == [{"problem": "Find $n$.", "answer": "1234", "source": "beyondaime"},
                    {"problem": "Find $m$.", "answer": "7", "source": "beyondaime"}]


@pytest.mark.parametrize("thinking", [False, True])
def test_system_message_and_thinking_switch_reach_the_prompt(tiny_hf_chat_model, thinking):
    folder, _, _ = tiny_hf_chat_model
    config = load_config(None, [f"model.path={folder}", "data.system_prompt=You are a helpful assistant.",
                                f"data.chat_template_kwargs={{enable_thinking: {str(thinking).lower()}}}"])
    tokenizer = load_tokenizer(str(folder), QWEN3_TEMPLATE)  # HF's apply_chat_template renders it
    (example,), _ = build_examples([{"problem": "What is 1+1?", "answer": "2"}], tokenizer, config.data)
    assert example.prompt_text == V2_PROMPT + ("" if thinking else "<think>\n\n</think>\n\n")
    assert example.prompt_ids == tokenizer.encode(example.prompt_text)


def test_chat_settings_without_the_chat_template_are_a_config_error():
    with pytest.raises(ConfigError, match="data.system_prompt and data.chat_template_kwargs"):
        load_config(None, ["model.tokenizer=char", "model.arch={hidden_size: 8}", "data.prompt_template={problem}=",
                           "data.chat_template_kwargs={enable_thinking: false}"])


def test_table_titles_and_layout():
    assert [v2_title(n) for n in ("math500", "AMC23", "aime_2024", "aime25", "beyond_aime", "gsm8k")] == [
        "MATH500", "AMC23", "AIME24", "AIME25", "BeyondAIME", "gsm8k"]
    sources = {name: {"pass@1": p1, "pass@2": p2, "n_problems": 3} for name, p1, p2 in
               [("beyondaime", 0.1, 0.2), ("math500", 0.9, 0.95), ("aime24", 0.5, 0.6)]}
    table = v2_table(sources, 2).splitlines()
    assert table[2] == "| | MATH500 | AIME24 | BeyondAIME | Avg |"
    assert table[4] == "| pass@1 | 90.00 | 50.00 | 10.00 | 50.00 |"
    assert table[5] == "| pass@2 | 95.00 | 60.00 | 20.00 | 58.33 |"


# --------------------------------------------------------------------------- resumable eval

TINY = [
    "model.tokenizer=char",
    "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}",
    "data.prompt_template={problem}=", "data.max_prompt_tokens=16", "reward.verifier=number",
    "data.val={math500: 'synthetic:arithmetic?seed=3&size=6', aime24: 'synthetic:arithmetic?seed=4&size=5'}",
    "rollout.prompt_buckets=[16]", "reward.workers=1",
    "eval.n_samples=4", "eval.max_new_tokens=6", "eval.prompts_per_batch=4",
]


def eval_args(out):
    return argparse.Namespace(config="/dev/null", checkpoint=None, model=None, step=None, data=[], out=str(out),
                              overrides=list(TINY))


class Preempted(Exception):
    pass


def test_interrupted_eval_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    assert evaluate_cli.run(eval_args(tmp_path / "straight")) == 0

    # A preemption while the second benchmark is scored (its chunks: 4 + 2 and 4 + 1 problems).
    calls = []
    score_batch = VerifierPool.score_batch

    def preempted_in_the_second_set(self, responses, truths):
        calls.append(len(responses))
        if len(calls) == 3:
            raise Preempted
        return score_batch(self, responses, truths)

    monkeypatch.setattr(VerifierPool, "score_batch", preempted_in_the_second_set)
    with pytest.raises(Preempted):
        evaluate_cli.run(eval_args(tmp_path / "split"))
    parts = tmp_path / "split" / "parts"
    assert sorted(p.name for p in (parts / "math500").glob("*.json")) == ["000000.json", "000004.json"]
    assert not (parts / "aime24").exists() and not (tmp_path / "split" / "eval_metrics.json").exists()
    first_set = {p: p.read_bytes() for p in (parts / "math500").iterdir()}

    calls.clear()
    assert evaluate_cli.run(eval_args(tmp_path / "split")) == 0
    assert calls == [4 * 4, 1 * 4]  # only the second set's chunks were sampled and scored again
    assert {p: p.read_bytes() for p in (parts / "math500").iterdir()} == first_set
    for name in ("eval_rollouts.jsonl", "eval_table.md"):
        assert (tmp_path / "split" / name).read_text() == (tmp_path / "straight" / name).read_text()
    straight, split = (json.loads((tmp_path / d / "eval_metrics.json").read_text()) for d in ("straight", "split"))
    assert split["sources"] == straight["sources"]

    # The table is the metrics' pass@k in percent, recomputed from the rollouts' scores.
    rollouts = [json.loads(line) for line in (tmp_path / "straight" / "eval_rollouts.jsonl").read_text().splitlines()]
    correct = {}
    for r in rollouts:
        correct.setdefault((r["source"], r["problem"]), []).append(r["score"] >= 0.5)
    table = (tmp_path / "straight" / "eval_table.md").read_text().splitlines()
    assert table[2] == "| | MATH500 | AIME24 | Avg |"
    for row, k in zip(table[4:7], (1, 2, 4)):
        expected = [100 * sum(pass_at_k(4, sum(c), k) for (s, _), c in correct.items() if s == name)
                    / sum(1 for s, _ in correct if s == name) for name in ("math500", "aime24")]
        assert row == f"| pass@{k} | {expected[0]:.2f} | {expected[1]:.2f} | {sum(expected) / 2:.2f} |"

    # Other settings in the same folder are refused, not mixed in.
    other = eval_args(tmp_path / "split")
    other.overrides.append("eval.temperature=0.9")
    with pytest.raises(ValueError, match="other settings"):
        evaluate_cli.run(other)


# --------------------------------------------------------------------------- the v2 configs

V2_CONFIGS = sorted((REPO / "configs").glob("qwen3_*.yaml"))


def test_the_v2_configs_are_all_here():
    assert {p.name for p in V2_CONFIGS} == {f"qwen3_{size}_{algo}.yaml" for size in ("4b", "8b") for algo in ("pacs", "grpo", "ppo")} | {
        "qwen3_8b_dapo.yaml", "qwen3_8b_gspo.yaml"}  # issue 30's baselines on the 8B recipe (tests/test_rlvr_options.py)


@pytest.mark.parametrize("path", V2_CONFIGS, ids=lambda p: p.name)
def test_v2_config_is_the_papers_recipe_and_splits_over_the_slice_its_first_line_names(path):
    from pacs_jax import compile_tpu, sharding

    first = path.read_text().splitlines()[0]
    assert first.startswith("# topology: v5p-"), first
    topology_name = first.split()[2]
    size, algo = path.stem.split("_")[1:]
    assert f"python -m pacs_jax compile --config configs/{path.name} --topology {topology_name} --arch configs/arch/qwen3-{size}.json" in path.read_text()
    c = load_config(path)
    # v2's Table 4 and Sections 3-4 (../shared/PACS.md).
    assert (c.trainer.prompts_per_step, c.rollout.group_size, c.trainer.mini_batches) == (1024, 8, 4)
    assert (c.data.max_prompt_tokens, c.rollout.max_new_tokens) == (1024, 8192)
    assert c.optimizer.lr == 1e-6 and c.optimizer.schedule == "constant" and c.algorithm.kl_coef == 0
    assert c.trainer.total_steps == {"4b": 120, "8b": 320}[size]
    assert c.data.system_prompt == "You are a helpful assistant."
    assert c.data.instruction == " Please reason step by step, and put your final answer within \\boxed{}."
    assert c.data.chat_template_kwargs == {"enable_thinking": True}
    assert (c.eval.n_samples, c.eval.max_new_tokens, c.eval.temperature, c.eval.top_p) == (128, 8192, 0.6, 0.95)
    assert list(c.data.val) == ["math500", "amc23", "aime24", "aime25", "beyondaime"]
    if algo == "pacs":
        a = c.algorithm
        assert (a.beta, a.adv_estimator, a.weight_mode, a.score_reference) == (1.0, "rloo", "question", "reference")
        assert a.reference_reset_every == 40
    if algo == "ppo":
        assert c.algorithm.critic_lr == 1e-5
    assert (c.model.param_dtype, c.model.compute_dtype, c.model.remat) == ("float32", "bfloat16", "full")
    decoder_config, _ = compile_tpu.decoder_config_for(c, str(REPO / "configs" / "arch" / f"qwen3-{size}.json"))
    assert (decoder_config.num_layers, decoder_config.num_kv_heads, decoder_config.head_dim, decoder_config.qk_norm) == (36, 8, 128, True)
    topology = compile_tpu.parse_topology(topology_name)
    mesh = sharding.make_mesh(c.mesh, devices=compile_tpu.tpu_devices(topology))
    t = c.trainer
    sharding.validate_mesh_for_model(mesh, decoder_config, t.prompts_per_step, c.rollout.group_size,
                                     mini_batches=t.mini_batches, micro_batches=t.micro_batches)
    assert mesh.devices.size == topology.chips
