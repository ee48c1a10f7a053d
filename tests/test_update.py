"""The update step: gradient accumulation equals one batch, non-finite gradients skip the step,
clipping and schedules follow their closed forms, every algorithm runs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pacs_jax.config import AlgorithmConfig, OptimizerConfig
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import (
    ROLLOUT_KEYS,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_prepare_fn,
    make_train_optimizer,
    make_update_fn,
    response_logprobs,
)
import verl_reference as verl  # tests/verl_reference.py

CONFIG = DecoderConfig.from_hf(dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, model_type="llama",
))
GROUP = 4
PROMPTS = 4


@pytest.fixture(scope="module")
def rollout():
    model = init_decoder(CONFIG, seed=0)
    rng = np.random.default_rng(0)
    ids, mask = pad_prompts([list(rng.integers(3, 61, n)) for n in (3, 5, 2, 6)], [8], 0)
    out = generate(model, ids, mask, jax.random.key(0), SamplingParams(8, temperature=1.0, stop_ids=(3, 4, 5)), group_size=GROUP)
    rewards = jnp.asarray(rng.integers(0, 2, PROMPTS * GROUP), jnp.float32)
    return {**{k: getattr(out, k) for k in ROLLOUT_KEYS}, "rewards": rewards}


def run_update(rollout, algorithm, optimizer, mini, micro, seed=0, corrupt=None, first_on_policy=True):
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=seed), optimizer, algorithm.name == "ppo")
    prepare = make_prepare_fn(graphdefs, algorithm)
    reference = nnx.state(init_decoder(CONFIG, seed=5)) if algorithm.kl_coef > 0 else None
    batch = {**rollout, **prepare(state.params, reference, {k: rollout[k] for k in ROLLOUT_KEYS})}
    if corrupt is not None:
        batch = corrupt(batch)
    update = make_update_fn(graphdefs, optimizer, algorithm, group_size=GROUP, mini_batches=mini, micro_batches=micro,
                            first_mini_batch_on_policy=first_on_policy)
    return update(state, batch)


def flat(params):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def uneven_lengths(rollout):
    """The rollout with response lengths 1-2 in the first half of the rows and 7-8 in the second,
    so micro-batches hold very different numbers of real tokens."""
    rows, length = rollout["response_mask"].shape
    lengths = np.where(np.arange(rows) < rows // 2, 1 + np.arange(rows) % 2, length - np.arange(rows) % 2)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    return {**rollout, "response_mask": jnp.asarray(mask)}


SGD_BOTH = optax.multi_transform({"policy": optax.sgd(1.0), "critic": optax.sgd(1.0)}, lambda p: {k: k for k in p})
# PACS and RLOO have one aggregation each (a mean over responses; loss_agg_mode is ignored).
# GRPO (with its KL term) and PPO (actor and critic) run every mode.
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ACCUMULATION_CASES = [("pacs", "token-mean"), ("rloo", "token-mean")] + [
    (name, mode) for name in ("grpo", "ppo") for mode in AGG_MODES
]


@pytest.mark.parametrize("name,mode", ACCUMULATION_CASES)
def test_accumulated_gradient_equals_the_mini_batch_gradient_with_uneven_lengths(rollout, name, mode):
    """One micro-batch or two (short responses in one, long in the other) take the same step, for
    every loss aggregation, GRPO's KL term and PPO's critic."""
    algorithm = AlgorithmConfig(name=name, loss_agg_mode=mode, kl_coef=0.1 if name == "grpo" else 0.0)
    batch = uneven_lengths(rollout)
    initial = flat(init_train_state(init_decoder(CONFIG, seed=0), SGD_BOTH, name == "ppo")[1].params)
    one, m1 = run_update(batch, algorithm, SGD_BOTH, mini=1, micro=1)
    two, m2 = run_update(batch, algorithm, SGD_BOTH, mini=1, micro=2)
    step_one, step_two = flat(one.params) - initial, flat(two.params) - initial
    assert np.abs(step_one).max() > 1e-4
    # A step is read as (parameter after) - (parameter before) in float32, so it is known only to
    # one spacing of the parameter (1.2e-7 for a norm weight of 1.0): that resolution is allowed
    # on top of the tolerance, per element.
    resolution = 2 * np.spacing(np.abs(initial).astype(np.float32))
    assert np.all(np.abs(step_two - step_one) <= 1e-4 * np.abs(step_one) + 1e-6 * np.abs(step_one).max() + resolution)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------- the whole update against verl in NumPy


def off_policy(batch, seed):
    """Move the rollout's old log-probs (and PPO's old values) away from what the current weights
    give, so the ratios, the dual clip and the value clip all bind in the update's one step."""
    rng = np.random.default_rng(seed)
    mask = np.asarray(batch["response_mask"], np.float64)
    shift = rng.normal(0.0, 0.3, mask.shape)
    shift[::3, :2] = -1.5  # ratio e^1.5 > clip_ratio_c on some tokens
    out = {**batch, "old_logprobs": jnp.asarray((np.asarray(batch["old_logprobs"]) + shift) * mask, jnp.float32)}
    if "old_values" in batch:
        moved = np.asarray(batch["old_values"]) + rng.normal(0.0, 0.6, mask.shape)
        out["old_values"] = jnp.asarray(moved * mask, jnp.float32)
    return out


