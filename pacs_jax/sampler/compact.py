"""The compacting decode engine (`rollout.engine: compact`): decode cost follows the tokens generated.

The static engine (`sampler/static.py`) decodes every row until the longest one stops, so with
RLVR-like lengths (mean a quarter of the cap, a few rows clipped) most of its decode work goes to
rows that are already done. This engine decodes in chunks of `compact_every` steps; between chunks
the host reads how many rows are still running and, when that count fits a smaller bucket
(a multiple of ceil(rows / compact_buckets)), gathers the unfinished rows and their KV caches
into a batch of that size, if that keeps at most `compact_max_keep` of the running rows (a
regroup holds the old and the new cache at once: this caps its peak). Finished rows are written
to the full-size output first. When the rows are split over devices (mesh data x fsdp), each
device's block of rows is compacted within itself, so a regroup moves no cache between devices
and holds only its own old and new rows; the running batch is padded (with finished copies of its
last row) to a multiple of those blocks, so any row count runs on any mesh.

What it keeps from the static sampler (and why this design, not slot refill; see
../shared/notes/continuous_batching.md): every row started at step 0, so all rows still write
their keys at one shared cache column (`prompt_len + step`, a single `dynamic_update_slice`);
one prefill per prompt; the same decode segments reading only the slots written by their end.
Only the row count shrinks, and each row samples with a uniform drawn from its id in the full
batch (tokens.row_uniforms), so for a given key the engines sample the same tokens (up to float
rounding of batch-size-dependent matmuls).

The engine is a few jitted pure functions and a short host loop:
    _start   prefill once per prompt, repeat per group          -> CompactState of all N rows
    _decode  a while_loop of at most `compact_every` steps       (state donated: updated in place)
    _regroup write finished rows out, gather the live ones into a smaller batch (and, for the
             unrolled CPU decode, grow the per-layer caches to the next segment's slots)
    _finish  the Rollout, exactly as the static sampler builds it
Compiled shapes: (decode segments) x (buckets actually reached) decode loops.
"""

from __future__ import annotations

import math
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
from pacs_jax.sharding import BATCH_AXES


class CompactState(NamedTuple):
    step: jax.Array  # scalar: decode steps taken (the same for every row)
    logits: jax.Array  # [b, V] for the next token
    cache: KVCache | LayerKVCache  # b rows
    cache_mask: jax.Array  # [b, P + T]
    done: jax.Array  # [b] bool
    row_ids: jax.Array  # [b] each row's place in the full batch; N marks a padding row (done)
    response: jax.Array  # [b, T]
    logprobs: jax.Array  # [b, T]


class Output(NamedTuple):
    """The full batch's responses, written as rows leave the running batch."""

    response: jax.Array  # [N, T]
    logprobs: jax.Array  # [N, T]


