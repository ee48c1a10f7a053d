"""RLOO baseline: REINFORCE with a leave-one-out baseline inside each group. Pure JAX.

Relation to PACS (tested): on-policy (logprobs == old_logprobs) with reward_method "1",
adv_estimator "rloo" and weight_mode None, every s_i = 0 and sigmoid(psi_i) = 1/2, so

    d pacs_loss / d logprobs = beta * d rloo_loss(loss_agg_mode="seq-mean-token-sum") / d logprobs

exactly (the constant is 1): both are -(beta / N) * m_it * (r_i - mean_{j != i} r_j).
With sample weights w_i the same holds with rewards replaced by w_i * (r_i - 1/2); RLOO
ignores any constant shift of the rewards, so for w = 1 that is the plain relation.
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
    leave_one_out_baseline,
)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """[N] -> [N]: r_i - mean_{j != i} r_j over the other members of the response's group."""
    check_groups(rewards, rewards.shape[0], group_size, min_group_size=2)
    grouped = by_group(rewards, group_size)
    return (grouped - leave_one_out_baseline(grouped)).reshape(-1)


def rloo_loss(
    logprobs: jax.Array,
    response_mask: jax.Array,
    rewards: jax.Array,
    *,
    group_size: int,
    loss_agg_mode: str = "seq-mean-token-sum",
    num_tokens: Optional[jax.Array] = None,
    token_weights: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-aggregate(w * adv_i * logprobs * mask): the REINFORCE loss whose gradient is the RLOO
    policy gradient. The default aggregation makes it beta-proportional to on-policy PACS.
    `token_weights` w [N, T] (constants; default 1): the rollout correction's weights, verl's
    REINFORCE + IS loss -E[sg(w_t) log pi(a_t) A_t]."""
    check_option("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    check_token_arrays(response_mask, logprobs, *(() if token_weights is None else (token_weights,)))
    check_groups(rewards, logprobs.shape[0], group_size, min_group_size=2)
    advantages = rloo_advantages(rewards.astype(logprobs.dtype), group_size)
    mask = response_mask.astype(logprobs.dtype)
    loss_mat = -advantages[:, None] * logprobs
    if token_weights is not None:
        loss_mat = loss_mat * token_weights
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, num_tokens)
    metrics = {
        "actor/pg_loss": loss,
        "actor/advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
    }
    return loss, metrics