def prepared_batch(rollout, algorithm, state, graphdefs, reference=None):
    prepared = make_prepare_fn(graphdefs, algorithm)(state.params, reference, {k: rollout[k] for k in ROLLOUT_KEYS})
    return {**rollout, **prepared}


def f64(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_ppo_update_is_verls_ppo_on_the_same_logprobs_and_values(rollout, mode):
    """The PPO update end to end (GAE inside the update, critic forward, both losses, the critic's
    gradient) against verl in float64 NumPy, from the update's own log-probs and values. In the
    paper's mode the divisor T / m makes ours the loss of verl's micro-batches of m responses."""
    micro = 2
    rows, length = rollout["response_mask"].shape
    algorithm = AlgorithmConfig(name="ppo", loss_agg_mode=mode, clip_high=0.28, value_coef=0.7,
                                seq_norm_divisor=length / (rows // micro) if mode != "token-mean" else 0.0)
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), SGD_BOTH, True)
    on_policy = prepared_batch(rollout, algorithm, state, graphdefs)  # the current weights' log-probs and values
    batch = off_policy(on_policy, seed=3)
    # Deliberately off-policy old log-probs in the first mini-batch: read them, not the update's own.
    update = make_update_fn(graphdefs, SGD_BOTH, algorithm, group_size=GROUP, mini_batches=1, micro_batches=micro,
                            first_mini_batch_on_policy=False)
    bias_before = float(state.params["critic"]["value_bias"][...])
    decoder_before = flat(state.params["critic"]["decoder"])
    new_state, metrics = update(state, batch)

    mask = f64(batch["response_mask"])
    logprobs, values = f64(on_policy["old_logprobs"]), f64(on_policy["old_values"])
    old_logprobs, old_values = f64(batch["old_logprobs"]), f64(batch["old_values"])
    token_rewards = verl.outcome_token_rewards(f64(batch["rewards"]), mask)
    advantages, returns = verl.gae(token_rewards, old_values, mask, algorithm.gamma, algorithm.lam)
    per_micro = rows // micro
    if mode == "token-mean":  # the mini-batch's token mean (verl since its global-token fix)
        pg = verl.policy_loss(old_logprobs, logprobs, advantages, mask, 0.2, 0.28, 3.0, mode)[0]
        vf = verl.value_loss(values, returns, old_values, mask, 0.5, mode)[0]
    else:  # verl's accumulation over micro-batches of per_micro responses on one GPU
        pg = verl.accumulated(lambda r: verl.policy_loss(old_logprobs[r], logprobs[r], advantages[r], mask[r],
                                                         0.2, 0.28, 3.0, mode)[0], rows, per_micro)
        vf = verl.accumulated(lambda r: verl.value_loss(values[r], returns[r], old_values[r], mask[r], 0.5, mode)[0],
                              rows, per_micro)
    clipfrac_lower = verl.policy_loss(old_logprobs, logprobs, advantages, mask, 0.2, 0.28, 3.0, mode)[3]
    vf_clipfrac = verl.value_loss(values, returns, old_values, mask, 0.5, mode)[1]
    assert clipfrac_lower > 0 and 0 < vf_clipfrac < 1  # the dual clip and the value clip bind
    tol = dict(rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["actor/pg_loss"]), pg, **tol)
    np.testing.assert_allclose(float(metrics["critic/value_loss"]), vf, **tol)
    np.testing.assert_allclose(float(metrics["loss"]), pg + 0.7 * vf, **tol)

    # The critic's gradient: values = (h . w + b) * mask, so d loss / d b = value_coef * sum_t
    # m_t * d vf / d v_t; the clipped branch has no gradient where the clip binds.
    weights = mask / mask.sum() if mode == "token-mean" else mask / (rows * algorithm.seq_norm_divisor)
    clipped = np.clip(values, old_values - 0.5, old_values + 0.5)
    live = (clipped == values) | ((values - returns) ** 2 > (clipped - returns) ** 2)
    d_bias = 0.7 * 0.5 * np.sum(weights * 2 * (values - returns) * live)
    np.testing.assert_allclose(float(new_state.params["critic"]["value_bias"][...]) - bias_before, -d_bias, rtol=2e-4, atol=1e-7)
    # The value head starts random (verl's score layer), so the critic's decoder learns from step one.
    assert np.abs(flat(new_state.params["critic"]["decoder"]) - decoder_before).max() > 0


