"""The losses against independent float64 NumPy references written as explicit loops over
groups, responses and tokens, plus closed-form gradients and scikit-learn's class weights."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from pacs_jax.algorithms import (
    aggregate_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    outcome_token_rewards,
    pacs_loss,
    ppo_policy_loss,
    rloo_loss,
    value_loss,
)
from pacs_jax.algorithms.pacs import sample_weights
import verl_reference as verl  # tests/verl_reference.py

TOL = dict(rtol=1e-9, atol=1e-9)
AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(autouse=True)
def float64():
    """Run every test with float64 enabled so references can be compared at 1e-9."""
    if hasattr(jax, "enable_x64"):
        context = jax.enable_x64(True)
    else:  # older JAX
        from jax.experimental import enable_x64

        context = enable_x64()
    with context:
        yield


def make_batch(seed, prompts=5, group_size=4, length=7, spread=0.5):
    """Random rollout batch: group 0 all correct, group 1 all wrong, the rest random; right-
    padded masks of random length, and one response (index 2 * G + 1) with an empty mask."""
    rng = np.random.default_rng(seed)
    n = prompts * group_size
    logprobs = -rng.exponential(1.0, size=(n, length))
    old_logprobs = logprobs + rng.normal(0.0, spread, size=(n, length))
    lengths = rng.integers(1, length + 1, size=n)
    lengths[2 * group_size + 1] = 0
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)
    rewards = rng.integers(0, 2, size=n).astype(np.float64)
    rewards[:group_size] = 1.0
    rewards[group_size : 2 * group_size] = 0.0
    rewards[2 * group_size : 3 * group_size] = [1.0, 0.0, 0.0, 1.0][:group_size]
    return logprobs, old_logprobs, mask, rewards


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------ PACS reference


def np_scores(logprobs, old_logprobs, mask, beta, reward_method):
    scores = np.zeros(len(mask))
    for i in range(len(mask)):
        if reward_method == "1":
            scores[i] = beta * sum((logprobs[i, t] - old_logprobs[i, t]) * mask[i, t] for t in range(mask.shape[1]))
        else:
            real = mask[i].sum()
            total = sum(logprobs[i, t] * mask[i, t] for t in range(mask.shape[1]))
            scores[i] = beta * total / real if real > 0 else 0.0
    return scores


def np_psi(scores, group_size, adv_estimator, norm_adv_by_std):
    psi = np.zeros_like(scores)
    for start in range(0, len(scores), group_size):
        group = list(scores[start : start + group_size])
        mean = sum(group) / group_size
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / (group_size - 1)) if group_size > 1 else 0.0
        for k, s in enumerate(group):
            if adv_estimator == "naive":
                psi[start + k] = s
            elif adv_estimator == "rloo":
                psi[start + k] = s - sum(group[j] for j in range(group_size) if j != k) / (group_size - 1)
            elif norm_adv_by_std:
                psi[start + k] = (s - mean) / (std + 1e-6)
            else:
                psi[start + k] = s - mean
    return psi


def np_weights(rewards, group_size, weight_mode):
    weights = np.ones_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        num_correct = int(sum(group))
        num_wrong = group_size - num_correct
        for k, r in enumerate(group):
            if weight_mode == "only_positive":
                weights[start + k] = r
            elif weight_mode == "only_negative":
                weights[start + k] = 1 - r
            elif weight_mode == "question" and num_correct and num_wrong:
                weights[start + k] = group_size / (2 * (num_correct if r == 1 else num_wrong))
    return weights


def np_pacs(logprobs, old_logprobs, mask, rewards, group_size, beta, reward_method, adv_estimator, norm, weight_mode):
    scores = np_scores(logprobs, old_logprobs, mask, beta, reward_method)
    psi = np_psi(scores, group_size, adv_estimator, norm)
    weights = np_weights(rewards, group_size, weight_mode)
    n = len(rewards)
    loss = sum(weights[i] * (softplus(psi[i]) - rewards[i] * psi[i]) for i in range(n)) / n
    prob = [sigmoid(p) for p in psi]
    groups = [rewards[s : s + group_size] for s in range(0, n, group_size)]
    metrics = {
        "pacs/psi_mean": psi.mean(),
        "pacs/psi_std": psi.std(),
        "pacs/psi_min": psi.min(),
        "pacs/psi_max": psi.max(),
        "pacs/score_mean": scores.mean(),
        "pacs/critic_accuracy": np.mean([0.5 if abs(psi[i]) <= 1e-6 else float((prob[i] > 0.5) == (rewards[i] == 1)) for i in range(n)]),
        "pacs/critic_log_loss": -np.mean(
            [rewards[i] * math.log(prob[i]) + (1 - rewards[i]) * math.log(1 - prob[i]) for i in range(n)]
        ),
        "pacs/weight_mean": weights.mean(),
        "pacs/mixed_group_fraction": np.mean([0 < g.sum() < group_size for g in groups]),
    }
    return loss, metrics, scores, psi, weights


def np_pacs_grad(logprobs, old_logprobs, mask, rewards, group_size, beta, reward_method, adv_estimator, norm, weight_mode):
    """PACS.md's closed form: dL/dlogp_kt = (1/N) sum_i w_i (sigmoid(psi_i) - r_i) dpsi_i/ds_k ds_k/dlogp_kt."""
    _, _, scores, psi, weights = np_pacs(
        logprobs, old_logprobs, mask, rewards, group_size, beta, reward_method, adv_estimator, norm, weight_mode
    )
    n, length = mask.shape
    grad = np.zeros_like(logprobs)
    for start in range(0, n, group_size):
        group = scores[start : start + group_size]
        mean = group.mean()
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / (group_size - 1)) if group_size > 1 else 0.0
        for k in range(group_size):
            dloss_dsk = 0.0
            for i in range(group_size):
                same = 1.0 if i == k else 0.0
                if adv_estimator == "naive":
                    dpsi = same
                elif adv_estimator == "rloo":
                    dpsi = same - (1 - same) / (group_size - 1)
                elif not norm:
                    dpsi = same - 1 / group_size
                else:
                    dstd = (group[k] - mean) / ((group_size - 1) * std)
                    dpsi = (same - 1 / group_size) / (std + 1e-6) - (group[i] - mean) * dstd / (std + 1e-6) ** 2
                row = start + i
                dloss_dsk += weights[row] * (sigmoid(psi[row]) - rewards[row]) * dpsi / n
            row = start + k
            real = mask[row].sum()
            for t in range(length):
                if reward_method == "1":
                    ds = beta * mask[row, t]
                else:
                    ds = beta * mask[row, t] / real if real > 0 else 0.0
                grad[row, t] = dloss_dsk * ds
    return grad


