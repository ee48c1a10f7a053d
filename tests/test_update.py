"""The update step: gradient accumulation equals one batch, non-finite gradients skip the step,
clipping and schedules follow their closed forms, every algorithm runs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pacs_jax.config import AlgorithmConfig, OptimizerConfig
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.rollout import SamplingParams, generate, pad_prompts
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


def run_update(rollout, algorithm, optimizer, mini, micro, seed=0, corrupt=None):
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=seed), optimizer, algorithm.name == "ppo")
    prepare = make_prepare_fn(graphdefs, algorithm)
    batch = {**rollout, **prepare(state.params, None, {k: rollout[k] for k in ROLLOUT_KEYS})}
    if corrupt is not None:
        batch = corrupt(batch)
    update = make_update_fn(graphdefs, optimizer, algorithm, group_size=GROUP, mini_batches=mini, micro_batches=micro)
    return update(state, batch)


def flat(params):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


@pytest.mark.parametrize("name", ["pacs", "grpo"])
def test_gradient_accumulation_equals_one_batch(rollout, name):
    algorithm = AlgorithmConfig(name=name, loss_agg_mode="seq-mean-token-mean")
    sgd = optax.multi_transform({"policy": optax.sgd(1.0)}, lambda p: {k: k for k in p})
    initial = flat(init_train_state(init_decoder(CONFIG, seed=0), sgd, False)[1].params)
    one, m1 = run_update(rollout, algorithm, sgd, mini=1, micro=1)
    four, m4 = run_update(rollout, algorithm, sgd, mini=1, micro=4)
    step_one, step_four = flat(one.params) - initial, flat(four.params) - initial
    assert np.abs(step_one).max() > 1e-4  # the step is not trivially zero
    np.testing.assert_allclose(step_four, step_one, atol=1e-5)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)


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

    state, metrics = run_update(rollout, algorithm, optimizer, mini=2, micro=1, corrupt=plant_nan)
    assert float(metrics["skipped_steps"]) == 1.0
    assert np.isfinite(flat(state.params)).all()
    # The second mini-batch's step was taken: one NaN in the first mini-batch leaves exactly the
    # state of a run whose whole first mini-batch is NaN (both skip step 1 and take step 2).
    only_second = run_update(rollout, algorithm, optimizer, mini=2, micro=1,
                             corrupt=lambda b: {**b, "old_logprobs": b["old_logprobs"].at[:8].set(jnp.nan)})[0]
    assert not np.allclose(flat(state.params), initial)
    np.testing.assert_array_equal(flat(state.params), flat(only_second.params))
    all_nan, m = run_update(rollout, algorithm, optimizer, mini=2, micro=1,
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