def test_grpo_update_with_a_kl_term_is_verls_loss(rollout):
    """GRPO with kl_coef > 0 end to end: the reference policy's log-probs from the prepare pass,
    GRPO advantages from the rewards, dual-clip surrogate plus kl_coef * low_var_kl, in NumPy."""
    algorithm = AlgorithmConfig(name="grpo", kl_coef=0.3, clip_high=0.28)
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), SGD_BOTH, False)
    reference = nnx.state(init_decoder(CONFIG, seed=5))
    on_policy = prepared_batch(rollout, algorithm, state, graphdefs, reference)
    batch = off_policy(on_policy, seed=4)
    update = make_update_fn(graphdefs, SGD_BOTH, algorithm, group_size=GROUP, mini_batches=1, micro_batches=2,
                            first_mini_batch_on_policy=False)
    _, metrics = update(state, batch)

    mask = f64(batch["response_mask"])
    logprobs, old_logprobs, ref_logprobs = f64(on_policy["old_logprobs"]), f64(batch["old_logprobs"]), f64(batch["ref_logprobs"])
    index = np.repeat(np.arange(PROMPTS), GROUP)
    advantages = verl.grpo_advantage(verl.outcome_token_rewards(f64(batch["rewards"]), mask), mask, index, True)
    pg, _, _, clipfrac_lower = verl.policy_loss(old_logprobs, logprobs, advantages, mask, 0.2, 0.28, 3.0, "token-mean")
    kl = verl.agg_loss(verl.low_var_kl(logprobs, ref_logprobs), mask, "token-mean")
    assert clipfrac_lower > 0 and kl > 1e-3
    tol = dict(rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["actor/pg_loss"]), pg, **tol)
    np.testing.assert_allclose(float(metrics["actor/kl_loss"]), kl, **tol)
    np.testing.assert_allclose(float(metrics["loss"]), pg + 0.3 * kl, **tol)


def test_on_policy_first_step_matches_direct_gradient(rollout):
    """The update's first gradient equals jax.grad of the PACS loss computed outside the step."""
    from flax import nnx

    from pacs_jax.algorithms import pacs_loss

    algorithm = AlgorithmConfig(name="pacs", beta=2.0, weight_mode="question")
    sgd = optax.multi_transform({"policy": optax.sgd(1.0)}, lambda p: {k: k for k in p})
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), sgd, False)
    before = jax.tree.map(np.asarray, state.params["policy"])
    new_state, _ = run_update(rollout, algorithm, sgd, mini=1, micro=1)

    def loss(params):
        model = nnx.merge(graphdefs["policy"], params)
        lp = response_logprobs(model, *(rollout[k] for k in ROLLOUT_KEYS))
        return pacs_loss(lp, jax.lax.stop_gradient(lp), rollout["response_mask"], rollout["rewards"], group_size=GROUP, beta=2.0, weight_mode="question")[0]

    grads = jax.grad(loss)(jax.tree.map(jnp.asarray, before))
    expected = flat(before) - flat(grads)
    np.testing.assert_allclose(flat(new_state.params["policy"]), expected, atol=1e-6)


def test_non_finite_gradient_skips_the_step(rollout):
    algorithm = AlgorithmConfig(name="pacs")
    optimizer = make_train_optimizer(algorithm, OptimizerConfig(lr=1e-2), 10)
    initial = flat(init_train_state(init_decoder(CONFIG, seed=0), optimizer, False)[1].params)

    def plant_nan(batch):
        old = np.asarray(batch["old_logprobs"]).copy()
        old[0, 0] = np.nan  # lands in the first mini-batch only
        return {**batch, "old_logprobs": jnp.asarray(old)}

    # The first mini-batch reads the old log-probs it is given (by default it uses its own).
    state, metrics = run_update(rollout, algorithm, optimizer, mini=2, micro=1, corrupt=plant_nan, first_on_policy=False)
    assert float(metrics["skipped_steps"]) == 1.0
    assert np.isfinite(flat(state.params)).all()
    # The second mini-batch's step was taken: one NaN in the first mini-batch leaves exactly the
    # state of a run whose whole first mini-batch is NaN (both skip step 1 and take step 2).
    only_second = run_update(rollout, algorithm, optimizer, mini=2, micro=1, first_on_policy=False,
                             corrupt=lambda b: {**b, "old_logprobs": b["old_logprobs"].at[:8].set(jnp.nan)})[0]
    assert not np.allclose(flat(state.params), initial)
    np.testing.assert_array_equal(flat(state.params), flat(only_second.params))
    all_nan, m = run_update(rollout, algorithm, optimizer, mini=2, micro=1, first_on_policy=False,
                            corrupt=lambda b: {**b, "old_logprobs": b["old_logprobs"] * jnp.nan})
    assert float(m["skipped_steps"]) == 2.0
    np.testing.assert_array_equal(flat(all_nan.params), initial)
    np.testing.assert_array_equal(flat(all_nan.opt_state), flat(init_train_state(init_decoder(CONFIG), optimizer, False)[1].opt_state))


