"""GRPO baseline: group-normalised outcome advantages with PPO's clipped surrogate, and an
optional k3 KL penalty to a reference policy. Pure functions of arrays.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pacs_jax.algorithms.common import (
    LOSS_AGG_MODES,
    aggregate_loss,
    by_group,
    check_groups,
    check_option,
    check_token_arrays,
    masked_mean,
    safe_group_std,
)
from pacs_jax.algorithms.ppo import ppo_policy_loss

# verl's clamps for the k3 estimator: bound the log-ratio and the per-token KL.
KL_LOG_RATIO_LIMIT = 20.0
KL_TOKEN_LIMIT = 10.0


def grpo_advantages(
    rewards: jax.Array, group_size: int, norm_adv_by_std: bool = True, eps: float = 1e-6
) -> jax.Array:
    """[N] rewards -> [N] advantages: (r - group mean) / (group std + eps), std with Bessel's
    correction; `norm_adv_by_std=False` keeps only the centring (Dr. GRPO)."""
    check_groups(rewards, rewards.shape[0], group_size, min_group_size=2)
    grouped = by_group(rewards, group_size)
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if norm_adv_by_std:
        centred = centred / (safe_group_std(grouped) + eps)
    return centred.reshape(-1)


def k3_kl(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(current || reference): exp(d) - d - 1 with d = ref - logp."""
    log_ratio = jnp.clip(ref_logprobs - logprobs, -KL_LOG_RATIO_LIMIT, KL_LOG_RATIO_LIMIT)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -KL_TOKEN_LIMIT, KL_TOKEN_LIMIT)


def grpo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    response_mask: jax.Array,
    rewards: jax.Array,
    *,
    group_size: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    norm_adv_by_std: bool = True,
    loss_agg_mode: str = "token-mean",
    ref_logprobs: Optional[jax.Array] = None,
    kl_coef: float = 0.0,
    clip_ratio_c: float = 3.0,
    num_tokens: Optional[jax.Array] = None,
    seq_norm_divisor: float = 0.0,
    token_weights: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """verl's dual-clip PPO surrogate on GRPO advantages (one per response, shared by its
    tokens), plus kl_coef * aggregate(k3 KL to `ref_logprobs`) when a reference is given.
    `num_tokens`, `seq_norm_divisor`: see `aggregate_loss`. `token_weights`: the rollout
    correction's weights on the policy loss (not the KL term), see `ppo_policy_loss`.

    Dr. GRPO (Liu et al. 2025) is this loss with norm_adv_by_std=False and
    loss_agg_mode="seq-mean-token-sum-norm" (a constant length normaliser)."""
    check_option("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    check_token_arrays(response_mask, logprobs, old_logprobs)
    if ref_logprobs is not None:
        check_token_arrays(response_mask, ref_logprobs)
    elif kl_coef != 0.0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (the reference policy's per-token log-probs)")
    check_groups(rewards, logprobs.shape[0], group_size, min_group_size=2)

    advantages = grpo_advantages(rewards.astype(logprobs.dtype), group_size, norm_adv_by_std)
    pg_loss, metrics = ppo_policy_loss(
        logprobs, old_logprobs, advantages[:, None], response_mask, clip_low, clip_high, loss_agg_mode,
        clip_ratio_c, num_tokens=num_tokens, seq_norm_divisor=seq_norm_divisor, token_weights=token_weights,
    )
    loss = pg_loss
    metrics["actor/advantage_abs_mean"] = jnp.mean(jnp.abs(advantages))
    if ref_logprobs is not None:
        mask = response_mask.astype(logprobs.dtype)
        kl = k3_kl(logprobs, ref_logprobs)
        kl_loss = aggregate_loss(kl, mask, loss_agg_mode, num_tokens, seq_norm_divisor)
        loss = loss + kl_coef * kl_loss
        metrics["actor/kl_loss"] = kl_loss
        metrics["actor/ref_kl"] = masked_mean(jax.lax.stop_gradient(kl), mask)
    return loss, metrics
