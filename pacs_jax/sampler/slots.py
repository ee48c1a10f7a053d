"""The slot engine (`rollout.engine: slots`, `rollout.slots: S`): a KV cache of S response slots,
refilled as responses stop, so memory is S x (prompt + max_new_tokens) cache columns whatever
the number of rows.

Each of the N = B x G rows (a (prompt, sample) pair) waits in a queue, in row order. A slot holds
one row's cache: the prompt region (P columns, left-padded as the bucket), a ring of T =
max_new_tokens columns for its generated tokens, and one scratch column. When a row stops, its
slot takes the next waiting row in the same decode step: its prompt's cache is copied from the
prompt bank (every prompt prefilled once, in chunks, at the start: one prefill per prompt, as
the other engines) with the prompt's last-token logits, and its ring is cleared.

Why a ring and a scratch column (../shared/notes/continuous_batching.md, MaxText's layout): the
slots' rows started at different steps, so their next tokens sit at different positions; writing
each at its own column would be a per-row scatter into the cache every step. Instead every slot
writes its new token at the one scratch column (the last: the model's `cache_index`, one
`dynamic_update_slice`), whose keys and values are then copied to the ring column step % T, the
same column for every slot (one more `dynamic_update_slice`). A slot's tokens therefore sit in
the ring in rotated order: attention does not care (keys are rotated by RoPE before they are
stored; the mask says which ring columns hold the row's tokens), and the token's RoPE position,
the count of real columns before the scratch one, is the prompt's real length plus the tokens
generated, as in the static loop. A row never overwrites its own tokens: it has at most T.

Each row samples with the uniform drawn from (key, its decode step, its row id)
(tokens.row_uniforms), so it draws the static loop's tokens whatever slot and order it runs in
(up to float rounding: attention sums its keys in another order).

The engine is a few jitted pure functions and a short host loop:
    _start   prefill the prompt bank; fill the slots with the first S rows   -> SlotState
    _decode  a while_loop of decode steps, each refilling the slots whose row stopped with the
             next waiting rows (a copy from the bank), until every row is done or step `end`
    _finish  the Rollout, exactly as the static loop builds it
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pacs_jax import xla_options
from pacs_jax.models.llama import Decoder, KVCache, LayerKVCache, layer_index, stacked_layer_count
from pacs_jax.sampler.cache import decode_token, prefill
from pacs_jax.sampler.compact import row_shards
from pacs_jax.sampler.params import SamplingParams
from pacs_jax.sampler.rollout import Rollout, finish_rollout
from pacs_jax.sampler.tokens import force_stop, sample_token
from pacs_jax.sharding import BATCH_AXES

# The host returns to Python every this many decode steps (one sync: is any row left?).
HOST_EVERY = 64


class PromptBank(NamedTuple):
    """Every prompt prefilled once (read-only during decode)."""

    cache: KVCache | LayerKVCache  # B prompts x P columns
    logits: jax.Array  # [B, V] the next-token logits after each prompt
    mask: jax.Array  # [B, P] the prompts' left-padding masks


class SlotState(NamedTuple):
    step: jax.Array  # scalar: decode steps run (the ring column is step % T)
    next_row: jax.Array  # scalar: the first row no slot has taken yet
    logits: jax.Array  # [S, V] each slot's next-token logits
    cache: KVCache | LayerKVCache  # S slots x (P + T + 1) columns: prompt, ring, scratch
    prompt_mask: jax.Array  # [S, P] the slot's prompt (left padding)
    ring: jax.Array  # [S, T] bool: ring columns that hold the slot's row's tokens
    owner: jax.Array  # [S] the slot's row (N: none)
    length: jax.Array  # [S] tokens the slot's row has generated
    active: jax.Array  # [S] bool: the slot's row is still generating
    response: jax.Array  # [N, T] every row's tokens, written as they are sampled
    logprobs: jax.Array  # [N, T]


def _split_slots(loop: "SlotState") -> "SlotState":
    """The slot arrays with their slots split over the mesh's data x fsdp devices (as a batch's
    rows; no-op without a mesh): each device decodes, refills and holds the cache of its own slots."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or row_shards() == 1:
        return loop
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.shape)

    def split(x, axis):
        return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*([None] * axis), axes))

    cache = loop.cache
    if isinstance(cache, LayerKVCache):
        cache = LayerKVCache(tuple(split(k, 0) for k in cache.k), tuple(split(v, 0) for v in cache.v))
    else:
        cache = KVCache(split(cache.k, 1), split(cache.v, 1))
    return loop._replace(logits=split(loop.logits, 0), cache=cache, prompt_mask=split(loop.prompt_mask, 0),
                         ring=split(loop.ring, 0), owner=split(loop.owner, 0), length=split(loop.length, 0),
                         active=split(loop.active, 0))


