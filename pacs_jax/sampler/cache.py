"""The KV cache of a rollout: prefill in chunks that skip padding, once per prompt then repeated per
group, and one decode step's forward pass (shared by the engines)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pacs_jax.models.llama import Decoder, KVCache, LayerKVCache, resolve_dtype
from pacs_jax.sampler.params import SamplingParams


def prefill(model: Decoder, layers, prompt_ids, cache_mask, chunk: int, rows_per_group: int = 8):
    """Runs the left-padded prompts [B, P] into a new cache: a LayerKVCache of P slots when
    `layers` holds the unstacked weights, else a KVCache of every slot of cache_mask [B, S >= P]
    (which slots hold real tokens). Returns (final hidden state of the last prompt token [B, D],
    cache).

    In chunks of `chunk` tokens, starting at the first chunk that holds a real token of any row:
    the chunks before it are padding in every row (GSM8K chat prompts for SmolLM2 average 115
    tokens in the 256 bucket). With per-layer caches (the unrolled decode: CPU), rows are also
    sorted by length and prefilled in groups of `rows_per_group`, each from its own first chunk
    (32 distinct GSM8K prompts: 9.1 -> 7.3 s). Not with the stacked cache: on TPU the rows are
    sharded over chips and regrouping them would move their caches between chips."""
    rows, prompt_len = prompt_ids.shape
    prompt_mask = cache_mask[:, :prompt_len]

    def empty_cache(rows):
        if layers is not None:
            return LayerKVCache.zeros(model.config, rows, prompt_len)
        return KVCache.zeros(model.config, rows, cache_mask.shape[1])

    def run(ids, mask, index, cache):
        if layers is not None:
            return model.decode_unrolled(ids, layers, cache, mask, index, return_hidden=True)
        return model(ids, attention_mask=cache_mask, cache=cache, cache_index=index, return_hidden=True, visible_slots=prompt_len)

    if chunk == 0 or prompt_len <= chunk or prompt_len % chunk:
        hidden, cache = run(prompt_ids, prompt_mask, 0, empty_cache(rows))
        return hidden[:, -1], cache

    def chunks_from_first_real(ids, mask):
        # Prompts are left-padded and never empty: a row's first real slot is the argmax of its mask.
        first_chunk = jnp.min(jnp.argmax(mask, axis=1)) // chunk

        def one_chunk(index, carry):
            _, cache = carry
            chunk_ids = jax.lax.dynamic_slice_in_dim(ids, index * chunk, chunk, axis=1)
            hidden, cache = run(chunk_ids, mask, index * chunk, cache)
            return hidden[:, -1], cache

        last_hidden = jnp.zeros((ids.shape[0], model.config.hidden_size), resolve_dtype(model.config.compute_dtype))
        return jax.lax.fori_loop(first_chunk, prompt_len // chunk, one_chunk, (last_hidden, empty_cache(ids.shape[0])))

    if layers is None or rows < 2 * rows_per_group or rows % rows_per_group:
        return chunks_from_first_real(prompt_ids, prompt_mask)
    order = jnp.argsort(jnp.argmax(prompt_mask, axis=1))  # longest prompts first
    hiddens, caches = [], []
    for start in range(0, rows, rows_per_group):
        picked = order[start:start + rows_per_group]
        hidden, group_cache = chunks_from_first_real(prompt_ids[picked], prompt_mask[picked])
        hiddens.append(hidden)
        caches.append(group_cache)
    restore = jnp.argsort(order)  # back to the caller's row order

    def rejoin(parts):
        return jnp.concatenate(parts)[restore]

    layer_ids = range(model.config.num_layers)
    keys = tuple(rejoin([c.k[i] for c in caches]) for i in layer_ids)
    values = tuple(rejoin([c.v[i] for c in caches]) for i in layer_ids)
    return rejoin(hiddens), LayerKVCache(keys, values)


def prefill_groups(model: Decoder, layers, prompt_ids, prompt_mask, params: SamplingParams, group_size: int):
    """Prefill once per prompt, then give each of the G responses its own copy of the cache.
    Returns (next-token logits [N, V], cache, cache_mask [N, P + T]) for N = B x G rows. The
    unrolled decode's cache (`layers` given) holds only the prompt here and grows segment by segment."""
    batch = prompt_ids.shape[0]
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, params.max_new_tokens), prompt_mask.dtype)], axis=1)
    hidden, cache = prefill(model, layers, prompt_ids, cache_mask, params.prefill_chunk)
    logits = model.logits(hidden[:, None])[:, 0]
    repeat = partial(jnp.repeat, repeats=group_size, axis=0)
    if layers is not None:
        cache = cache.repeat(group_size)
    else:
        cache = KVCache(jnp.repeat(cache.k, group_size, axis=1), jnp.repeat(cache.v, group_size, axis=1))
    return repeat(logits), cache, repeat(cache_mask)


def decode_token(model: Decoder, layers, token, cache, cache_mask, index, visible: int):
    """One decode step's forward pass for token [N] at cache slot `index`, reading the first
    `visible` slots: (next-token logits [N, V], the cache with the token's keys and values written)."""
    if layers is not None:
        hidden, cache = model.decode_unrolled(token[:, None], layers, cache, cache_mask[:, :visible], index, return_hidden=True)
    else:
        hidden, cache = model(token[:, None], attention_mask=cache_mask, cache=cache, cache_index=index,
                              return_hidden=True, visible_slots=visible)
    return model.logits(hidden)[:, 0], cache
