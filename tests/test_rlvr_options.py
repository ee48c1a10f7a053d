"""The RLVR toolbox through the whole update step and the command line: DAPO (clip-higher, the
overlong penalty and filter), GSPO, Dr. GRPO and the rollout correction (TIS / MIS) for every
algorithm, held to the float64 transcriptions in tests/verl_reference.py; their config checks and
configs; each new config trains through `python -m pacs_jax train` and logs its metrics."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from pacs_jax.algorithms import pacs_loss
from pacs_jax.config import AlgorithmConfig, ConfigError, load_config
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.update import ROLLOUT_KEYS, init_train_state, make_prepare_fn, make_update_fn
import verl_reference as verl  # tests/verl_reference.py

REPO = Path(__file__).resolve().parents[1]
CONFIG = DecoderConfig.from_hf(dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, model_type="llama",
))
GROUP, PROMPTS, LENGTH = 4, 4, 8
SGD = optax.multi_transform({"policy": optax.sgd(1.0), "critic": optax.sgd(1.0)}, lambda p: {k: k for k in p})
TOL = dict(rtol=2e-4, atol=1e-6)


def rollout_batch(seed: int) -> dict:
    """A rollout batch as the sampler lays it out (left-padded prompts repeated per group,
    right-padded responses), with response lengths from 1 to LENGTH: some reach the cap."""
    rng = np.random.default_rng(seed)
    rows = PROMPTS * GROUP
    prompt_lengths = np.repeat([3, 5, 2, 6], GROUP)
    prompt_mask = (np.arange(8)[None, :] >= 8 - prompt_lengths[:, None]).astype(np.int32)
    prompt_ids = np.repeat(rng.integers(3, 61, (PROMPTS, 8)), GROUP, axis=0) * prompt_mask
    lengths = rng.integers(1, LENGTH + 1, rows)
    lengths[[1, 6, 11]] = LENGTH
    response_mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
    response_ids = rng.integers(3, 61, (rows, LENGTH)) * response_mask
    rewards = rng.integers(0, 2, rows).astype(np.float32)
    arrays = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask)
    return {**{k: jnp.asarray(v) for k, v in arrays.items()}, "rewards": jnp.asarray(rewards)}


def f64(x):
    return np.asarray(x, np.float64)


def prepared(algorithm: AlgorithmConfig, seed: int = 0):
    """(graphdefs, state, batch, logprobs): the batch with old log-probs moved off the current
    weights (so the clips bind) and the sampler's log-probs moved off those; `logprobs` are the
    current weights' (what the update's loss sees in its one optimizer step)."""
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), SGD, algorithm.name == "ppo")
    rollout = rollout_batch(seed)
    current = make_prepare_fn(graphdefs, algorithm)(state.params, None, {k: rollout[k] for k in ROLLOUT_KEYS})
    rng = np.random.default_rng(seed + 100)
    mask = f64(rollout["response_mask"])
    shift = rng.normal(0.0, 0.3, mask.shape)
    shift[::3, :2] = -1.5  # ratios past clip_ratio_c on some tokens
    old = (f64(current["old_logprobs"]) + shift) * mask
    sampler = old + rng.normal(0.0, 0.5 if algorithm.rollout_correction_level == "token" else 0.25, mask.shape)
    sampler[0, 0], sampler[2, 0] = old[0, 0] - 2.0, old[2, 0] + 2.0  # weights e^2 and e^-2: above C = 2, below 1/C
    sampler = sampler * mask
    batch = {**rollout, **current, "old_logprobs": jnp.asarray(old, jnp.float32), "sampler_logprobs": jnp.asarray(sampler, jnp.float32)}
    if "old_values" in current:
        batch["old_values"] = jnp.asarray((f64(current["old_values"]) + rng.normal(0, 0.6, mask.shape)) * mask, jnp.float32)
    return graphdefs, state, batch, f64(current["old_logprobs"])


def run(graphdefs, state, batch, algorithm, micro=2):
    update = make_update_fn(graphdefs, SGD, algorithm, group_size=GROUP, mini_batches=1, micro_batches=micro,
                            first_mini_batch_on_policy=False)
    return update(state, batch)


def grpo_advantages(rewards, mask, norm=True):
    index = np.repeat(np.arange(PROMPTS), GROUP)
    return verl.grpo_advantage(verl.outcome_token_rewards(rewards, mask), mask, index, norm)


CORRECTION_CASES = [("pacs", "tis", "token"), ("grpo", "mis", "sequence"), ("ppo", "tis", "sequence"),
                    ("rloo", "mis", "token"), ("gspo", "tis", "token")]


@pytest.mark.parametrize("name,mode,level", CORRECTION_CASES)
def test_rollout_correction_in_the_whole_update_is_verls(name, mode, level):
    """The update's loss with the correction's weights, and its rollout_corr/ metrics over the
    whole batch (two micro-batches), against verl's weights and losses in NumPy."""
    algorithm = AlgorithmConfig(name=name, rollout_correction=mode, rollout_correction_level=level, clip_high=0.28,
                                loss_agg_mode="seq-mean-token-mean" if name == "gspo" else "token-mean")
    graphdefs, state, batch, logprobs = prepared(algorithm, seed=len(name))
    _, metrics = run(graphdefs, state, batch, algorithm)

    mask, old, sampler, rewards = (f64(batch[k]) for k in ("response_mask", "old_logprobs", "sampler_logprobs", "rewards"))
    weights, outside = verl.rollout_is_weights(old, sampler, mask, level, {"tis": "truncate", "mis": "mask"}[mode], 2.0)
    np.testing.assert_allclose(metrics["rollout_corr/k3_kl"], verl.rollout_corr_k3_kl(old, sampler, mask), **TOL)
    np.testing.assert_allclose(metrics["rollout_corr/weight_mean"], verl.masked_mean(weights, mask), **TOL)
    np.testing.assert_allclose(metrics["rollout_corr/weight_max"], weights.max(), **TOL)
    fraction = metrics["rollout_corr/capped_fraction" if mode == "tis" else "rollout_corr/masked_fraction"]
    np.testing.assert_allclose(fraction, outside, **TOL)
    assert 0 < outside < 1 and 0 < verl.masked_mean(weights, mask) != 1

    if name == "pacs":  # the pure loss, itself held to NumPy (tests/test_algorithms.py), on verl's weights
        expected, _ = pacs_loss(jnp.asarray(logprobs), jnp.asarray(old), jnp.asarray(mask), jnp.asarray(rewards),
                                group_size=GROUP, token_weights=jnp.asarray(weights))
        np.testing.assert_allclose(metrics["loss"], float(expected), **TOL)
        return
    if name == "grpo":
        expected = verl.policy_loss(old, logprobs, grpo_advantages(rewards, mask), mask, 0.2, 0.28, 3.0, "token-mean", weights)[0]
    elif name == "gspo":
        expected = verl.gspo_policy_loss(old, logprobs, grpo_advantages(rewards, mask), mask, 0.2, 0.28, weights)[0]
    elif name == "ppo":
        advantages, _ = verl.gae(verl.outcome_token_rewards(rewards, mask), f64(batch["old_values"]), mask, 1.0, 1.0)
        expected = verl.policy_loss(old, logprobs, advantages, mask, 0.2, 0.28, 3.0, "token-mean", weights)[0]
    else:  # RLOO: REINFORCE + IS, -E[w_t log pi(a_t) A_i], a mean over responses of token sums
        grouped = rewards.reshape(-1, GROUP)
        advantages = (grouped - (grouped.sum(1, keepdims=True) - grouped) / (GROUP - 1)).reshape(-1)
        expected = -np.mean([(weights[i] * mask[i] * logprobs[i]).sum() * advantages[i] for i in range(len(rewards))])
    np.testing.assert_allclose(metrics["actor/pg_loss"], expected, **TOL)