def _stop_ids(params: SamplingParams) -> jax.Array:
    return jnp.asarray(params.stop_ids or (-1,), jnp.int32)


def _copy_prompt(cache, bank_cache, slot, prompt):
    """The slot's prompt region (its first P columns) := the bank's prompt `prompt`: one
    dynamic_update_slice per array, in place."""
    if isinstance(cache, LayerKVCache):  # per layer: k [S, KV, D, C], v [S, KV, C, D]
        k = tuple(jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice_in_dim(b, prompt, 1, 0), (slot, 0, 0, 0))
                  for c, b in zip(cache.k, bank_cache.k))
        v = tuple(jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice_in_dim(b, prompt, 1, 0), (slot, 0, 0, 0))
                  for c, b in zip(cache.v, bank_cache.v))
        return LayerKVCache(k, v)
    # stacked: k [L, S, KV, D, C], v [L, S, KV, C, D]
    return KVCache(
        jax.lax.dynamic_update_slice(cache.k, jax.lax.dynamic_slice_in_dim(bank_cache.k, prompt, 1, 1), (0, slot, 0, 0, 0)),
        jax.lax.dynamic_update_slice(cache.v, jax.lax.dynamic_slice_in_dim(bank_cache.v, prompt, 1, 1), (0, slot, 0, 0, 0)),
    )


def _scratch_to_ring(cache, column):
    """Every slot's keys and values at the scratch column (the last) copied to cache column `column`."""
    def move(x, axis):
        scratch = jax.lax.dynamic_slice_in_dim(x, x.shape[axis] - 1, 1, axis)
        return jax.lax.dynamic_update_slice_in_dim(x, scratch, column, axis)

    if isinstance(cache, LayerKVCache):
        return LayerKVCache(tuple(move(k, 3) for k in cache.k), tuple(move(v, 2) for v in cache.v))
    return KVCache(move(cache.k, 4), move(cache.v, 3))


def _refill(loop: SlotState, bank: PromptBank, group_size: int) -> SlotState:
    """Every slot without an active row takes the next waiting row (in row order), if any: its
    prompt's cache and logits from the bank, an empty ring."""
    rows = loop.response.shape[0]
    free = ~loop.active
    new_row = loop.next_row + jnp.cumsum(free) - 1
    take = free & (new_row < rows)
    prompt = jnp.where(take, new_row, 0) // group_size
    taken = jnp.sum(take)
    slots = jnp.nonzero(take, size=take.shape[0], fill_value=0)[0]
    cache = jax.lax.fori_loop(0, taken, lambda i, cache: _copy_prompt(cache, bank.cache, slots[i], prompt[slots[i]]), loop.cache)
    return loop._replace(
        next_row=loop.next_row + taken,
        logits=jnp.where(take[:, None], bank.logits[prompt], loop.logits),
        cache=cache,
        prompt_mask=jnp.where(take[:, None], bank.mask[prompt], loop.prompt_mask),
        ring=loop.ring & ~take[:, None],
        owner=jnp.where(take, new_row, jnp.where(loop.active, loop.owner, rows)),
        length=jnp.where(take, 0, loop.length),
        active=loop.active | take,
    )


@xla_options.jit(kind="forward", static_argnames=("graphdef", "params", "group_size", "slots", "unrolled"))
def _start(graphdef, state, prompt_ids, prompt_mask, *, params: SamplingParams, group_size: int, slots: int, unrolled: bool,
           layer_index=None):
    model: Decoder = nnx.merge(graphdef, state)
    layers = model.unstacked_layers(layer_index) if unrolled else None
    prompts, prompt_len = prompt_ids.shape
    hidden, bank_cache = prefill(model, layers, prompt_ids, prompt_mask, params.prefill_chunk)
    bank = PromptBank(bank_cache, model.logits(hidden[:, None])[:, 0], prompt_mask)
    rows, new = prompts * group_size, params.max_new_tokens
    columns = prompt_len + new + 1
    empty = LayerKVCache.zeros if unrolled else KVCache.zeros
    loop = SlotState(
        step=jnp.int32(0),
        next_row=jnp.int32(0),
        logits=jnp.zeros((slots, bank.logits.shape[1]), jnp.float32),
        cache=empty(model.config, slots, columns),
        prompt_mask=jnp.zeros((slots, prompt_len), prompt_mask.dtype),
        ring=jnp.zeros((slots, new), bool),
        owner=jnp.full((slots,), rows, jnp.int32),
        length=jnp.zeros((slots,), jnp.int32),
        active=jnp.zeros((slots,), bool),
        response=jnp.full((rows, new), params.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, new), jnp.float32),
    )
    return layers, bank, _split_slots(_refill(_split_slots(loop), bank, group_size))


