"""The static engine (`rollout.engine: static`): every row in one jitted program until the last one stops.

Prefill runs once per prompt (sampler/cache.py); decode is a `lax.while_loop` per decode segment
that stops as soon as every row has emitted a stop token (layers scanned, or unrolled on CPU:
`decode_layers`). Shapes are static (prompts are padded to length buckets), so a new batch of the
same bucket never recompiles.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pacs_jax import xla_options
from pacs_jax.models.llama import Decoder, KVCache, LayerKVCache, layer_index, stacked_layer_count
from pacs_jax.sampler.cache import decode_token, prefill_groups
from pacs_jax.sampler.params import SamplingParams
from pacs_jax.sampler.rollout import Rollout, finish_rollout
from pacs_jax.sampler.tokens import force_stop, sample_token


class DecodeState(NamedTuple):
    step: jax.Array  # decode steps taken
    logits: jax.Array  # [N, V] for the next token
    cache: KVCache | LayerKVCache
    done: jax.Array  # [N] bool: the row has emitted a stop token
    response: jax.Array  # [N, T]
    logprobs: jax.Array  # [N, T]


@xla_options.jit(kind="forward", static_argnames=("graphdef", "params", "group_size"))
def _generate(graphdef, state, prompt_ids, prompt_mask, key, *, params: SamplingParams, group_size: int, stop_at=None,
              layer_index=None) -> Rollout:
    model: Decoder = nnx.merge(graphdef, state)
    unrolled = params.unrolls_layers(jax.default_backend())
    batch, prompt_len = prompt_ids.shape
    new = params.max_new_tokens
    layers = model.unstacked_layers(layer_index) if unrolled else None
    logits, cache, cache_mask = prefill_groups(model, layers, prompt_ids, prompt_mask, params, group_size)
    rows = batch * group_size
    stop_ids = jnp.asarray(params.stop_ids or (-1,), jnp.int32)

    def cond(loop: DecodeState, end):
        return (loop.step < end) & ~jnp.all(loop.done)

    def body(loop: DecodeState, visible) -> DecodeState:
        step, done = loop.step, loop.done
        token, logprob = sample_token(loop.logits, jax.random.fold_in(key, step), params)
        token = force_stop(token, step, stop_at, stop_ids, params.pad_id)
        token = jnp.where(done, params.pad_id, token).astype(jnp.int32)
        response = loop.response.at[:, step].set(token)
        logprobs = loop.logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = decode_token(model, layers, token, loop.cache, cache_mask, prompt_len + step, visible)
        return DecodeState(step + 1, logits, cache, done, response, logprobs)

    decode = DecodeState(
        step=jnp.int32(0),
        logits=logits,
        cache=cache,
        done=jnp.zeros((rows,), bool),
        response=jnp.full((rows, new), params.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, new), jnp.float32),
    )
    # One while loop per segment, each attending to the slots written by its end (a step at
    # slot prompt_len + s reads the slots before it); when every row is done, the rest exit at once.
    # The scan reads the first `visible` slots of its full cache; the unrolled decode's per-layer
    # caches grow to `visible` slots instead (a slice of them would be a copy per step).
    for end in params.segment_ends():
        visible = prompt_len + end
        if unrolled:
            decode = decode._replace(cache=decode.cache.grow(visible))
        decode = jax.lax.while_loop(partial(cond, end=end), partial(body, visible=visible), decode)
    return finish_rollout(prompt_ids, prompt_mask, decode.response, decode.logprobs, decode.step, stop_ids, group_size)


def generate_static(graphdef, state, prompt_ids, prompt_mask, key, params: SamplingParams, group_size: int,
                    stop_at=None) -> Rollout:
    """`sampler.generate` with the static engine (called through it: same arguments, same Rollout)."""
    # Where the layers are unrolled, their weights are sliced at traced indices (fewer kernels to compile).
    index = layer_index(stacked_layer_count(state)) if params.unrolls_layers(jax.default_backend()) else None
    return _generate(graphdef, state, prompt_ids, prompt_mask, key, params=params, group_size=group_size, stop_at=stop_at,
                     layer_index=index)