def test_dapo_update_is_the_papers_objective_and_accumulates_exactly():
    """DAPO through the update: clip-higher, token-mean over the kept responses, the truncated
    ones out of the loss (with the dual clip off, the DAPO paper's objective exactly; rewards
    shaped by the paper's soft overlong punishment); and two micro-batches take the same step
    as one although the filter leaves them different numbers of tokens."""
    algorithm = AlgorithmConfig(name="grpo", clip_high=0.28, clip_ratio_c=float("inf"), overlong_filter=True)
    graphdefs, state, batch, logprobs = prepared(algorithm, seed=7)
    mask = f64(batch["response_mask"])
    lengths = mask.sum(1)
    truncated = lengths == LENGTH  # no stop ids in this batch: every full-length response was cut off
    shaped = f64(batch["rewards"]) + [verl.dapo_overlong_reward(n, LENGTH, 3) for n in lengths]
    batch = {**batch, "rewards": jnp.asarray(shaped, jnp.float32), "truncated": jnp.asarray(truncated, jnp.float32)}
    initial = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])
    two_state, two = run(graphdefs, state, batch, algorithm, micro=2)
    expected = verl.dapo_objective(f64(batch["old_logprobs"]), logprobs, shaped, mask, GROUP, 0.2, 0.28, truncated)
    np.testing.assert_allclose(two["actor/pg_loss"], expected, **TOL)
    np.testing.assert_allclose(two["actor/overlong_filtered_fraction"], truncated.mean(), **TOL)
    assert truncated[: len(truncated) // 2].sum() != truncated[len(truncated) // 2 :].sum()  # uneven micro-batches
    graphdefs, state, _, _ = prepared(algorithm, seed=7)
    one_state, one = run(graphdefs, state, batch, algorithm, micro=1)
    flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.params)]) - initial  # noqa: E731
    step_one, step_two = flat(one_state), flat(two_state)
    assert np.abs(step_one).max() > 1e-4
    np.testing.assert_allclose(step_two, step_one, rtol=1e-4, atol=1e-6 * np.abs(step_one).max())
    # Without the truncated field the filter cannot run: a clear error, not a silent no-op.
    with pytest.raises(ValueError, match="truncated"):
        run(graphdefs, one_state, {k: v for k, v in batch.items() if k != "truncated"}, algorithm)


