"""PPO baseline pieces: outcome rewards on the last token, GAE, the dual-clip policy loss and
the clipped value loss (verl's core_algos definitions). Pure functions of arrays.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pacs_jax.algorithms.common import aggregate_loss, check_token_arrays, masked_mean, masked_whiten

# verl clamps the log-ratio before exp so one wild token cannot overflow the ratio.
LOG_RATIO_LIMIT = 20.0


def outcome_token_rewards(rewards: jax.Array, response_mask: jax.Array) -> jax.Array:
    """[N] outcome rewards -> [N, T], each placed on its response's last real token.
    An empty response (all-zero mask) gets no reward anywhere."""
    check_token_arrays(response_mask)
    if rewards.shape != response_mask.shape[:1]:
        raise ValueError(f"rewards must be [N]={response_mask.shape[:1]}, got shape {rewards.shape}")
    real = response_mask > 0
    length = real.shape[1]
    last_index = length - 1 - jnp.argmax(real[:, ::-1], axis=1)
    on_last = jax.nn.one_hot(last_index, length, dtype=rewards.dtype)
    return on_last * (rewards * jnp.any(real, axis=1))[:, None]


def gae(
    token_rewards: jax.Array,
    values: jax.Array,
    response_mask: jax.Array,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation, as verl: a backward scan over time in which masked
    positions carry the next value and advantage through unchanged, and the value after the
    last real token is 0. returns = advantages + values (before whitening); advantages are
    whitened over masked tokens when `whiten`. Both come back zeroed off the mask."""
    check_token_arrays(response_mask, token_rewards, values)
    mask = response_mask.astype(values.dtype)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, real = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        next_value = real * value + (1 - real) * next_value
        next_advantage = real * advantage + (1 - real) * next_advantage
        return (next_value, next_advantage), next_advantage

    zeros = jnp.zeros(values.shape[0], values.dtype)
    time_major = (token_rewards.T.astype(values.dtype), values.T, mask.T)
    _, advantages = jax.lax.scan(step, (zeros, zeros), time_major, reverse=True)
    advantages = advantages.T
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages * mask, returns * mask


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg_mode: str = "token-mean",
    clip_ratio_c: float = 3.0,
    *,
    num_tokens: Optional[jax.Array] = None,
    seq_norm_divisor: float = 0.0,
    token_weights: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """verl's dual-clip PPO surrogate, aggregated over masked tokens. Per token:
    clipped = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)), and where A < 0
    also min(clipped, -A * clip_ratio_c), so a ratio far above 1 on a bad token cannot make
    the loss unbounded (Ye et al. 2019). advantages: [N, T] (broadcast a per-response [N, 1]).
    `num_tokens`, `seq_norm_divisor`: see `aggregate_loss`. `token_weights` [N, T] (constants)
    multiply the per-token loss before aggregation: the rollout correction's weights, where verl
    applies its rollout_is_weights."""
    check_token_arrays(response_mask, logprobs, old_logprobs, *(() if token_weights is None else (token_weights,)))
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (the dual clip's bound on the ratio), got {clip_ratio_c}")
    advantages = jnp.broadcast_to(advantages, logprobs.shape)
    mask = response_mask.astype(logprobs.dtype)
    log_ratio = jnp.clip(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped_loss = jnp.maximum(unclipped, clipped)
    dual_bound = -advantages * clip_ratio_c
    loss_mat = jnp.where(advantages < 0, jnp.minimum(clipped_loss, dual_bound), clipped_loss)
    if token_weights is not None:
        loss_mat = loss_mat * token_weights
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, num_tokens, seq_norm_divisor)
    stats_log_ratio = jax.lax.stop_gradient(log_ratio)
    metrics = {
        "actor/pg_loss": loss,
        "actor/clip_fraction": masked_mean((clipped > unclipped).astype(mask.dtype), mask),
        # verl's pg_clipfrac_lower: tokens where the dual clip's bound was the loss.
        "actor/clip_fraction_lower": masked_mean(((clipped_loss > dual_bound) & (advantages < 0)).astype(mask.dtype), mask),
        # verl's ppo_kl: the k1 estimate of KL(old || current) on the sampled tokens.
        "actor/approx_kl": masked_mean(-stats_log_ratio, mask),
        "actor/ratio_mean": masked_mean(jnp.exp(stats_log_ratio), mask),
    }
    return loss, metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    response_mask: jax.Array,
    value_clip: float = 0.5,
    loss_agg_mode: str = "token-mean",
    *,
    num_tokens: Optional[jax.Array] = None,
    seq_norm_divisor: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """0.5 * aggregate(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)), verl's
    compute_value_loss: the critic may not profit from moving its prediction more than
    `value_clip` from the rollout's values. `num_tokens`, `seq_norm_divisor`: see `aggregate_loss`."""
    check_token_arrays(response_mask, values, old_values, returns)
    mask = response_mask.astype(values.dtype)
    clipped_values = jnp.clip(values, old_values - value_clip, old_values + value_clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(
        jnp.maximum(unclipped_error, clipped_error), mask, loss_agg_mode, num_tokens, seq_norm_divisor
    )
    metrics = {
        "critic/value_loss": loss,
        "critic/clip_fraction": masked_mean((clipped_error > unclipped_error).astype(mask.dtype), mask),
        "critic/value_mean": masked_mean(jax.lax.stop_gradient(values), mask),
        "critic/return_mean": masked_mean(returns, mask),
    }
    return loss, metrics
