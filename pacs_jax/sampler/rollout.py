"""The engines' input and output: prompts left-padded to a length bucket, and the Rollout they return."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Rollout(NamedTuple):
    """Responses for N = prompts x G rows (each prompt's G responses contiguous)."""

    prompt_ids: jax.Array  # [N, P] left-padded
    prompt_mask: jax.Array  # [N, P]
    response_ids: jax.Array  # [N, T], pad after the stop token
    response_mask: jax.Array  # [N, T], 1 up to and including the stop token
    logprobs: jax.Array  # [N, T] sampler log-probs (0 on padding)
    lengths: jax.Array  # [N]
    decode_steps: jax.Array  # scalar: loop iterations actually run

    def by_prompt(self, group_size: int) -> "Rollout":
        """The same arrays with rows split per prompt: response_ids [B, G, T], lengths [B, G], ...
        (the trainer keeps the flat rows, which its batches and sharding use)."""
        return Rollout(*(x.reshape(-1, group_size, *x.shape[1:]) if x.ndim else x for x in self))


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(
            f"a prompt of {length} tokens is longer than the largest bucket {max(buckets)}: filter it "
            f"(data.overlong_prompts=filter) or raise data.max_prompt_tokens and rollout.prompt_buckets"
        )
    return fitting[0]


def pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to the smallest bucket that holds the longest one."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be sampled from (it has no last token)")
    width = pick_bucket(max(len(p) for p in prompts), buckets)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def finish_rollout(prompt_ids, prompt_mask, response, logprobs, steps, stop_ids, group_size: int) -> Rollout:
    """The Rollout of sampled rows (shared by the engines): response [N, T] with pad after a row
    stopped, steps = decode steps run; prompts [B, P] are repeated per group."""
    new = response.shape[1]
    is_stop = jnp.isin(response, stop_ids) & (jnp.arange(new)[None, :] < steps)
    # 1 up to and including the first stop token; rows that never stop keep every sampled token.
    stops_before = jnp.cumsum(is_stop, axis=1) - is_stop
    response_mask = ((stops_before == 0) & (jnp.arange(new)[None, :] < steps)).astype(jnp.int32)
    repeat = partial(jnp.repeat, repeats=group_size, axis=0)
    return Rollout(
        prompt_ids=repeat(prompt_ids),
        prompt_mask=repeat(prompt_mask),
        response_ids=response,
        response_mask=response_mask,
        logprobs=logprobs * response_mask,
        lengths=response_mask.sum(axis=1),
        decode_steps=steps,
    )