@xla_options.jit(kind="forward", static_argnames=("graphdef", "params", "group_size"), donate_argnames=("loop",))
def _decode(graphdef, state, layers, bank: PromptBank, loop: SlotState, key, end, stop_at, *, params: SamplingParams,
            group_size: int):
    """Decode steps until step `end` or until every row is done. Returns (state, whether rows remain)."""
    model: Decoder = nnx.merge(graphdef, state)
    rows, new = loop.response.shape
    prompt_len = loop.prompt_mask.shape[1]
    scratch = prompt_len + new  # the last cache column
    stop_ids = _stop_ids(params)
    draw_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))

    def remaining(loop: SlotState):
        return jnp.any(loop.active) | (loop.next_row < rows)

    def cond(loop: SlotState):
        return (loop.step < end) & remaining(loop)

    def body(loop: SlotState) -> SlotState:
        active, length = loop.active, loop.length
        # Each row's draw at its own step, from its row id (tokens.row_uniforms): the static loop's.
        token, logprob = sample_token(loop.logits, draw_keys(key, length), params, loop.owner)
        forced = None if stop_at is None else jnp.take(stop_at, loop.owner, mode="clip")
        token = force_stop(token, length, forced, stop_ids, params.pad_id)
        token = jnp.where(active, token, params.pad_id).astype(jnp.int32)
        at = jnp.where(active, loop.owner, rows)  # idle slots write nowhere
        response = loop.response.at[at, length].set(token, mode="drop")
        logprobs = loop.logprobs.at[at, length].set(logprob, mode="drop")
        stopped = jnp.isin(token, stop_ids) | (length + 1 >= new)
        # The token's keys and values go to the scratch column, then to the ring column.
        column = loop.step % new
        cache_mask = jnp.concatenate([loop.prompt_mask.astype(bool), loop.ring, jnp.ones((active.shape[0], 1), bool)], axis=1)
        logits, cache = decode_token(model, layers, token, loop.cache, cache_mask, jnp.int32(scratch), scratch + 1)
        cache = _scratch_to_ring(cache, prompt_len + column)
        ring = jax.lax.dynamic_update_slice(loop.ring, active[:, None], (0, column))
        loop = loop._replace(step=loop.step + 1, logits=logits, cache=cache, ring=ring, length=length + active,
                             active=active & ~stopped, response=response, logprobs=logprobs)
        # (Unconditional: with no free slot or no waiting row it copies nothing. Under a lax.cond
        # XLA kept a copy of the slot cache.)
        return _refill(loop, bank, group_size)

    loop = jax.lax.while_loop(cond, body, loop)
    return loop, remaining(loop)


@xla_options.jit(kind="forward", static_argnames=("params", "group_size"))
def _finish(loop: SlotState, prompt_ids, prompt_mask, *, params: SamplingParams, group_size: int) -> Rollout:
    out = finish_rollout(prompt_ids, prompt_mask, loop.response, loop.logprobs, params.max_new_tokens, _stop_ids(params),
                         group_size)
    return out._replace(decode_steps=loop.step)


def generate_slots(graphdef, state, prompt_ids, prompt_mask, key, params: SamplingParams, group_size: int,
                   stop_at=None) -> Rollout:
    """`sampler.generate` with the slot engine (called through it: same arguments, same Rollout;
    `decode_steps` counts the engine's decode steps, each over every slot)."""
    ways = row_shards()  # the slots split over mesh data x fsdp, as a batch's rows
    if params.slots % ways:
        raise ValueError(f"rollout.slots={params.slots} must be a multiple of mesh.data x mesh.fsdp = {ways}")
    unrolled = params.unrolls_layers(jax.default_backend())
    index = layer_index(stacked_layer_count(state)) if unrolled else None  # see llama.layer_index
    layers, bank, loop = _start(graphdef, state, prompt_ids, prompt_mask, params=params, group_size=group_size,
                                slots=params.slots, unrolled=unrolled, layer_index=index)
    end, remaining = 0, True
    while remaining:
        end += HOST_EVERY
        loop, remaining = _decode(graphdef, state, layers, bank, loop, key, jnp.int32(end), stop_at, params=params,
                                  group_size=group_size)
        remaining = bool(remaining)  # the host's one sync per HOST_EVERY steps
    return _finish(loop, prompt_ids, prompt_mask, params=params, group_size=group_size)