PACS_OPTIONS = list(
    itertools.product(
        ["1", "2"],  # reward_method
        ["rloo", "grpo", "naive"],  # adv_estimator
        [True, False],  # norm_adv_by_std
        [None, "question", "only_positive", "only_negative"],  # weight_mode
        [1.0, 2.0],  # beta
    )
)


@pytest.mark.parametrize("reward_method,adv_estimator,norm,weight_mode,beta", PACS_OPTIONS)
def test_pacs_loss_metrics_and_gradient_match_numpy(reward_method, adv_estimator, norm, weight_mode, beta):
    lp, old, mask, rewards = make_batch(seed=PACS_OPTIONS.index((reward_method, adv_estimator, norm, weight_mode, beta)))
    options = dict(beta=beta, reward_method=reward_method, adv_estimator=adv_estimator, norm_adv_by_std=norm, weight_mode=weight_mode)
    ref_loss, ref_metrics, *_ = np_pacs(lp, old, mask, rewards, 4, beta, reward_method, adv_estimator, norm, weight_mode)

    def loss_fn(logprobs):
        return pacs_loss(logprobs, jnp.asarray(old), jnp.asarray(mask), jnp.asarray(rewards), group_size=4, **options)

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(lp))
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, **TOL, err_msg=name)
    ref_grad = np_pacs_grad(lp, old, mask, rewards, 4, beta, reward_method, adv_estimator, norm, weight_mode)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-10)
    assert np.all(grad[mask == 0] == 0)  # padding never gets gradient


def test_pacs_loss_jits_and_matches_eager():
    lp, old, mask, rewards = make_batch(seed=3)
    args = [jnp.asarray(a) for a in (lp, old, mask, rewards)]
    fn = functools.partial(pacs_loss, group_size=4, beta=2.0, weight_mode="question", adv_estimator="grpo")
    eager_loss, _ = fn(*args)
    jit_loss, jit_metrics = jax.jit(fn)(*args)
    np.testing.assert_allclose(jit_loss, eager_loss, **TOL)
    assert all(v.shape == () for v in jit_metrics.values())


def test_question_weights_are_sklearn_balanced_per_mixed_group():
    rng = np.random.default_rng(7)
    group_size, prompts = 8, 40
    rewards = rng.integers(0, 2, size=(prompts, group_size)).astype(np.float64)
    rewards[0], rewards[1] = 1.0, 0.0
    weights = np.asarray(sample_weights(jnp.asarray(rewards.reshape(-1)), group_size, "question")).reshape(prompts, group_size)
    for labels, got in zip(rewards, weights):
        if 0 < labels.sum() < group_size:
            per_class = compute_class_weight("balanced", classes=np.array([0.0, 1.0]), y=labels)
            np.testing.assert_allclose(got, per_class[labels.astype(int)], **TOL)
        else:
            np.testing.assert_array_equal(got, np.ones(group_size))
    assert any(0 < labels.sum() < group_size for labels in rewards)


@pytest.mark.parametrize("beta", [1.0, 2.0])
@pytest.mark.parametrize("weight_mode", [None, "question"])
def test_on_policy_pacs_gradient_is_beta_times_rloo_gradient(beta, weight_mode):
    lp, _, mask, rewards = make_batch(seed=11)
    old, mask_j, rewards_j = jnp.asarray(lp), jnp.asarray(mask), jnp.asarray(rewards)
    pacs_grad = jax.grad(
        lambda x: pacs_loss(x, old, mask_j, rewards_j, group_size=4, beta=beta, weight_mode=weight_mode)[0]
    )(jnp.asarray(lp))
    # RLOO is blind to a constant reward shift; with weights, PACS on-policy is RLOO on w * (r - 1/2).
    effective = rewards if weight_mode is None else np_weights(rewards, 4, weight_mode) * (rewards - 0.5)
    rloo_grad = jax.grad(lambda x: rloo_loss(x, mask_j, jnp.asarray(effective), group_size=4)[0])(jnp.asarray(lp))
    np.testing.assert_allclose(pacs_grad, beta * rloo_grad, **TOL)
    assert np.abs(np.asarray(pacs_grad)).max() > 1e-3  # a real, non-trivial gradient


# ------------------------------------------------------------------------ aggregation / RLOO / GRPO


def np_aggregate(loss_mat, mask, mode):
    n, length = mask.shape
    sums = [sum(loss_mat[i, t] * mask[i, t] for t in range(length)) for i in range(n)]
    counts = [mask[i].sum() for i in range(n)]
    if mode == "token-mean":
        return sum(sums) / sum(counts)
    if mode == "seq-mean-token-sum":
        return sum(sums) / n
    if mode == "seq-mean-token-mean":
        return sum(s / c if c > 0 else 0.0 for s, c in zip(sums, counts)) / n
    return sum(s / length for s in sums) / n


