"""Packed update and old-log-prob passes (pacs_jax.packing): the plan puts every real token in
exactly one place, a packed row's sequences do not see each other, and the packed passes give
the unpacked path's old log-probs, losses and gradients for every algorithm (float32, random
lengths, including empty responses and sequences that fill a whole row)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pacs_jax.config import AlgorithmConfig, Config, ConfigError, validate
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.packing import PACKED_KEYS, first_fit_decreasing, pack_rollout, row_ladder
from pacs_jax.update import ROLLOUT_KEYS, init_train_state, make_prepare_fn, make_update_fn

CONFIG = DecoderConfig.from_hf(dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, model_type="qwen2",  # q/k/v biases too
))
GROUP, PROMPTS, PROMPT_LEN, RESPONSE_LEN = 4, 4, 6, 10
ROW_TOKENS = PROMPT_LEN + RESPONSE_LEN


def random_rollout(seed, prompts=PROMPTS, group=GROUP, prompt_len=PROMPT_LEN, response_len=RESPONSE_LEN):
    """Left-padded prompts of 1..prompt_len real tokens and responses of 0..response_len (a few
    sequences exactly a row long), random tokens and 0/1 rewards."""
    rng = np.random.default_rng(seed)
    rows = prompts * group
    p = np.repeat(rng.integers(1, prompt_len + 1, prompts), group)
    n = rng.integers(0, response_len + 1, rows)
    p[0], n[0] = prompt_len, response_len  # one sequence fills a whole row
    n[1] = 0  # and one response is empty
    prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - p[:, None]).astype(np.int32)
    response_mask = (np.arange(response_len)[None] < n[:, None]).astype(np.int32)
    prompt_ids = np.repeat(rng.integers(3, 61, (prompts, prompt_len)), group, axis=0) * prompt_mask
    response_ids = rng.integers(3, 61, (rows, response_len)) * response_mask
    rewards = rng.integers(0, 2, rows).astype(np.float32)
    return {"prompt_ids": prompt_ids.astype(np.int32), "prompt_mask": prompt_mask, "response_ids": response_ids.astype(np.int32),
            "response_mask": response_mask, "rewards": rewards}


def packed(rollout, micro_batches, row_tokens=ROW_TOKENS, row_multiple=1):
    arrays, stats = pack_rollout(*(rollout[k] for k in ROLLOUT_KEYS), micro_batches=micro_batches,
                                 row_tokens=row_tokens, row_multiple=row_multiple)
    return arrays, stats


# ------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("micro_batches,row_tokens,row_multiple", [(1, 16, 1), (2, 16, 2), (4, 23, 1), (2, 40, 4)])
def test_plan_puts_every_real_token_once_and_take_finds_each_response_token(micro_batches, row_tokens, row_multiple):
    rollout = random_rollout(1)
    out, stats = packed(rollout, micro_batches, row_tokens, row_multiple)
    again, _ = packed(rollout, micro_batches, row_tokens, row_multiple)
    for key in PACKED_KEYS:
        np.testing.assert_array_equal(out[key], again[key])  # deterministic: every process plans alike
    rows_per_micro = out["packed_ids"].shape[0] // micro_batches
    assert rows_per_micro % row_multiple == 0 and rows_per_micro == stats["pack/rows_per_micro_batch"]
    lengths = rollout["prompt_mask"].sum(1) + rollout["response_mask"].sum(1)
    assert (out["segment_ids"] > 0).sum() == lengths.sum()
    per_micro = len(lengths) // micro_batches
    for m in range(micro_batches):
        ids = out["packed_ids"][m * rows_per_micro : (m + 1) * rows_per_micro].reshape(-1)
        seg = out["segment_ids"][m * rows_per_micro : (m + 1) * rows_per_micro]
        pos = out["positions"][m * rows_per_micro : (m + 1) * rows_per_micro]
        # Each micro-batch's rows hold exactly its own sequences, in segments 1..K of each row,
        # with positions 0..len-1 inside each segment.
        segment_lengths = []
        for r in range(rows_per_micro):
            ids_in_row = sorted(set(seg[r][seg[r] > 0]))
            assert ids_in_row == list(range(1, len(ids_in_row) + 1))
            for s in ids_in_row:
                cols = np.nonzero(seg[r] == s)[0]
                assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # contiguous
                np.testing.assert_array_equal(pos[r][cols], np.arange(len(cols)))
                segment_lengths.append(len(cols))
        assert sorted(segment_lengths) == sorted(lengths[m * per_micro : (m + 1) * per_micro])
        for i in range(m * per_micro, (m + 1) * per_micro):
            n = rollout["response_mask"][i].sum()
            take = out["take"][i, :n]
            # The predicting position's next token is the response token; the prompt precedes it.
            np.testing.assert_array_equal(ids[take + 1], rollout["response_ids"][i, :n])
            p = rollout["prompt_mask"][i].sum()
            first = out["take"][i, 0] - (p - 1) if n else None
            if n:
                np.testing.assert_array_equal(ids[first : first + p], rollout["prompt_ids"][i, -p:])
            assert (out["take"][i] < rows_per_micro * row_tokens).all() and (out["take"][i] >= 0).all()


def test_ladder_tops_out_at_one_sequence_per_row_and_all_maximal_sequences_use_it():
    assert row_ladder(16) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert row_ladder(16, 8) == [8, 16]
    assert row_ladder(3, 4) == [4]
    rollout = random_rollout(2)
    rollout["prompt_mask"][:] = 1
    rollout["response_mask"][:] = 1
    out, stats = packed(rollout, 2)
    assert out["packed_ids"].shape == (16, ROW_TOKENS) and stats["pack/fill"] == 1.0
    row, offset, used = first_fit_decreasing(np.array([3, 7, 5, 9, 1]), 10)
    assert used == 3 and list(row) == [1, 1, 2, 0, 0] and list(offset) == [7, 0, 0, 0, 9]


def test_plan_rejects_layouts_it_cannot_pack():
    rollout = random_rollout(3)
    with pytest.raises(ValueError, match="does not fit a packed row of 15"):
        packed(rollout, 1, row_tokens=15)
    bad = {**rollout, "response_mask": rollout["response_mask"][:, ::-1].copy()}
    bad["response_mask"][2] = [0, 1] * (RESPONSE_LEN // 2)
    with pytest.raises(ValueError, match="response_mask"):
        packed(bad, 1)
    with pytest.raises(ValueError, match="left-padded"):
        packed({**rollout, "prompt_mask": rollout["prompt_mask"][:, ::-1]}, 1)


# ----------------------------------------------------------------------- the packed forward


def test_packed_forward_equals_each_sequence_alone():
    """Every sequence's hidden states in a packed row equal a forward over that sequence alone
    (no padding, positions from 0): nothing leaks between segments, RoPE restarts."""
    rollout = random_rollout(4)
    out, _ = packed(rollout, 1, row_tokens=40)
    model = init_decoder(CONFIG, seed=1)
    hidden = np.asarray(model(jnp.asarray(out["packed_ids"]), positions=jnp.asarray(out["positions"]),
                              segment_ids=jnp.asarray(out["segment_ids"]), return_hidden=True))
    checked = 0
    for r in range(out["packed_ids"].shape[0]):
        for s in set(out["segment_ids"][r][out["segment_ids"][r] > 0]):
            cols = np.nonzero(out["segment_ids"][r] == s)[0]
            alone = np.asarray(model(jnp.asarray(out["packed_ids"][r, cols][None]), return_hidden=True))[0]
            np.testing.assert_allclose(hidden[r, cols], alone, atol=2e-5, rtol=1e-5)
            checked += 1
    assert checked == len(rollout["rewards"])


# ------------------------------------------------------------- packed vs unpacked passes

SGD = optax.multi_transform({"policy": optax.sgd(1.0), "critic": optax.sgd(1.0)}, lambda p: {k: k for k in p})
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ALGORITHMS = [
    AlgorithmConfig(name="pacs"),
    AlgorithmConfig(name="pacs", reward_method="2", adv_estimator="grpo", weight_mode="only_positive", beta=2.0),
    AlgorithmConfig(name="pacs", adv_estimator="naive", weight_mode=None),
    AlgorithmConfig(name="rloo"),
    *(AlgorithmConfig(name="grpo", loss_agg_mode=mode, kl_coef=0.1 if mode != AGG_MODES[-1] else 0.0,
                      seq_norm_divisor=3.0) for mode in AGG_MODES),
    *(AlgorithmConfig(name="ppo", loss_agg_mode=mode) for mode in AGG_MODES),
]


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def run(rollout, algorithm, mini, micro, pack, remat="none"):
    """One update (after the old-log-prob pass) from the same weights, packed or not; returns the
    prepare outputs, the parameter step and the metrics."""
    import dataclasses

    model = init_decoder(dataclasses.replace(CONFIG, remat=remat), seed=0)
    graphdefs, state = init_train_state(model, SGD, algorithm.name == "ppo")
    before = flat(state.params)
    batch = {k: jnp.asarray(v) for k, v in rollout.items()}
    if pack:
        batch.update({k: jnp.asarray(v) for k, v in packed(rollout, mini * micro)[0].items()})
    reference = nnx.state(init_decoder(CONFIG, seed=5)) if algorithm.kl_coef > 0 else None
    prepare = make_prepare_fn(graphdefs, algorithm, temperature=0.8, chunks=mini * micro, on_policy_chunks=micro)
    extras = prepare(state.params, reference, {k: v for k, v in batch.items() if k != "rewards"})
    update = make_update_fn(graphdefs, SGD, algorithm, group_size=GROUP, mini_batches=mini, micro_batches=micro, temperature=0.8)
    new_state, metrics = update(state, {**batch, **extras})
    return jax.device_get(extras), flat(new_state.params) - before, jax.device_get(metrics)


# Every algorithm at 2 mini x 2 micro; PACS and PPO (token-mean) at 1 x 1 and 1 x 4 too (keeps the suite short).
PACKING_CASES = [
    *((algorithm, 2, 2) for algorithm in ALGORITHMS),
    *((algorithm, mini, micro) for algorithm in (ALGORITHMS[0], ALGORITHMS[-len(AGG_MODES)]) for mini, micro in ((1, 1), (1, 4))),
]


@pytest.mark.parametrize(
    "algorithm,mini,micro", PACKING_CASES,
    ids=[f"{m}-{u}-{a.name}-{a.loss_agg_mode}-{a.adv_estimator}-kl{a.kl_coef}" for a, m, u in PACKING_CASES],
)
def test_packed_update_equals_unpacked(algorithm, mini, micro):
    rollout = random_rollout(10 + mini + micro)
    extras_u, step_u, metrics_u = run(rollout, algorithm, mini, micro, pack=False)
    extras_p, step_p, metrics_p = run(rollout, algorithm, mini, micro, pack=True)
    for key in extras_u:
        np.testing.assert_allclose(extras_p[key], extras_u[key], atol=2e-5, err_msg=key)
    assert np.abs(step_u).max() > 1e-5
    np.testing.assert_allclose(step_p, step_u, rtol=2e-4, atol=2e-4 * np.abs(step_u).max())
    assert metrics_p.keys() == metrics_u.keys()
    for key in metrics_u:
        np.testing.assert_allclose(metrics_p[key], metrics_u[key], rtol=2e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_packed_update_equals_unpacked_under_remat(remat):
    rollout = random_rollout(7)
    algorithm = AlgorithmConfig(name="pacs")
    _, step_u, _ = run(rollout, algorithm, 2, 2, pack=False, remat=remat)
    _, step_p, _ = run(rollout, algorithm, 2, 2, pack=True, remat=remat)
    np.testing.assert_allclose(step_p, step_u, rtol=2e-4, atol=2e-4 * np.abs(step_u).max())


def test_packed_update_on_a_sharded_mesh_equals_unpacked():
    """On a (data 1, fsdp 4, tensor 2) mesh of the 8 CPU devices, rows a multiple of 4."""
    from pacs_jax import sharding
    from pacs_jax.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    rollout = random_rollout(8)
    algorithm = AlgorithmConfig(name="grpo", kl_coef=0.1)
    with jax.set_mesh(mesh):
        _, step_u, _ = run(rollout, algorithm, 1, 2, pack=False)
        _, step_p, _ = run(rollout, algorithm, 1, 2, pack=True)
    np.testing.assert_allclose(step_p, step_u, rtol=2e-4, atol=2e-4 * np.abs(step_u).max())


# ------------------------------------------------------------------------------ config


def test_config_rejects_a_row_budget_below_the_longest_sequence_and_micro_batches_without_a_group():
    config = Config()
    config.model.arch = {"hidden_size": 8}
    config.rollout.prompt_buckets, config.rollout.max_new_tokens = [64, 512], 4096
    config.trainer.pack_row_tokens = 4607
    with pytest.raises(ConfigError, match=r"trainer.pack_row_tokens=4607 .*smallest valid value is 4608"):
        validate(config)
    config.trainer.pack_row_tokens = -1
    with pytest.raises(ConfigError, match=r"trainer.pack_row_tokens must be >= 0"):
        validate(config)
    config.trainer.pack_row_tokens = 4608
    validate(config)
    config.trainer.prompts_per_step, config.trainer.mini_batches, config.trainer.micro_batches = 4, 2, 4
    with pytest.raises(ConfigError, match=r"smallest valid trainer.prompts_per_step is 8"):
        validate(config)


# ------------------------------------------------------------------------------ the trainer


def test_training_with_packing_takes_the_unpacked_step(tmp_path):
    """Two steps of the trainer (8 CPU devices, rows over the data axis, 2 mini-batches) with
    trainer.pack_row_tokens: the first step's update metrics equal the unpacked run's, the
    packing statistics and the sampler gap are logged."""
    import json

    from test_train import tiny_config  # tests/test_train.py's tiny arithmetic run

    from pacs_jax.train import train

    runs = {}
    for name, extra in (("padded", []), ("packed", ["trainer.pack_row_tokens=22"])):
        config = tiny_config(tmp_path / name, "trainer.total_steps=2", "trainer.save_every=0", *extra)
        train(config)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    padded, packed_run = runs["padded"], runs["packed"]
    assert [r["step"] for r in packed_run] == [1, 2]
    for key in ("reward/mean", "response_length/mean"):
        assert packed_run[0][key] == padded[0][key]  # the same rollout
    for key in ("loss", "grad_norm", "entropy", "rollout/logprob_diff_mean"):
        np.testing.assert_allclose(packed_run[0][key], padded[0][key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert packed_run[0]["rollout/logprob_diff_max"] < 1e-4  # float32 sampler and training agree
    assert 0 < packed_run[0]["pack/fill"] <= 1 and packed_run[0]["pack/rows_per_micro_batch"] % 8 == 0
    assert "pack/fill" not in padded[0]


# ------------------------------------------------------------------------------ the benches


def test_update_bench_packed_row_runs_and_reports_the_ratio(tmp_path):
    from bench.update import main

    payload = main(["--packing", "--models", "tiny", "--rows", "8", "--group-size", "4", "--prompt-len", "16",
                    "--response-len", "64", "--repeats", "1", "--remat", "none", "--out", str(tmp_path / "u.json")])
    padded, packed_row = payload["results"]
    assert padded["layout"] == "padded" and packed_row["layout"] == "packed"
    assert packed_row["positions"] < padded["positions"] and packed_row["real_tokens"] == padded["real_tokens"]
    assert packed_row["real_tokens_per_s_vs_padded"] > 0 and (tmp_path / "u.json").is_file()
    np.testing.assert_allclose(packed_row["loss"], padded["loss"], rtol=1e-4, atol=1e-6)  # the same step


def test_step_bench_runs_the_tunix_workload(tmp_path):
    from bench.step import main

    result = main(["--steps", "3", "--out", str(tmp_path / "s.json")])
    assert result["params"] == 854144 and result["params_changed"] and len(result["per_step"]) == 3
    assert result["step_median_s"] > 0 and (tmp_path / "s.json").is_file()