def test_global_norm_clipping_is_applied():
    # With b1 = b2 = 0 and eps = 1, AdamW's step is -lr * g / (|g| + 1): it depends on the scale of g,
    # so clipping changes it in a way a float64 reference can check.
    config = OptimizerConfig(lr=1.0, weight_decay=0.0, b1=0.0, b2=0.0, eps=1.0, grad_clip=0.5)
    g = {"a": jnp.asarray([3.0, -4.0]), "b": jnp.asarray([12.0])}
    optimizer = make_optimizer(config, 10)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    updates, _ = optimizer.update(g, optimizer.init(params), params)
    raw = np.array([3.0, -4.0, 12.0])
    clipped = raw * min(1.0, 0.5 / np.linalg.norm(raw))
    expected = -clipped / (np.abs(clipped) + 1.0)
    np.testing.assert_allclose(np.concatenate([updates["a"], updates["b"]]), expected, rtol=1e-6)
    unclipped = make_optimizer(dataclasses.replace(config, grad_clip=0.0), 10)
    updates, _ = unclipped.update(g, unclipped.init(params), params)
    np.testing.assert_allclose(np.concatenate([updates["a"], updates["b"]]), -raw / (np.abs(raw) + 1), rtol=1e-6)


def test_schedules_follow_closed_form():
    constant = learning_rate_schedule(OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=4), 100)
    assert [float(constant(i)) for i in (0, 2, 4, 50)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    cosine = learning_rate_schedule(OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=10), 110)
    for step in (0, 5, 10, 60, 110):
        if step <= 10:
            want = 1e-3 * step / 10
        else:
            want = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert float(cosine(step)) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("name", ["pacs", "grpo", "rloo", "ppo"])
def test_every_algorithm_updates_with_finite_metrics(rollout, name):
    algorithm = AlgorithmConfig(name=name)
    optimizer = make_train_optimizer(algorithm, OptimizerConfig(lr=1e-3), 10)
    state, metrics = run_update(rollout, algorithm, optimizer, mini=2, micro=2)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert float(metrics["skipped_steps"]) == 0
    if name == "ppo":
        assert "critic" in state.params and "critic/value_loss" in metrics
    if name == "pacs":
        assert "pacs/critic_accuracy" in metrics


def test_reference_logprobs_for_kl(rollout):
    algorithm = AlgorithmConfig(name="grpo", kl_coef=0.1)
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), make_train_optimizer(algorithm, OptimizerConfig(), 1), False)
    reference = init_decoder(CONFIG, seed=5)
    from flax import nnx

    out = make_prepare_fn(graphdefs, algorithm)(state.params, nnx.state(reference), {k: rollout[k] for k in ROLLOUT_KEYS})
    direct = response_logprobs(reference, *(rollout[k] for k in ROLLOUT_KEYS))
    np.testing.assert_allclose(np.asarray(out["ref_logprobs"]), np.asarray(direct), atol=1e-5)


def test_group_split_is_rejected(rollout):
    algorithm = AlgorithmConfig(name="pacs")
    optimizer = make_train_optimizer(algorithm, OptimizerConfig(), 1)
    with pytest.raises(ValueError, match="whole groups"):
        run_update(rollout, algorithm, optimizer, mini=3, micro=1)


# ------------------------------------------------ on-policy by construction, sampler drift