def np_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_matches_numpy(mode):
    rng = np.random.default_rng(1)
    _, _, mask, _ = make_batch(seed=1)
    loss_mat = rng.normal(size=mask.shape)
    np.testing.assert_allclose(aggregate_loss(jnp.asarray(loss_mat), jnp.asarray(mask), mode), np_aggregate(loss_mat, mask, mode), **TOL)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_rloo_loss_matches_numpy(mode):
    lp, _, mask, rewards = make_batch(seed=5)
    advantages = np.zeros_like(rewards)
    for start in range(0, len(rewards), 4):
        for k in range(4):
            others = [rewards[start + j] for j in range(4) if j != k]
            advantages[start + k] = rewards[start + k] - sum(others) / 3
    expected = np_aggregate(-advantages[:, None] * lp, mask, mode)
    loss, _ = rloo_loss(jnp.asarray(lp), jnp.asarray(mask), jnp.asarray(rewards), group_size=4, loss_agg_mode=mode)
    np.testing.assert_allclose(loss, expected, **TOL)


def np_grpo_advantages(rewards, group_size, norm, eps=1e-6):
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = group.mean()
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for k in range(group_size):
            out[start + k] = (group[k] - mean) / (std + eps) if norm else group[k] - mean
    return out


def np_clipped_surrogate(lp, old, advantages, mask, clip_low, clip_high):
    loss_mat, clipped = np.zeros_like(lp), np.zeros_like(lp)
    for i, t in itertools.product(range(lp.shape[0]), range(lp.shape[1])):
        ratio = math.exp(lp[i, t] - old[i, t])
        a = advantages[i, t]
        plain, bounded = -a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
        loss_mat[i, t] = max(plain, bounded)
        clipped[i, t] = float(bounded > plain)
    return loss_mat, clipped


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantages_match_numpy(norm):
    _, _, _, rewards = make_batch(seed=2, prompts=6)
    np.testing.assert_allclose(grpo_advantages(jnp.asarray(rewards), 4, norm), np_grpo_advantages(rewards, 4, norm), **TOL)


@pytest.mark.parametrize("mode,with_ref", [(m, r) for m in AGG_MODES for r in (False, True)])
def test_grpo_loss_and_metrics_match_numpy(mode, with_ref):
    lp, old, mask, rewards = make_batch(seed=9, spread=0.3)
    ref = lp + np.random.default_rng(4).normal(0, 0.4, size=lp.shape)
    clip_low, clip_high, kl_coef = 0.2, 0.28, 0.05
    advantages = np.repeat(np_grpo_advantages(rewards, 4, True)[:, None], lp.shape[1], axis=1)
    loss_mat, clipped = np_clipped_surrogate(lp, old, advantages, mask, clip_low, clip_high)
    expected = np_aggregate(loss_mat, mask, mode)
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    if with_ref:
        expected += kl_coef * np_aggregate(k3, mask, mode)
    kwargs = dict(ref_logprobs=jnp.asarray(ref), kl_coef=kl_coef) if with_ref else {}
    loss, metrics = grpo_loss(
        jnp.asarray(lp), jnp.asarray(old), jnp.asarray(mask), jnp.asarray(rewards),
        group_size=4, clip_low=clip_low, clip_high=clip_high, loss_agg_mode=mode, **kwargs,
    )
    np.testing.assert_allclose(loss, expected, **TOL)
    frac = np_masked_mean(clipped, mask)
    assert 0 < frac < 1  # both clipped and unclipped tokens are exercised
    np.testing.assert_allclose(metrics["actor/clip_fraction"], frac, **TOL)
    np.testing.assert_allclose(metrics["actor/approx_kl"], np_masked_mean(old - lp, mask), **TOL)
    if with_ref:
        np.testing.assert_allclose(metrics["actor/ref_kl"], np_masked_mean(k3, mask), **TOL)


# ------------------------------------------------------------------------ PPO


def test_outcome_token_rewards_sit_on_last_real_token():
    _, _, mask, rewards = make_batch(seed=4)
    mask[3, 1] = 0.0  # a hole in the middle must not move the last real token
    expected = np.zeros_like(mask)
    for i in range(len(mask)):
        real = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        if real:
            expected[i, real[-1]] = rewards[i]
    np.testing.assert_array_equal(outcome_token_rewards(jnp.asarray(rewards), jnp.asarray(mask)), expected)


def np_gae(rewards, values, mask, gamma, lam, whiten):
    n, length = mask.shape
    advantages = np.zeros_like(values)
    for i in range(n):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(length)):
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            adv = delta + gamma * lam * next_adv
            if mask[i, t]:
                next_value, next_adv = values[i, t], adv
            advantages[i, t] = next_adv
    returns = advantages + values
    if whiten:
        real = advantages[mask > 0]
        mean, var = real.mean(), real.var(ddof=1)
        advantages = (advantages - mean) / math.sqrt(var + 1e-8)
    return advantages * mask, returns * mask


@pytest.mark.parametrize("gamma,lam,whiten", [(1.0, 1.0, False), (0.99, 0.95, True), (0.9, 0.5, False)])
def test_gae_matches_numpy_backward_loop(gamma, lam, whiten):
    rng = np.random.default_rng(6)
    _, _, mask, rewards = make_batch(seed=6)
    token_rewards = np.array(outcome_token_rewards(jnp.asarray(rewards), jnp.asarray(mask)))
    token_rewards += rng.normal(0, 0.1, size=mask.shape) * mask  # dense rewards exercise every step
    values = rng.normal(size=mask.shape)
    args = [jnp.asarray(a) for a in (token_rewards, values, mask)]
    advantages, returns = jax.jit(gae, static_argnums=(3, 4, 5))(*args, gamma, lam, whiten)
    ref_adv, ref_ret = np_gae(token_rewards, values, mask, gamma, lam, whiten)
    np.testing.assert_allclose(advantages, ref_adv, **TOL)
    np.testing.assert_allclose(returns, ref_ret, **TOL)


