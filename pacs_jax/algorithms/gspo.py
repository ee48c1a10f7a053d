"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): GRPO's advantages with a
sequence-level, length-normalised importance ratio, clipped per sequence. Follows verl's `gspo`
policy loss (core_algos.compute_policy_loss_gspo, the GSPO-token form). Pure functions of arrays.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pacs_jax.algorithms.common import aggregate_loss, check_groups, check_token_arrays, masked_mean
from pacs_jax.algorithms.grpo import grpo_advantages

# verl clamps the log of the sequence ratio at 10 (from above only) before exp.
LOG_SEQ_RATIO_MAX = 10.0
# GSPO's objective is a mean over responses of one clipped term each: verl aggregates it so.
GSPO_LOSS_AGG_MODE = "seq-mean-token-mean"


def gspo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    *,
    token_weights: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GSPO-token surrogate. Per response, log s_i = mean_t (logp - old_logp) over its real
    tokens; per token, s_i,t = sg(s_i) * pi(t) / sg(pi(t)) (value s_i, gradient s_i * grad log pi(t)),
    loss_t = max(-A * s_i,t, -A * clip(s_i,t, 1 - clip_low, 1 + clip_high)), times `token_weights`
    (constants, the rollout correction's) when given, then each response's token mean, mean over
    responses. With one advantage per response this is the paper's GSPO: its gradient is
    -(1/N) sum_i A_i s_i mean_t grad log pi(t) where unclipped, 0 where the sequence is clipped.
    No dual clip (verl's gspo loss has none). The defaults are the trainer's; the paper clips at
    (3e-4, 4e-4), since a length-normalised ratio stays close to 1 (configs/*_gspo.yaml).
    advantages: [N, T] (broadcast a per-response [N, 1])."""
    check_token_arrays(response_mask, logprobs, old_logprobs, *(() if token_weights is None else (token_weights,)))
    mask = response_mask.astype(logprobs.dtype)
    advantages = jnp.broadcast_to(advantages, logprobs.shape)
    log_ratio = logprobs - old_logprobs
    seq_log_ratio = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
    log_token_ratio = logprobs - jax.lax.stop_gradient(logprobs) + jax.lax.stop_gradient(seq_log_ratio)
    ratio = jnp.exp(jnp.minimum(log_token_ratio, LOG_SEQ_RATIO_MAX))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = jnp.maximum(unclipped, clipped)
    if token_weights is not None:
        loss_mat = loss_mat * token_weights
    loss = aggregate_loss(loss_mat, mask, GSPO_LOSS_AGG_MODE)
    seq_ratio = jnp.exp(jnp.minimum(jax.lax.stop_gradient(seq_log_ratio[:, 0]), LOG_SEQ_RATIO_MAX))
    metrics = {
        "actor/pg_loss": loss,
        # verl's pg_clipfrac: real tokens whose (sequence's) ratio was clipped.
        "actor/clip_fraction": masked_mean((clipped > unclipped).astype(mask.dtype), mask),
        "actor/approx_kl": masked_mean(-jax.lax.stop_gradient(log_ratio), mask),
        # The mean over responses of the sequence ratio s_i.
        "actor/ratio_mean": jnp.mean(seq_ratio),
    }
    return loss, metrics


def gspo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    response_mask: jax.Array,
    rewards: jax.Array,
    *,
    group_size: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    norm_adv_by_std: bool = True,
    token_weights: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO: `gspo_policy_loss` on GRPO's group-normalised advantages (one per response)."""
    check_groups(rewards, logprobs.shape[0], group_size, min_group_size=2)
    advantages = grpo_advantages(rewards.astype(logprobs.dtype), group_size, norm_adv_by_std)
    loss, metrics = gspo_policy_loss(
        logprobs, old_logprobs, advantages[:, None], response_mask, clip_low, clip_high, token_weights=token_weights
    )
    metrics["actor/advantage_abs_mean"] = jnp.mean(jnp.abs(advantages))
    return loss, metrics
