"""Shared helpers for the losses: option checks, masked means, loss aggregation, group reshapes.

Everything here is a pure function of arrays; options are plain Python values checked at
trace time so a typo fails before anything compiles.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def check_option(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise ValueError naming the argument and its allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {list(allowed)}")


def check_token_arrays(response_mask: jax.Array, *arrays: jax.Array) -> None:
    """Every per-token array must be [N, T] and shaped like the response mask."""
    if response_mask.ndim != 2:
        raise ValueError(f"response_mask must be [N, T], got shape {response_mask.shape}")
    for array in arrays:
        if array.shape != response_mask.shape:
            raise ValueError(
                f"per-token arrays must match response_mask's shape {response_mask.shape}, "
                f"got {array.shape}"
            )


def check_groups(rewards: jax.Array, num_responses: int, group_size: int, min_group_size: int = 1) -> None:
    """Rewards are [N] with N a whole number of groups of `group_size` contiguous responses."""
    if not isinstance(group_size, int) or group_size < min_group_size:
        raise ValueError(f"group_size must be an integer >= {min_group_size}, got {group_size!r}")
    if rewards.shape != (num_responses,):
        raise ValueError(f"rewards must be [N]=({num_responses},), got shape {rewards.shape}")
    if num_responses % group_size:
        raise ValueError(
            f"the batch holds {num_responses} responses, not a multiple of group_size={group_size}; "
            f"batches must hold whole groups"
        )


def masked_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of `values` where mask is 1; an empty selection gives 0 instead of NaN."""
    total = jnp.sum(values * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return total / jnp.maximum(count, 1)


def masked_whiten(values: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over masked entries, var with Bessel's correction (as verl)."""
    mean = masked_mean(values, mask)
    count = jnp.sum(mask)
    variance = masked_mean((values - mean) ** 2, mask) * count / jnp.maximum(count - 1, 1)
    return (values - mean) * jax.lax.rsqrt(variance + eps)


def aggregate_loss(
    loss_mat: jax.Array,
    mask: jax.Array,
    mode: str,
    num_tokens: jax.Array | None = None,
    seq_norm_divisor: float = 0.0,
) -> jax.Array:
    """Reduce a per-token loss [N, T] to a scalar, counting only tokens where mask is 1.

    token-mean:              sum over all tokens / number of real tokens in the batch
    seq-mean-token-sum:      per-response token sum, mean over responses
    seq-mean-token-mean:     per-response token mean, mean over responses (an empty
                             response contributes 0 and still counts in the mean)
    seq-mean-token-sum-norm: per-response token sum / D, mean over responses. D is
                             `seq_norm_divisor`, or T (the padded length, a constant, as in
                             Dr. GRPO) when it is 0. verl's agg_loss sums over the micro-batch's
                             responses instead and its accumulation divides by the number of
                             micro-batches, so verl's loss is ours with D = T / (its micro-batch
                             size per GPU); the paper configs set D so (docs/algorithms.md).

    `num_tokens` replaces token-mean's divisor. The update passes the mini-batch's real-token
    count / the number of micro-batches, so the mean of the micro-batch losses is the
    mini-batch's token mean however unevenly the tokens fall (each micro-batch's own count
    would weight a token in a short micro-batch more). The sequence modes need nothing:
    every micro-batch holds the same number of responses.
    """
    check_option("loss_agg_mode", mode, LOSS_AGG_MODES)
    mask = mask.astype(loss_mat.dtype)
    token_sums = jnp.sum(loss_mat * mask, axis=-1)
    if mode == "token-mean":
        if num_tokens is None:
            num_tokens = jnp.maximum(jnp.sum(mask), 1)
        return jnp.sum(token_sums) / num_tokens
    if mode == "seq-mean-token-sum":
        return jnp.mean(token_sums)
    if mode == "seq-mean-token-mean":
        return jnp.mean(token_sums / jnp.maximum(jnp.sum(mask, axis=-1), 1))
    return jnp.mean(token_sums) / (seq_norm_divisor or loss_mat.shape[-1])


def by_group(values: jax.Array, group_size: int) -> jax.Array:
    """[N, ...] -> [N / group_size, group_size, ...]; each group's responses are contiguous."""
    return values.reshape((-1, group_size) + values.shape[1:])


def leave_one_out_baseline(grouped: jax.Array) -> jax.Array:
    """For [prompts, G] values, the mean of the other G - 1 members of each entry's group."""
    group_size = grouped.shape[1]
    return (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)


def safe_group_std(grouped: jax.Array) -> jax.Array:
    """Per-group std with Bessel's correction (like torch.std), shape [prompts, 1].

    A group of equal values has std 0, where sqrt has an infinite derivative; the double
    `where` keeps that gradient at 0 instead of NaN (the true derivative of
    (x - mean) / (std + eps) there, since the std term is multiplied by x - mean = 0).
    """
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    variance = jnp.sum(centred**2, axis=1, keepdims=True) / (grouped.shape[1] - 1)
    positive = variance > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
