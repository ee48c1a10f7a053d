"""The PACS loss (see PACS.md): the policy's own log-probabilities score each response, and
binary cross-entropy trains that score to predict the verifier's 0/1 label.

Pure JAX; every option is a static Python value, checked before any compute.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pacs_jax.algorithms.common import (
    by_group,
    check_groups,
    check_option,
    check_token_arrays,
    leave_one_out_baseline,
    safe_group_std,
)

REWARD_METHODS = ("1", "2")
ADV_ESTIMATORS = ("rloo", "grpo", "naive")
WEIGHT_MODES = (None, "question", "only_positive", "only_negative")
GROUP_STD_EPS = 1e-6
CRITIC_TIE = 1e-6  # |psi| at or below this is a tie for the critic-accuracy metric


def response_scores(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    response_mask: jax.Array,
    beta: float,
    reward_method: str,
    token_weights: Optional[jax.Array] = None,
) -> jax.Array:
    """s_i, shape [N]. "1": beta * sum_t w m (logp - old_logp). "2": beta * sum_t w m logp / sum_t m.
    w: `token_weights` (the rollout correction's; default 1)."""
    check_option("reward_method", reward_method, REWARD_METHODS)
    mask = response_mask.astype(logprobs.dtype)
    weighted = mask if token_weights is None else mask * token_weights
    if reward_method == "1":
        return beta * jnp.sum((logprobs - old_logprobs) * weighted, axis=-1)
    # An empty response (all-zero mask) scores 0 rather than 0 / 0.
    return beta * jnp.sum(logprobs * weighted, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def group_relative_scores(
    scores: jax.Array, group_size: int, adv_estimator: str, norm_adv_by_std: bool
) -> jax.Array:
    """psi_i, shape [N]: each score relative to the other responses of its group."""
    check_option("adv_estimator", adv_estimator, ADV_ESTIMATORS)
    if adv_estimator == "naive":
        return scores
    grouped = by_group(scores, group_size)
    if adv_estimator == "rloo":
        return (grouped - leave_one_out_baseline(grouped)).reshape(-1)
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if norm_adv_by_std:
        centred = centred / (safe_group_std(grouped) + GROUP_STD_EPS)
    return centred.reshape(-1)


def sample_weights(rewards: jax.Array, group_size: int, weight_mode: Optional[str]) -> jax.Array:
    """w_i, shape [N]. "question": scikit-learn's "balanced" class weight inside each group
    that has both labels, G / (2 * size of the response's class); single-label groups keep 1."""
    check_option("weight_mode", weight_mode, WEIGHT_MODES)
    correct = (rewards > 0.5).astype(rewards.dtype)
    if weight_mode is None:
        return jnp.ones_like(rewards)
    if weight_mode == "only_positive":
        return correct
    if weight_mode == "only_negative":
        return 1.0 - correct
    grouped = by_group(correct, group_size)
    num_correct = jnp.sum(grouped, axis=1, keepdims=True)
    num_wrong = group_size - num_correct
    class_size = jnp.where(grouped > 0, num_correct, num_wrong)
    mixed = (num_correct > 0) & (num_wrong > 0)
    balanced = group_size / (2.0 * jnp.maximum(class_size, 1.0))
    return jnp.where(mixed, balanced, 1.0).reshape(-1)


def pacs_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    response_mask: jax.Array,
    rewards: jax.Array,
    *,
    group_size: int,
    beta: float = 1.0,
    reward_method: str = "1",
    adv_estimator: str = "rloo",
    norm_adv_by_std: bool = True,
    weight_mode: Optional[str] = "question",
    token_weights: Optional[jax.Array] = None,
    response_keep: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = mean_i w_i * BCEWithLogits(psi_i, r_i) over all N responses (not divided by sum w).

    logprobs, old_logprobs, response_mask: [N, T], N = prompts * group_size with each group's
    responses contiguous. rewards: [N] labels in {0, 1}. Returns (loss, metrics). The defaults
    are the trainer's (AlgorithmConfig's).

    `token_weights` [N, T] (constants): the rollout correction's per-token weights. They enter
    the score's sum, s_i = beta * sum_t w_t m_t (logp_t - old_t): a token's log-prob reaches the
    loss only through its response's score, so every gradient path of token t is scaled by w_t
    (on-policy the gradient is then exactly beta x RLOO's with the same weights, verl's
    REINFORCE + IS), and the score is still 0 on-policy whatever the weights.
    `response_keep` [N] (1 = in the loss): a response with 0 (DAPO's overlong filter) drops its
    BCE term and its tokens get no gradient; its score (stop-gradient) stays in its group's
    baselines, as a filtered response's reward stays in GRPO's group statistics.

    The grpo estimator on-policy (all scores 0) has derivative (centring) / 1e-6, as the
    formula says; it is finite but large, and grad-norm clipping is what tames it.
    """
    check_option("reward_method", reward_method, REWARD_METHODS)
    check_option("adv_estimator", adv_estimator, ADV_ESTIMATORS)
    check_option("weight_mode", weight_mode, WEIGHT_MODES)
    check_token_arrays(response_mask, logprobs, old_logprobs, *(() if token_weights is None else (token_weights,)))
    min_group = 2 if adv_estimator in ("rloo", "grpo") else 1
    check_groups(rewards, logprobs.shape[0], group_size, min_group)

    rewards = rewards.astype(logprobs.dtype)
    scores = response_scores(logprobs, old_logprobs, response_mask, beta, reward_method, token_weights)
    weights = sample_weights(rewards, group_size, weight_mode)
    if response_keep is not None:
        if response_keep.shape != rewards.shape:
            raise ValueError(f"response_keep must be [N]={rewards.shape}, got shape {response_keep.shape}")
        keep = response_keep.astype(logprobs.dtype)
        scores = jnp.where(keep > 0, scores, jax.lax.stop_gradient(scores))
        weights = weights * keep
    psi = group_relative_scores(scores, group_size, adv_estimator, norm_adv_by_std)
    bce = jax.nn.softplus(psi) - rewards * psi
    loss = jnp.mean(weights * bce)

    psi_stats = jax.lax.stop_gradient(psi)
    labels = by_group(rewards > 0.5, group_size)
    metrics = {
        "pacs/psi_mean": jnp.mean(psi_stats),
        "pacs/psi_std": jnp.std(psi_stats),
        "pacs/psi_min": jnp.min(psi_stats),
        "pacs/psi_max": jnp.max(psi_stats),
        "pacs/score_mean": jnp.mean(jax.lax.stop_gradient(scores)),
        # A psi within float noise of 0 (on-policy, psi is 0 in exact arithmetic) predicts nothing:
        # it counts as half right, so the metric does not flip with rounding.
        "pacs/critic_accuracy": jnp.mean(jnp.where(
            jnp.abs(psi_stats) <= CRITIC_TIE, 0.5, ((psi_stats > 0) == (rewards > 0.5)).astype(psi.dtype)
        )),
        "pacs/critic_log_loss": jnp.mean(jax.lax.stop_gradient(bce)),
        "pacs/weight_mean": jnp.mean(weights),
        "pacs/mixed_group_fraction": jnp.mean(
            (jnp.any(labels, axis=1) & ~jnp.all(labels, axis=1)).astype(psi.dtype)
        ),
    }
    return loss, metrics