def test_gspo_update_is_verls_gspo_loss():
    algorithm = AlgorithmConfig(name="gspo", clip_low=3e-4, clip_high=4e-4, loss_agg_mode="seq-mean-token-mean")
    graphdefs, state, batch, logprobs = prepared(algorithm, seed=8)
    batch = {**batch, "old_logprobs": jnp.asarray((logprobs - 0.003) * f64(batch["response_mask"]), jnp.float32)}
    _, metrics = run(graphdefs, state, batch, algorithm)
    mask, rewards = f64(batch["response_mask"]), f64(batch["rewards"])
    old, advantages = f64(batch["old_logprobs"]), grpo_advantages(rewards, mask)
    loss, clipfrac, _ = verl.gspo_policy_loss(old, logprobs, advantages, mask, 3e-4, 4e-4)
    np.testing.assert_allclose(metrics["actor/pg_loss"], loss, **TOL)
    assert 0 < clipfrac < 1
    # The update reports each micro-batch's clip fraction, averaged (as for every algorithm).
    halves = [slice(0, 8), slice(8, 16)]
    per_micro = [verl.gspo_policy_loss(old[h], logprobs[h], advantages[h], mask[h], 3e-4, 4e-4)[1] for h in halves]
    np.testing.assert_allclose(metrics["actor/clip_fraction"], np.mean(per_micro), **TOL)


# ------------------------------------------------------------------------------ config


BASE = ["model.arch={hidden_size: 8}"]


@pytest.mark.parametrize("overrides,field", [
    (["algorithm.rollout_correction=tis", "algorithm.rollout_correction_cap=1.0"], "algorithm.rollout_correction_cap"),
    (["algorithm.rollout_correction=sis"], "algorithm.rollout_correction"),
    (["algorithm.rollout_correction_level=geometric"], "algorithm.rollout_correction_level"),
    (["algorithm.name=gspo"], "algorithm.loss_agg_mode=seq-mean-token-mean"),
    (["algorithm.name=gspo", "algorithm.loss_agg_mode=seq-mean-token-mean", "algorithm.kl_coef=0.1"], "algorithm.kl_coef"),
    (["algorithm.name=gspo", "algorithm.loss_agg_mode=seq-mean-token-mean", "rollout.group_size=1"], "rollout.group_size"),
    (["algorithm.name=grpo", "reward.overlong_buffer=256", "rollout.max_new_tokens=256"], "reward.overlong_buffer"),
    (["algorithm.name=grpo", "reward.overlong_buffer=-1"], "reward.overlong_buffer"),
    (["algorithm.name=grpo", "reward.overlong_buffer=16", "reward.overlong_penalty=-1"], "reward.overlong_penalty"),
    (["algorithm.name=pacs", "reward.overlong_buffer=16"], "algorithm.overlong_filter=true"),
])
def test_bad_rlvr_options_are_config_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, BASE + overrides)