def test_gae_with_unit_gamma_lambda_is_reward_to_go_minus_value():
    rng = np.random.default_rng(8)
    _, _, mask, _ = make_batch(seed=8)
    rewards, values = rng.normal(size=mask.shape) * mask, rng.normal(size=mask.shape)
    advantages, _ = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0, whiten=False)
    to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(advantages, (to_go - values) * mask, **TOL)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_policy_loss_matches_numpy(mode):
    lp, old, mask, _ = make_batch(seed=12, spread=0.3)
    advantages = np.random.default_rng(12).normal(size=lp.shape)
    loss_mat, clipped = np_clipped_surrogate(lp, old, advantages, mask, 0.1, 0.3)
    loss, metrics = ppo_policy_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask), 0.1, 0.3, mode)
    np.testing.assert_allclose(loss, np_aggregate(loss_mat, mask, mode), **TOL)
    np.testing.assert_allclose(metrics["actor/clip_fraction"], np_masked_mean(clipped, mask), **TOL)


def test_value_loss_matches_numpy():
    rng = np.random.default_rng(13)
    _, _, mask, _ = make_batch(seed=13)
    old_values = rng.normal(size=mask.shape)
    values = old_values + rng.normal(0, 0.6, size=mask.shape)
    returns = rng.normal(size=mask.shape)
    clip = 0.3
    errors, clipped = np.zeros_like(values), np.zeros_like(values)
    for i, t in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
        bounded = min(max(values[i, t], old_values[i, t] - clip), old_values[i, t] + clip)
        plain_err, clip_err = (values[i, t] - returns[i, t]) ** 2, (bounded - returns[i, t]) ** 2
        errors[i, t] = max(plain_err, clip_err)
        clipped[i, t] = float(clip_err > plain_err)
    loss, metrics = value_loss(*(jnp.asarray(a) for a in (values, old_values, returns, mask)), clip)
    np.testing.assert_allclose(loss, 0.5 * np_masked_mean(errors, mask), **TOL)
    frac = np_masked_mean(clipped, mask)
    assert 0 < frac < 1
    np.testing.assert_allclose(metrics["critic/clip_fraction"], frac, **TOL)


# ------------------------------------------------------------------------ bad options


def test_bad_options_raise_value_error_naming_the_argument():
    lp, old, mask, rewards = (jnp.asarray(a) for a in make_batch(seed=0))
    calls = {
        "reward_method": lambda: pacs_loss(lp, old, mask, rewards, group_size=4, reward_method="3"),
        "adv_estimator": lambda: pacs_loss(lp, old, mask, rewards, group_size=4, adv_estimator="gae"),
        "weight_mode": lambda: pacs_loss(lp, old, mask, rewards, group_size=4, weight_mode="balanced"),
        "loss_agg_mode": lambda: grpo_loss(lp, old, mask, rewards, group_size=4, loss_agg_mode="mean"),
        "group_size": lambda: pacs_loss(lp, old, mask, rewards, group_size=3),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=name):
            call()
    for call in (
        lambda: aggregate_loss(lp, mask, "sum"),
        lambda: rloo_loss(lp, mask, rewards, group_size=4, loss_agg_mode="sum"),
        lambda: ppo_policy_loss(lp, old, lp, mask, 0.2, 0.2, "sum"),
        lambda: value_loss(lp, old, lp, mask, 0.2, loss_agg_mode="sum"),
    ):
        with pytest.raises(ValueError, match="loss_agg_mode"):
            call()
    with pytest.raises(ValueError, match="group_size"):
        rloo_loss(lp, mask, rewards, group_size=1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, old, mask, rewards, group_size=4, kl_coef=0.1)


def test_on_policy_grpo_estimator_gradient_is_finite_centring_over_eps():
    # All scores 0: std is 0 where sqrt's derivative is infinite; the true derivative of
    # (s - mean) / (std + 1e-6) there is the centring divided by 1e-6, not NaN.
    lp, _, mask, rewards = make_batch(seed=14)
    grad = jax.grad(
        lambda x: pacs_loss(x, jnp.asarray(lp), jnp.asarray(mask), jnp.asarray(rewards), group_size=4, adv_estimator="grpo",
                            weight_mode=None)[0]
    )(jnp.asarray(lp))
    expected = np.zeros_like(lp)
    n = len(rewards)
    for start in range(0, n, 4):
        for k in range(4):
            dloss_ds = sum((0.5 - rewards[start + i]) * ((i == k) - 0.25) / 1e-6 for i in range(4)) / n
            expected[start + k] = dloss_ds * mask[start + k]
    np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-6)


# ------------------------------------------------------------------------ verl's baselines
# Against tests/verl_reference.py, a float64 transcription of the verl the authors' baselines ran
# on: the GRPO and PPO baselines must be the ones the paper compared against, or differ exactly
# where docs/algorithms.md says.


def verl_batch(seed, spread=0.4):
    """make_batch without empty responses (verl's seq-mean-token-mean divides by each length),
    and with a few tokens whose ratio exceeds 3 so the dual clip binds."""
    lp, old, mask, rewards = make_batch(seed, spread=spread)
    mask[:, 0] = 1.0
    old[::3, 0] = lp[::3, 0] - 1.5  # ratio e^1.5 = 4.5 > clip_ratio_c
    return lp, old, mask, rewards