def test_first_mini_batch_is_exactly_on_policy_in_bfloat16(rollout):
    """With bfloat16 compute the old-log-prob pass and the gradient's forward differ (different
    programs, different rounding); the first mini-batch takes its old log-probs from its own
    forward, so its ratio is exactly 1 and nothing is clipped, whatever old log-probs it is given."""
    bf16 = dataclasses.replace(CONFIG, compute_dtype="bfloat16")
    algorithm = AlgorithmConfig(name="grpo", clip_low=0.01, clip_high=0.01)
    graphdefs, state = init_train_state(init_decoder(bf16, seed=0), SGD_BOTH, False)
    batch = {**rollout, "old_logprobs": rollout["response_mask"] * 5.0}  # far off: ratio e^-5 if read
    update = make_update_fn(graphdefs, SGD_BOTH, algorithm, group_size=GROUP, mini_batches=1, micro_batches=2)
    _, metrics = update(state, batch)
    assert float(metrics["actor/ratio_mean"]) == 1.0
    assert float(metrics["actor/clip_fraction"]) == 0.0 and float(metrics["actor/approx_kl"]) == 0.0
    # With the flag off the same batch is read as given: the ratios are far from 1.
    update = make_update_fn(graphdefs, SGD_BOTH, algorithm, group_size=GROUP, mini_batches=1, micro_batches=2,
                            first_mini_batch_on_policy=False)
    _, metrics = update(init_train_state(init_decoder(bf16, seed=0), SGD_BOTH, False)[1], batch)
    assert float(metrics["actor/clip_fraction"]) > 0.1


def test_old_logprob_pass_skips_the_first_mini_batch(rollout):
    algorithm = AlgorithmConfig(name="pacs")
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), SGD_BOTH, False)
    arrays = {k: rollout[k] for k in ROLLOUT_KEYS}
    full = np.asarray(make_prepare_fn(graphdefs, algorithm, chunks=4)(state.params, None, arrays)["old_logprobs"])
    later = np.asarray(make_prepare_fn(graphdefs, algorithm, chunks=4, on_policy_chunks=2)(state.params, None, arrays)["old_logprobs"])
    np.testing.assert_array_equal(later[:8], 0.0)
    np.testing.assert_allclose(later[8:], full[8:], atol=1e-6)
    assert np.abs(full[8:]).max() > 0
    nothing = make_prepare_fn(graphdefs, algorithm, chunks=2, on_policy_chunks=2)(state.params, None, arrays)
    assert set(nothing) == {"old_logprobs"} and not np.asarray(nothing["old_logprobs"]).any()


@pytest.mark.parametrize("mini,micro", [(1, 1), (2, 2)])
def test_logprob_diff_metric_is_the_sampler_gap_recomputed_in_numpy(mini, micro):
    """rollout/logprob_diff_mean and _max: |training forward - sampler| per real token at the
    rollout's weights, over the whole batch (the first mini-batch's from the update's own forward,
    the others' from the old-log-prob pass), against NumPy over the recorded sampler log-probs."""
    model = init_decoder(CONFIG, seed=0)
    rng = np.random.default_rng(1)
    ids, mask = pad_prompts([list(rng.integers(3, 61, n)) for n in (3, 5, 2, 6)], [8], 0)
    out = generate(model, ids, mask, jax.random.key(2), SamplingParams(8, temperature=0.7, stop_ids=(3, 4)), group_size=GROUP)
    batch = {k: getattr(out, k) for k in ROLLOUT_KEYS}
    training = np.asarray(response_logprobs(model, *(batch[k] for k in ROLLOUT_KEYS), temperature=0.7), np.float64)
    # A gap the float32 sampler alone would not show: as if the sampler had run in another dtype.
    sampler = np.asarray(out.logprobs, np.float64) + rng.normal(0, 0.05, training.shape) * np.asarray(out.response_mask)
    gap = np.abs(training - sampler)[np.asarray(out.response_mask) == 1]

    algorithm = AlgorithmConfig(name="pacs")
    graphdefs, state = init_train_state(model, SGD_BOTH, False)
    prepare = make_prepare_fn(graphdefs, algorithm, temperature=0.7, chunks=mini * micro, on_policy_chunks=micro)
    extras = prepare(state.params, None, batch)
    update = make_update_fn(graphdefs, SGD_BOTH, algorithm, group_size=GROUP, mini_batches=mini, micro_batches=micro, temperature=0.7)
    full = {**batch, **extras, "rewards": jnp.asarray(rng.integers(0, 2, PROMPTS * GROUP), jnp.float32),
            "sampler_logprobs": jnp.asarray(sampler, jnp.float32)}
    _, metrics = update(state, full)
    np.testing.assert_allclose(float(metrics["rollout/logprob_diff_mean"]), gap.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rollout/logprob_diff_max"]), gap.max(), rtol=1e-4, atol=1e-6)
    assert "rollout/logprob_diff_sum" not in metrics
