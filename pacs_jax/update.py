"""The training forward pass and the jitted update step.

`response_logprobs` is THE log-prob function: old log-probs, the loss and evaluation all call it,
so the numbers the loss sees never come from the sampler's cached numerics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pacs_jax.models.llama import Decoder


def response_logprobs(
    model: Decoder,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    response_ids: jax.Array,
    response_mask: jax.Array,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """Per-token log pi(o_t | q, o_<t) of the response tokens, [N, T] float32 (0 on padding).

    Logits are divided by the sampling temperature, as the sampler did, so on-policy the two agree.
    With `with_entropy`, also the per-token entropy of that distribution.
    """
    prompt_len = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden = model(ids, attention_mask=mask, return_hidden=True)
    # Position t predicts token t + 1: the response's logits start at the last prompt position.
    logits = model.logits(hidden[:, prompt_len - 1 : -1])
    if temperature > 0:
        logits = logits / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_logprobs = jnp.take_along_axis(log_probs, response_ids[..., None], axis=-1)[..., 0]
    token_logprobs = token_logprobs * response_mask
    if not with_entropy:
        return token_logprobs
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1) * response_mask
    return token_logprobs, entropy