def bucket_rows(live: int, total: int, buckets: int, shards: int = 1) -> int:
    """The running batch's row count for `live` unfinished rows of `total`: the next multiple of
    ceil(total / buckets) (rounded up to a multiple of `shards`, the row blocks of row_shards),
    so at most `buckets` shapes are ever compiled."""
    quantum = -(-total // buckets)
    quantum = -(-quantum // shards) * shards
    return min(total, -(-live // quantum) * quantum)


def kept_rows_limit(rows: int, max_keep: float) -> int:
    """The most rows a regroup from `rows` running rows may keep: `max_keep` of them (the 1e-9
    absorbs float rounding, e.g. 0.29 * 100 = 28.999999999999996)."""
    return int(rows * max_keep + 1e-9)


def regroup_rows(live: int, rows: int, total: int, params: SamplingParams, shards: int = 1) -> int:
    """The running batch's next row count, now `rows` of `total` with `live` unfinished (as
    _rows_needed counts them): their bucket (bucket_rows) if it keeps at most compact_max_keep of
    the running rows, else `rows` (keep decoding at this size). A regroup holds the old batch's
    cache and the new one's at once, so this caps its peak at (1 + compact_max_keep) x the running
    cache."""
    target = bucket_rows(live, total, params.compact_buckets, shards)
    return target if target <= kept_rows_limit(rows, params.compact_max_keep) else rows


def largest_regroup(total: int, params: SamplingParams, shards: int = 1) -> int:
    """The most rows any regroup keeps (the first one, from all `total` rows: a later one starts
    from fewer), or `total` when no regroup is allowed (compact_buckets = 1, or compact_max_keep
    below the smallest bucket): the compile check's worst case."""
    kept = [regroup_rows(live, total, total, params, shards) for live in range(1, total)]
    return max((rows for rows in kept if rows < total), default=total)


def row_shards() -> int:
    """How many contiguous blocks of rows the running batch is split into over the devices of the
    mesh traced under (data x fsdp, as `pacs_jax.sharding` places a batch; 1 without a mesh). A
    regroup compacts each block within itself, on its own device: a gather across blocks made XLA
    all-gather the whole cache onto every chip (1.98 TB of temporaries per chip for the paper's 7B
    rollout on v5p-64, `python -m pacs_jax compile`). It depends on the mesh alone, never on a row
    count, so the host loop and every jitted function agree on it: `_start` pads the running batch
    to a multiple of it and every bucket is one (bucket_rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.shape)


def padded_rows(rows: int, shards: int) -> int:
    """The running batch's first row count: `rows`, rounded up to a multiple of `shards`."""
    return -(-rows // shards) * shards


def _pad_rows(x: jax.Array, rows: int, axis: int = 0) -> jax.Array:
    """`x` with its last row along `axis` repeated up to `rows` rows (a padding row computes as a
    real one: no all-masked attention row, no NaN)."""
    extra = rows - x.shape[axis]
    if not extra:
        return x
    return jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)], mode="edge")


def _stop_ids(params: SamplingParams) -> jax.Array:
    return jnp.asarray(params.stop_ids or (-1,), jnp.int32)


@xla_options.jit(kind="forward", static_argnames=("graphdef", "params", "group_size", "unrolled"))
def _start(graphdef, state, prompt_ids, prompt_mask, *, params: SamplingParams, group_size: int, unrolled: bool,
           layer_index=None):
    model: Decoder = nnx.merge(graphdef, state)
    layers = model.unstacked_layers(layer_index) if unrolled else None
    logits, cache, cache_mask = prefill_groups(model, layers, prompt_ids, prompt_mask, params, group_size)
    total, new = logits.shape[0], params.max_new_tokens
    # Rows past `total` pad the batch to a multiple of the row blocks: done from the start, row id N.
    rows = padded_rows(total, row_shards())
    if isinstance(cache, LayerKVCache):
        cache = LayerKVCache(tuple(_pad_rows(k, rows) for k in cache.k), tuple(_pad_rows(v, rows) for v in cache.v))
    else:
        cache = KVCache(_pad_rows(cache.k, rows, axis=1), _pad_rows(cache.v, rows, axis=1))
    padding = jnp.arange(rows) >= total
    loop = CompactState(jnp.int32(0), _pad_rows(logits, rows), cache, _pad_rows(cache_mask, rows), padding,
                        jnp.minimum(jnp.arange(rows, dtype=jnp.int32), total),
                        jnp.full((rows, new), params.pad_id, jnp.int32), jnp.zeros((rows, new), jnp.float32))
    return layers, loop, Output(jnp.full((total, new), params.pad_id, jnp.int32), jnp.zeros((total, new), jnp.float32))


@xla_options.jit(kind="forward", static_argnames=("graphdef", "params", "visible"), donate_argnames=("loop",))
def _decode(graphdef, state, layers, loop: CompactState, key, end, stop_at, *, params: SamplingParams, visible: int):
    """Decode until step `end` (traced: one compiled loop serves every chunk of a segment) or until
    every row is done. Returns (state, the rows a regroup must keep: `_rows_needed`)."""
    model: Decoder = nnx.merge(graphdef, state)
    prompt_len = loop.cache_mask.shape[1] - params.max_new_tokens
    stop_ids = _stop_ids(params)
    # Padding rows (row id N) are done: whatever they clip to is never used.
    forced = None if stop_at is None else jnp.take(stop_at, loop.row_ids, mode="clip")

    def cond(loop: CompactState):
        return (loop.step < end) & ~jnp.all(loop.done)

    def body(loop: CompactState) -> CompactState:
        step, done = loop.step, loop.done
        # Each row's uniform from its id in the full batch (tokens.row_uniforms): the static engine's draw.
        token, logprob = sample_token(loop.logits, jax.random.fold_in(key, step), params, loop.row_ids)
        token = force_stop(token, step, forced, stop_ids, params.pad_id)
        token = jnp.where(done, params.pad_id, token).astype(jnp.int32)
        response = loop.response.at[:, step].set(token)
        logprobs = loop.logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = decode_token(model, layers, token, loop.cache, loop.cache_mask, prompt_len + step, visible)
        return loop._replace(step=step + 1, logits=logits, cache=cache, done=done, response=response, logprobs=logprobs)

    loop = jax.lax.while_loop(cond, body, loop)
    return loop, _rows_needed(loop.done)


def _rows_needed(done: jax.Array) -> jax.Array:
    """The fewest rows that hold every unfinished one once each block of rows (row_shards) is
    compacted within itself: blocks x the most unfinished rows in one block."""
    shards = row_shards()
    return shards * jnp.max(jnp.sum(~done.reshape(shards, -1), axis=1))


def _write_out(loop: CompactState, out: Output) -> Output:
    # Padding rows carry row id N: out of bounds, dropped.
    return Output(out.response.at[loop.row_ids].set(loop.response, mode="drop"),
                  out.logprobs.at[loop.row_ids].set(loop.logprobs, mode="drop"))


def _take_rows(x: jax.Array, order: jax.Array, axis: int = 0) -> jax.Array:
    """Rows `order` [blocks, keep] of `x` (rows on `axis`), each block's taken from within that
    block (row_shards): a gather batched over the blocks, which XLA keeps on each device."""
    blocks, keep = order.shape
    x = x.reshape(*x.shape[:axis], blocks, -1, *x.shape[axis + 1:])
    taken = jax.vmap(lambda block, rows: jnp.take(block, rows, axis=axis), in_axes=(axis, 0), out_axes=axis)(x, order)
    return taken.reshape(*taken.shape[:axis], blocks * keep, *taken.shape[axis + 2:])


def _take_cache_rows(cache: KVCache | LayerKVCache, order: jax.Array):
    """The cache's rows `order`, written straight into the new cache. The old cache stays alive
    until the regroup returns (a smaller array cannot reuse its buffer), so the regroup's peak is
    old + new cache; nothing more. The stacked cache is gathered one layer at a time: gathered at
    once on its row axis (axis 1), XLA built half the new cache (the keys or the values) as a
    temporary first (bench/RESULTS.md, the compact engine's memory)."""
    if isinstance(cache, LayerKVCache):  # [rows, ...] per layer
        return LayerKVCache(tuple(_take_rows(k, order) for k in cache.k), tuple(_take_rows(v, order) for v in cache.v))
    return KVCache(*jax.lax.map(lambda kv: (_take_rows(kv[0], order), _take_rows(kv[1], order)), (cache.k, cache.v)))


@xla_options.jit(kind="forward", static_argnames=("rows", "slots"), donate_argnames=("out",))
def _regroup(loop: CompactState, out: Output, *, rows: int, slots: int):
    """Writes every row out, then keeps `rows` rows: in each block of rows (row_shards), its first
    rows / blocks with unfinished ones first (in their order), the rest marked padding; with
    `slots` (unrolled decode), grows the caches to it."""
    out = _write_out(loop, out)
    if rows < loop.done.shape[0]:
        blocks = row_shards()
        if rows % blocks or loop.done.shape[0] % blocks:  # a caller's error: _start and bucket_rows keep both multiples
            raise ValueError(f"a regroup from {loop.done.shape[0]} to {rows} rows cannot keep the same number in each of the "
                             f"{blocks} blocks of rows (mesh.data x mesh.fsdp); take the row count from "
                             f"bucket_rows(..., shards={blocks})")
        done = loop.done.reshape(blocks, -1)
        order = jnp.argsort(done, axis=1, stable=True)[:, : rows // blocks]
        # Rows past a block's live count are finished rows already written out: padding from now on.
        padding = (jnp.arange(rows // blocks)[None] >= jnp.sum(~done, axis=1, keepdims=True)).reshape(rows)
        take = partial(_take_rows, order=order)
        loop = CompactState(
            step=loop.step,
            logits=take(loop.logits),
            cache=_take_cache_rows(loop.cache, order),
            cache_mask=take(loop.cache_mask),
            done=take(loop.done),
            row_ids=jnp.where(padding, out.response.shape[0], take(loop.row_ids)),
            response=take(loop.response),
            logprobs=take(loop.logprobs),
        )
    if slots > loop.cache.slots:
        loop = loop._replace(cache=loop.cache.grow(slots))
    return loop, out


@xla_options.jit(kind="forward", static_argnames=("params", "group_size"))
def _finish(loop: CompactState, out: Output, prompt_ids, prompt_mask, *, params: SamplingParams, group_size: int) -> Rollout:
    out = _write_out(loop, out)
    return finish_rollout(prompt_ids, prompt_mask, out.response, out.logprobs, loop.step, _stop_ids(params), group_size)


def generate_compact(graphdef, state, prompt_ids, prompt_mask, key, params: SamplingParams, group_size: int,
                     stop_at=None) -> Rollout:
    """`sampler.generate` with the compacting engine (called through it: same arguments, same Rollout)."""
    unrolled = params.unrolls_layers(jax.default_backend())
    index = layer_index(stacked_layer_count(state)) if unrolled else None  # see llama.layer_index
    layers, loop, out = _start(graphdef, state, prompt_ids, prompt_mask, params=params, group_size=group_size,
                               unrolled=unrolled, layer_index=index)
    total = out.response.shape[0]  # the rows asked for; the running batch may hold padding rows past them
    rows = padded = loop.done.shape[0]
    shards = row_shards()  # the mesh generate runs under, as the jitted functions see it
    prompt_len = prompt_ids.shape[1]
    step, live = 0, padded
    for end in params.segment_ends():
        visible = prompt_len + end
        while step < end and live:
            target = regroup_rows(live, rows, padded, params, shards)
            grow = visible if unrolled and loop.cache.slots < visible else 0
            if target < rows or grow:
                loop, out = _regroup(loop, out, rows=target, slots=grow)
                rows = target
            step = min(end, step + params.compact_every)
            loop, live = _decode(graphdef, state, layers, loop, key, jnp.int32(step), stop_at, params=params, visible=visible)
            live = int(live)  # rows needed: the host's one sync per chunk, it decides the next batch shape
    return _finish(loop, out, prompt_ids, prompt_mask, params=params, group_size=group_size)