@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_is_verls_dual_clip_loss(mode):
    lp, old, mask, _ = verl_batch(seed=21)
    advantages = np.random.default_rng(21).normal(size=lp.shape)
    clip_low, clip_high, clip_ratio_c = 0.2, 0.28, 3.0
    loss_fn = lambda x: ppo_policy_loss(  # noqa: E731
        x, jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask), clip_low, clip_high, mode, clip_ratio_c
    )
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(lp))
    ref_loss, clipfrac, ppo_kl, clipfrac_lower = verl.policy_loss(old, lp, advantages, mask, clip_low, clip_high, clip_ratio_c, mode)
    if mode == "seq-mean-token-sum-norm":
        ref_loss /= len(mask)  # one verl micro-batch of all N responses: verl's sum is N times our mean
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(metrics["actor/clip_fraction"], clipfrac, **TOL)
    np.testing.assert_allclose(metrics["actor/approx_kl"], ppo_kl, **TOL)
    np.testing.assert_allclose(metrics["actor/clip_fraction_lower"], clipfrac_lower, **TOL)
    assert 0 < clipfrac_lower and 0 < clipfrac < 1  # the dual clip and the ordinary clip both bind
    # The gradient: -A * ratio where the unclipped term is the loss, 0 where either clip binds,
    # times each token's weight in the aggregation.
    ratio = np.exp(lp - old)
    plain, bounded = -advantages * ratio, -advantages * np.clip(ratio, 1 - clip_low, 1 + clip_high)
    live = (plain >= bounded) & ~((advantages < 0) & (np.maximum(plain, bounded) > -advantages * clip_ratio_c))
    lengths = mask.sum(-1, keepdims=True)
    weight = {"token-mean": mask / mask.sum(), "seq-mean-token-sum": mask / len(mask),
              "seq-mean-token-mean": mask / (len(mask) * lengths),
              "seq-mean-token-sum-norm": mask / (len(mask) * mask.shape[1])}[mode]
    np.testing.assert_allclose(grad, np.where(live, plain, 0.0) * weight, **TOL)