NEW_CONFIGS = {  # each is debug_cpu.yaml but for these keys
    "debug_cpu_dapo.yaml": {"algorithm", "reward.overlong_buffer", "reward.overlong_penalty", "rollout.max_new_tokens"},
    "debug_cpu_gspo.yaml": {"algorithm"},
    "debug_cpu_drgrpo.yaml": {"algorithm"},
}


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in ("model.arch", "data.val"):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", sorted(NEW_CONFIGS))
def test_debug_variants_differ_from_debug_cpu_only_in_their_algorithm(name):
    base = dict(_flat(yaml.safe_load((REPO / "configs" / "debug_cpu.yaml").read_text())))
    variant = dict(_flat(yaml.safe_load((REPO / "configs" / name).read_text())))
    differing = {k for k in base.keys() | variant.keys() if base.get(k) != variant.get(k)}
    allowed = NEW_CONFIGS[name] | {"trainer.run_dir", "trainer.dynamic_sampling", "trainer.dynamic_sampling_max_rounds"}
    assert {k for k in differing if k.split(".")[0] not in allowed and k not in allowed} == set()
    assert variant["trainer.run_dir"] == f"runs/{name[:-5]}"
    load_config(REPO / "configs" / name)


QWEN3_VARIANTS = {  # each is qwen3_8b_grpo.yaml (paper v2's recipe) but for these keys
    "qwen3_8b_dapo.yaml": {"algorithm", "reward.overlong_buffer", "reward.overlong_penalty", "trainer.dynamic_sampling",
                           "trainer.dynamic_sampling_max_rounds"},
    "qwen3_8b_gspo.yaml": {"algorithm"},
}


@pytest.mark.parametrize("name", sorted(QWEN3_VARIANTS))
def test_qwen3_variants_are_the_v2_grpo_config_but_for_their_algorithm(name):
    base = dict(_flat(yaml.safe_load((REPO / "configs" / "qwen3_8b_grpo.yaml").read_text())))
    variant = dict(_flat(yaml.safe_load((REPO / "configs" / name).read_text())))
    differing = {k for k in base.keys() | variant.keys() if base.get(k) != variant.get(k)}
    allowed = QWEN3_VARIANTS[name] | {"trainer.run_dir"}
    assert {k for k in differing if k.split(".")[0] not in allowed and k not in allowed} == set()
    assert variant["trainer.run_dir"] == f"runs/{name[:-5]}"
    config = load_config(REPO / "configs" / name)
    if name == "qwen3_8b_gspo.yaml":
        assert (config.algorithm.name, config.algorithm.clip_low, config.algorithm.clip_high) == ("gspo", 3e-4, 4e-4)
    else:
        a = config.algorithm
        assert (a.name, a.clip_high, a.loss_agg_mode, config.trainer.dynamic_sampling) == ("grpo", 0.28, "token-mean", True)


# ------------------------------------------------------------------------------ command line

# Each new config as the user runs it, cut to two short steps (no warm-up, no validation) and
# with the options the config leaves off turned on, so every metric named in issue 30 is logged.
CLI_CASES = {
    "debug_cpu_dapo.yaml": (["algorithm.overlong_filter=true", "algorithm.rollout_correction=tis"],
                            ["reward/overlong_penalty_mean", "actor/overlong_filtered_fraction", "rollout_corr/capped_fraction"]),
    "debug_cpu_gspo.yaml": (["algorithm.rollout_correction=mis", "algorithm.rollout_correction_level=sequence"],
                            ["rollout_corr/masked_fraction"]),
    "debug_cpu_drgrpo.yaml": (["algorithm.rollout_correction=tis"], ["rollout_corr/capped_fraction"]),
}
SHORT = ["trainer.total_steps=2", "sft.steps=0", "trainer.prompts_per_step=8", "trainer.mini_batches=2",
         "trainer.eval_every=0", "trainer.val_before_train=false", "trainer.dump_rollouts_every=0", "trainer.save_every=0",
         "trainer.tensorboard=false"]


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_each_new_config_trains_through_the_cli_and_logs_its_metrics(name, tmp_path):
    overrides, expected = CLI_CASES[name]
    result = subprocess.run(
        [sys.executable, "-m", "pacs_jax", "train", "--config", f"configs/{name}", *SHORT, *overrides,
         f"trainer.run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("step", 0) >= 1]
    assert [r["step"] for r in steps] == [1, 2]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # the run's own record of its options
    assert saved["algorithm"]["rollout_correction"] != "none" and saved["algorithm"]["name"] in ("grpo", "gspo")
    for record in steps:
        for key in [*expected, "rollout_corr/k3_kl", "rollout_corr/weight_mean", "rollout_corr/weight_max",
                    "response_length/truncated_fraction", "actor/pg_loss"]:
            assert key in record and np.isfinite(record[key]), (key, sorted(record))
        assert record["rollout_corr/k3_kl"] >= 0 and record["rollout_corr/weight_max"] > 0
