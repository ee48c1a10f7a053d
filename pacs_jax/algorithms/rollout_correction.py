"""Sampler/trainer mismatch correction (verl's rollout correction, decoupled mode): importance
weights pi_old / pi_sampler between the training forward pass at the rollout's weights (the old
log-probs) and the sampler that drew the tokens (its own log-probs, another program and on TPU
another dtype). Pure functions of arrays.

TIS (truncated IS): w = min(rho, C). MIS (masked IS): w = rho where 1/C <= rho <= C, else 0 (the
token or sequence leaves the loss; verl's `mask` mode, whose lower bound defaults to 1/C).
`level="token"`: rho_t per token; `"sequence"`: rho = prod_t rho_t, one weight per response.
The weights are constants (stop-gradient): they change the measure, not the objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pacs_jax.algorithms.common import check_option, check_token_arrays, masked_mean

MODES = ("none", "tis", "mis")
LEVELS = ("token", "sequence")
# verl's SAFETY_BOUND: log-ratios are clamped to +-20 before exp, so one wild token cannot overflow.
LOG_RATIO_BOUND = 20.0


def rollout_correction_weights(
    old_logprobs: jax.Array,
    sampler_logprobs: jax.Array,
    response_mask: jax.Array,
    *,
    mode: str,
    cap: float,
    level: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token weights [N, T] (0 off the mask; all 1 on it for mode "none") and metrics:

    rollout_corr/k3_kl:      token mean of exp(d) - d - 1, d = old - sampler: the k3 estimate of
                             KL(sampler || trainer) (verl's rollout_corr/k3_kl)
    rollout_corr/ratio_max:  the largest rho (at `level`, before the cap; clamped at e^20)
    rollout_corr/weight_mean, rollout_corr/weight_max: the weights applied, over real tokens
    rollout_corr/capped_fraction (tis) or rollout_corr/masked_fraction (mis): real tokens whose
                             weight the cap changed
    Means are over real tokens (per-token metrics; a response weighs by its length)."""
    check_option("rollout_correction", mode, MODES)
    check_option("rollout_correction_level", level, LEVELS)
    check_token_arrays(response_mask, old_logprobs, sampler_logprobs)
    if not cap > 1.0:
        raise ValueError(f"rollout_correction_cap must be > 1 (weights above it are capped or masked), got {cap}")
    mask = response_mask.astype(old_logprobs.dtype)
    log_ratio = jax.lax.stop_gradient(old_logprobs - sampler_logprobs) * mask
    # expm1: exp(d) - 1 - d for the small d of a mismatch would cancel to rounding noise (even below 0).
    metrics = {"rollout_corr/k3_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)}
    if mode == "none":
        return mask, metrics
    if level == "sequence":
        log_ratio = jnp.broadcast_to(jnp.sum(log_ratio, axis=-1, keepdims=True), log_ratio.shape)
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if mode == "tis":
        outside = ratio > cap
        weights = jnp.minimum(ratio, cap)
    else:
        outside = (ratio > cap) | (ratio < 1.0 / cap)
        weights = jnp.where(outside, 0.0, ratio)
    weights = weights * mask
    metrics.update({
        "rollout_corr/ratio_max": jnp.max(jnp.where(mask > 0, ratio, 0.0)),
        "rollout_corr/weight_mean": masked_mean(weights, mask),
        "rollout_corr/weight_max": jnp.max(weights),
        f"rollout_corr/{'capped' if mode == 'tis' else 'masked'}_fraction": masked_mean(outside.astype(mask.dtype), mask),
    })
    return weights, metrics