def test_dual_clip_turns_off_with_an_infinite_bound_and_rejects_a_bound_at_most_one():
    lp, old, mask, _ = (jnp.asarray(a) for a in verl_batch(seed=22))
    advantages = -jnp.ones_like(lp)
    off, _ = ppo_policy_loss(lp, old, advantages, mask, 0.2, 0.2, "token-mean", float("inf"))
    ratio = np.exp(np.asarray(lp) - np.asarray(old))
    np.testing.assert_allclose(off, np_masked_mean(np.maximum(ratio, np.clip(ratio, 0.8, 1.2)), np.asarray(mask)), **TOL)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_policy_loss(lp, old, advantages, mask, 0.2, 0.2, "token-mean", 1.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_is_verls(mode):
    rng = np.random.default_rng(23)
    _, _, mask, _ = verl_batch(seed=23)
    old_values = rng.normal(size=mask.shape)
    values, returns = old_values + rng.normal(0, 0.6, size=mask.shape), rng.normal(size=mask.shape)
    loss, metrics = value_loss(*(jnp.asarray(a) for a in (values, old_values, returns, mask)), 0.5, mode)
    ref_loss, clipfrac = verl.value_loss(values, returns, old_values, mask, 0.5, mode)
    if mode == "seq-mean-token-sum-norm":
        ref_loss /= len(mask)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(metrics["critic/clip_fraction"], clipfrac, **TOL)
    assert 0 < clipfrac < 1


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verls_accumulated_loss_is_ours_with_the_seq_norm_divisor(mode):
    """verl's update (micro-batches of m responses per GPU, each loss / the accumulation steps,
    FSDP's mean over ranks) applies our sequence-mode losses, seq-mean-token-sum-norm's with the
    divisor T / m (the paper configs' seq_norm_divisor). verl v0.4's token-mean averages each
    micro-batch's own token mean instead; ours is the mini-batch's (docs/algorithms.md)."""
    lp, old, mask, _ = verl_batch(seed=27)  # 20 responses of T = 7 tokens, none empty
    advantages = np.random.default_rng(27).normal(size=lp.shape)
    rows, length = mask.shape
    ranks, micro = 2, 5
    clip = (0.2, 0.28, 3.0)

    def micro_batch_loss(r):
        return verl.policy_loss(old[r], lp[r], advantages[r], mask[r], *clip, mode)[0]

    expected = verl.accumulated(micro_batch_loss, rows, micro, ranks)
    ours, _ = ppo_policy_loss(*(jnp.asarray(a) for a in (lp, old, advantages, mask)), clip[0], clip[1], mode, clip[2],
                              seq_norm_divisor=length / micro)
    np.testing.assert_allclose(ours, expected, **TOL)
    if mode == "seq-mean-token-sum-norm":  # without the divisor, ours is verl's / m
        plain, _ = ppo_policy_loss(*(jnp.asarray(a) for a in (lp, old, advantages, mask)), *clip[:2], mode, clip[2])
        np.testing.assert_allclose(plain * micro, expected, **TOL)


def test_k3_kl_is_verls_low_var_kl_with_its_clamps():
    from pacs_jax.algorithms.grpo import k3_kl

    rng = np.random.default_rng(24)
    lp = -rng.exponential(1.0, size=(4, 6))
    ref = lp + rng.normal(0, 1.0, size=lp.shape)
    ref[0, :3] = lp[0, :3] + np.array([25.0, 5.0, -30.0])  # past the log-ratio clamp, the KL clamp, both
    expected = verl.low_var_kl(lp, ref)
    assert (expected == 10).sum() >= 2
    np.testing.assert_allclose(k3_kl(jnp.asarray(lp), jnp.asarray(ref)), expected, **TOL)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_is_verls(gamma, lam):
    rng = np.random.default_rng(25)
    _, _, mask, rewards = make_batch(seed=25)  # right-padded, one empty response
    token_rewards = verl.outcome_token_rewards(rewards, mask)
    np.testing.assert_array_equal(outcome_token_rewards(jnp.asarray(rewards), jnp.asarray(mask)), token_rewards)
    values = rng.normal(size=mask.shape) * mask  # verl's critic returns values * mask, as ours
    advantages, returns = gae(jnp.asarray(token_rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = verl.gae(token_rewards, values, mask, gamma, lam)
    # verl leaves advantages off the mask non-zero (every consumer masks them); ours zeroes them.
    np.testing.assert_allclose(advantages, ref_adv * mask, **TOL)
    np.testing.assert_allclose(returns, ref_ret * mask, **TOL)
    # A hole inside a response (never produced by our sampler): ours is verl's later version,
    # which carries the value and advantage across it.
    mask[4, 2] = 0.0
    values = values * mask
    advantages, returns = gae(jnp.asarray(token_rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = verl.gae_masked_carry(token_rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, ref_adv * mask, **TOL)
    np.testing.assert_allclose(returns, ref_ret * mask, **TOL)


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantages_are_verls(norm):
    _, _, mask, rewards = make_batch(seed=26, prompts=6)
    token_rewards = verl.outcome_token_rewards(rewards, mask)
    index = np.repeat(np.arange(6), 4)
    expected = verl.grpo_advantage(token_rewards, mask, index, norm)
    ours = np.asarray(grpo_advantages(jnp.asarray(rewards), 4, norm))[:, None] * mask
    np.testing.assert_allclose(ours, expected, **TOL)


# ------------------------------------------------- RLVR toolbox: DAPO, GSPO, Dr. GRPO, rollout correction
# Against the float64 transcriptions of their sources in tests/verl_reference.py.


def test_library_defaults_are_the_trainers():
    """A direct call of a loss gets the loss the trainer runs (issue 27, defect 6): every keyword
    that is also an AlgorithmConfig field defaults to the config's default."""
    import dataclasses
    import inspect

    from pacs_jax.algorithms import gspo_loss
    from pacs_jax.config import AlgorithmConfig

    defaults = {f.name: f.default for f in dataclasses.fields(AlgorithmConfig)}
    checked = 0
    for fn in (pacs_loss, grpo_loss, gspo_loss, ppo_policy_loss):
        for name, parameter in inspect.signature(fn).parameters.items():
            if name in defaults and parameter.default is not inspect.Parameter.empty:
                assert parameter.default == defaults[name], (fn.__name__, name)
                checked += 1
    assert checked >= 12
    # And the default changes the loss: "question" weights differ from none on mixed groups.
    lp, old, mask, rewards = (jnp.asarray(a) for a in make_batch(seed=40))
    default, _ = pacs_loss(lp, old, mask, rewards, group_size=4)
    question, _ = pacs_loss(lp, old, mask, rewards, group_size=4, weight_mode="question")
    unweighted, _ = pacs_loss(lp, old, mask, rewards, group_size=4, weight_mode=None)
    assert float(default) == float(question) and abs(float(default) - float(unweighted)) > 1e-3


def test_overlong_penalty_is_dapos_soft_punishment():
    from pacs_jax.algorithms import overlong_penalty

    lengths = np.arange(0, 21)
    for buffer, factor in [(5, 1.0), (8, 0.5), (1, 2.0)]:
        got = overlong_penalty(lengths, 20, buffer, factor)
        expected = [verl.dapo_overlong_reward(n, 20, buffer, factor) for n in lengths]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        assert got[-1] == -factor and got[20 - buffer] == 0 and got[20 - buffer + 1] < 0
    np.testing.assert_array_equal(overlong_penalty(lengths, 20, 0, 1.0), 0.0)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 20, 20, 1.0)


def test_truncated_responses_are_those_at_the_cap_without_a_stop_token():
    from pacs_jax.algorithms import truncated_responses

    stop = (3, 4)
    ids = np.array([[7, 8, 9, 9], [7, 8, 9, 3], [7, 3, 0, 0], [7, 8, 9, 4], [9, 9, 9, 9]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(truncated_responses(ids, mask, 4, stop), [True, False, False, False, False])


def test_dapo_loss_is_the_papers_with_clip_higher_overlong_filter_and_token_mean():
    """DAPO (grpo with clip_high 0.28, token-mean, truncated responses out of the loss) is the DAPO
    paper's objective when the dual clip is off; with verl's dual clip on, it is verl's surrogate
    (the dual clip only bounds A < 0 tokens whose ratio passes clip_ratio_c; clip-higher only
    moves the A > 0 bound)."""
    lp, old, mask, rewards = verl_batch(seed=41, spread=0.3)
    rewards = rewards + np.random.default_rng(41).normal(0, 0.1, rewards.shape)  # shaped rewards (overlong penalty)
    truncated = np.zeros(len(rewards), bool)
    truncated[[1, 6, 13]] = True
    keep_mask = mask * ~truncated[:, None]
    ratio = np.exp(lp - old)
    args = (jnp.asarray(lp), jnp.asarray(old), jnp.asarray(keep_mask), jnp.asarray(rewards))
    off, metrics = grpo_loss(*args, group_size=4, clip_low=0.2, clip_high=0.28, clip_ratio_c=float("inf"))
    np.testing.assert_allclose(off, verl.dapo_objective(old, lp, rewards, mask, 4, 0.2, 0.28, truncated), **TOL)
    # clip-higher binds: some A > 0 tokens are clipped at 1.28, and some between 1.2 and 1.28 are not.
    advantages = np.asarray(grpo_advantages(jnp.asarray(rewards), 4))[:, None] * np.ones_like(lp)
    live = keep_mask > 0
    assert ((advantages > 0) & (ratio > 1.28) & live).any() and ((advantages > 0) & (ratio > 1.2) & (ratio < 1.28) & live).any()
    on, _ = grpo_loss(*args, group_size=4, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
    expected, _, _, clipfrac_lower = verl.policy_loss(old, lp, advantages, keep_mask, 0.2, 0.28, 3.0, "token-mean")
    np.testing.assert_allclose(on, expected, **TOL)
    assert clipfrac_lower > 0  # the dual clip binds too, and only there do the two differ
    dual = (advantages < 0) & (ratio > 3.0) & live
    np.testing.assert_allclose(float(on) - float(off), (advantages * (ratio - 3.0))[dual].sum() / keep_mask.sum(), **TOL)


def test_dr_grpo_is_grpo_without_std_and_with_a_constant_normaliser():
    """Dr. GRPO (Liu et al. 2025): advantages r - mean(group) and each response's token sum over a
    constant (max_new_tokens), averaged over responses: verl's agg_loss seq-mean-token-sum-norm."""
    lp, old, mask, rewards = verl_batch(seed=42)
    loss, _ = grpo_loss(*(jnp.asarray(a) for a in (lp, old, mask, rewards)), group_size=4, norm_adv_by_std=False,
                        loss_agg_mode="seq-mean-token-sum-norm", seq_norm_divisor=64.0)
    index = np.repeat(np.arange(len(rewards) // 4), 4)
    advantages = verl.grpo_advantage(verl.outcome_token_rewards(rewards, mask), mask, index, False)
    total = 0.0
    for i in range(len(rewards)):  # sum_i sum_t loss_it / 64, over N responses
        per_token = verl.policy_loss(old[i : i + 1], lp[i : i + 1], advantages[i : i + 1], mask[i : i + 1], 0.2, 0.2, 3.0,
                                     "seq-mean-token-sum")[0]
        total += per_token / 64.0
    np.testing.assert_allclose(loss, total / len(rewards), **TOL)


@pytest.mark.parametrize("with_weights", [False, True])
def test_gspo_loss_is_verls_and_its_gradient_the_papers(with_weights):
    from pacs_jax.algorithms import gspo_loss

    lp, old, mask, rewards = make_batch(seed=43, spread=0.05)
    mask[:, 0] = 1.0  # GSPO's ratio is per response: every response has a token
    old[::3] = old[::3] - 0.004 * mask[::3]  # sequence ratios around 1.004: the clip range (3e-4, 4e-4) binds
    weights = np.random.default_rng(43).uniform(0.5, 1.5, lp.shape) * mask if with_weights else None
    clip_low, clip_high = 3e-4, 4e-4

    def loss_fn(x):
        return gspo_loss(x, jnp.asarray(old), jnp.asarray(mask), jnp.asarray(rewards), group_size=4, clip_low=clip_low,
                         clip_high=clip_high, token_weights=None if weights is None else jnp.asarray(weights))

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(lp))
    index = np.repeat(np.arange(len(rewards) // 4), 4)
    advantages = verl.grpo_advantage(verl.outcome_token_rewards(rewards, mask), mask, index, True)
    ref_loss, clipfrac, ppo_kl = verl.gspo_policy_loss(old, lp, advantages, mask, clip_low, clip_high, weights)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(metrics["actor/clip_fraction"], clipfrac, **TOL)
    np.testing.assert_allclose(metrics["actor/approx_kl"], ppo_kl, **TOL)
    assert 0 < clipfrac < 1
    paper_loss, paper_grad = verl.gspo_paper_objective_and_gradient(old, lp, rewards, mask, 4, clip_low, clip_high)
    if weights is None:
        np.testing.assert_allclose(loss, paper_loss, **TOL)
        np.testing.assert_allclose(grad, paper_grad, rtol=1e-8, atol=1e-12)
    else:  # each token's gradient scaled by its weight, as verl multiplies pg_losses
        np.testing.assert_allclose(grad, paper_grad * weights, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_correction_weights_are_verls(mode, level):
    from pacs_jax.algorithms import rollout_correction_weights

    _, old, mask, _ = make_batch(seed=44)
    rng = np.random.default_rng(44)
    spread = 0.5 if level == "token" else 0.15
    sampler = old + rng.normal(0, spread, old.shape)
    sampler[0, 0] = old[0, 0] - 30.0  # past verl's safety bound
    weights, metrics = rollout_correction_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask),
                                                  mode={"truncate": "tis", "mask": "mis"}[mode], cap=2.0, level=level)
    expected, fraction = verl.rollout_is_weights(old, sampler, mask, level, mode, 2.0)
    np.testing.assert_allclose(weights, expected, **TOL)
    name = "capped" if mode == "truncate" else "masked"
    np.testing.assert_allclose(metrics[f"rollout_corr/{name}_fraction"], fraction, **TOL)
    assert 0 < fraction < 1
    np.testing.assert_allclose(metrics["rollout_corr/k3_kl"], verl.rollout_corr_k3_kl(old, sampler * mask, mask), **TOL)
    np.testing.assert_allclose(metrics["rollout_corr/weight_mean"], np_masked_mean(expected, mask), **TOL)
    np.testing.assert_allclose(metrics["rollout_corr/weight_max"], expected.max(), **TOL)
    assert float(metrics["rollout_corr/ratio_max"]) == pytest.approx(math.exp(20.0))
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        rollout_correction_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask), mode="tis", cap=1.0)


def test_token_weights_scale_each_tokens_loss_in_grpo_ppo_and_rloo():
    """verl multiplies the per-token policy loss by the rollout correction's weights before
    aggregating; REINFORCE (RLOO) becomes -E[w_t log pi(a_t) A_t]."""
    lp, old, mask, rewards = verl_batch(seed=45)
    weights = np.random.default_rng(45).uniform(0.0, 2.0, lp.shape) * mask
    j = [jnp.asarray(a) for a in (lp, old, mask, rewards, weights)]
    index = np.repeat(np.arange(len(rewards) // 4), 4)
    advantages = verl.grpo_advantage(verl.outcome_token_rewards(rewards, mask), mask, index, True)
    for mode in AGG_MODES:
        loss, _ = grpo_loss(j[0], j[1], j[2], j[3], group_size=4, clip_high=0.28, loss_agg_mode=mode, token_weights=j[4])
        ref = verl.policy_loss(old, lp, advantages, mask * weights, 0.2, 0.28, 3.0, mode)[0] if mode == "token-mean" else None
        plain_mat = np.asarray(jax.grad(lambda x: grpo_loss(x, j[1], j[2], j[3], group_size=4, clip_high=0.28,
                                                           loss_agg_mode=mode)[0])(j[0]))
        weighted_mat = np.asarray(jax.grad(lambda x: grpo_loss(x, j[1], j[2], j[3], group_size=4, clip_high=0.28,
                                                              loss_agg_mode=mode, token_weights=j[4])[0])(j[0]))
        np.testing.assert_allclose(weighted_mat, plain_mat * weights, **TOL)
        if ref is not None:  # token-mean over the real tokens, each token's loss times w
            np.testing.assert_allclose(loss * mask.sum(), ref * (mask * weights).sum(), **TOL)
    rloo, _ = rloo_loss(j[0], j[2], j[3], group_size=4, token_weights=j[4])
    rloo_adv = np.asarray(rloo_advantages_np(rewards, 4))
    expected = -sum(weights[i, t] * mask[i, t] * rloo_adv[i] * lp[i, t] for i in range(len(rewards)) for t in range(lp.shape[1]))
    np.testing.assert_allclose(rloo, expected / len(rewards), **TOL)


def rloo_advantages_np(rewards, group_size):
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        for k in range(group_size):
            out[start + k] = group[k] - (group.sum() - group[k]) / (group_size - 1)
    return out


@pytest.mark.parametrize("weight_mode", [None, "question"])
def test_pacs_token_weights_enter_the_score(weight_mode):
    """PACS's rollout correction: s_i = beta * sum_t w_t m_t (logp - old). Off-policy: the NumPy
    PACS reference and its closed-form gradient on the weighted score. On-policy: beta x the
    gradient of RLOO with the same weights (verl's REINFORCE + IS)."""
    lp, old, mask, rewards = make_batch(seed=46)
    weights = np.random.default_rng(46).uniform(0.0, 2.0, lp.shape) * mask
    options = dict(beta=2.0, reward_method="1", adv_estimator="rloo", norm=True, weight_mode=weight_mode)

    def loss_fn(x, old_lp):
        return pacs_loss(x, jnp.asarray(old_lp), jnp.asarray(mask), jnp.asarray(rewards), group_size=4, beta=2.0,
                         weight_mode=weight_mode, token_weights=jnp.asarray(weights))[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(lp), old)
    ref_loss = np_pacs(lp, old, mask * weights, rewards, 4, **options)[0]
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(grad, np_pacs_grad(lp, old, mask * weights, rewards, 4, **options), rtol=1e-8, atol=1e-10)
    on_policy = jax.grad(loss_fn)(jnp.asarray(lp), lp)
    effective = rewards if weight_mode is None else np_weights(rewards, 4, weight_mode) * (rewards - 0.5)
    rloo_grad = jax.grad(lambda x: rloo_loss(x, jnp.asarray(mask), jnp.asarray(effective), group_size=4,
                                             token_weights=jnp.asarray(weights))[0])(jnp.asarray(lp))
    np.testing.assert_allclose(on_policy, 2.0 * rloo_grad, **TOL)
    assert np.abs(np.asarray(on_policy)).max() > 1e-3


def test_pacs_response_keep_drops_the_response_but_keeps_its_score_in_the_baseline():
    lp, old, mask, rewards = make_batch(seed=47)
    keep = np.ones(len(rewards))
    keep[[2, 9]] = 0.0
    loss_fn = lambda x: pacs_loss(x, jnp.asarray(old), jnp.asarray(mask), jnp.asarray(rewards), group_size=4,  # noqa: E731
                                  response_keep=jnp.asarray(keep))[0]
    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(lp))
    options = dict(beta=1.0, reward_method="1", adv_estimator="rloo", norm=True, weight_mode="question")
    _, _, scores, psi, weights = np_pacs(lp, old, mask, rewards, 4, **options)
    expected = sum(keep[i] * weights[i] * (softplus(psi[i]) - rewards[i] * psi[i]) for i in range(len(rewards))) / len(rewards)
    np.testing.assert_allclose(loss, expected, **TOL)
    assert not np.asarray(grad)[[2, 9]].any() and np.abs(np.asarray(grad)[[0, 1, 3]]).max() > 1e-3


def test_mismatch_k3_kl_keeps_its_precision_in_float32_for_a_tiny_mismatch():
    """A sampler within 1e-4 nats of the trainer (float32 arrays): exp(d) - d - 1 would cancel to
    rounding noise, below 0; the k3 estimate must stay close to its limit mean(d^2 / 2)."""
    from pacs_jax.algorithms import rollout_correction_weights

    rng = np.random.default_rng(48)
    old = -rng.exponential(1.0, (8, 64))
    d = rng.normal(0.0, 1e-4, old.shape)
    mask = np.ones_like(old)
    _, metrics = rollout_correction_weights(jnp.asarray(old, jnp.float32), jnp.asarray(old - d, jnp.float32),
                                            jnp.asarray(mask, jnp.float32), mode="none", cap=2.0)
    d32 = np.asarray(jnp.asarray(old, jnp.float32) - jnp.asarray(old - d, jnp.float32), np.float64)  # the float32 gap
    np.testing.assert_allclose(float(metrics["rollout_corr/k3_kl"]), verl.rollout_corr_k3_kl(d32, 0 * d32, mask), rtol=0.02)
