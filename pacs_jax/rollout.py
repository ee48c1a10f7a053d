"""The sampler: groups of responses from left-padded prompts, with a KV cache, in one jitted program.

Prefill runs once per prompt (not once per response: the cache is then repeated G times), in
chunks that skip the bucket's leading padding; decode is a `lax.while_loop` that stops as soon as
every row has emitted a stop token (layers scanned, or unrolled on CPU: `decode_layers`). Shapes are static
(prompts are padded to length buckets), so a new batch of the same bucket never recompiles.

The log-probs returned are those of the sampling distribution with temperature applied and before
top-k / top-p truncation, which is what the training forward pass recomputes.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pacs_jax import xla_options
from pacs_jax.models.llama import Decoder, KVCache, LayerKVCache, layer_index, resolve_dtype, stacked_layer_count

DECODE_LAYERS = ("auto", "scan", "unrolled")
# "static": one batch of every row until the last one stops (this module). "compact": the unfinished
# rows are gathered into a smaller batch every few steps, so decode cost follows the tokens
# actually generated (pacs_jax.compact). "auto": compact on CPU, where bench/rollout_lengths.py
# measured it; static elsewhere until a run on a TPU or GPU measures compact's speed there (its memory
# is checked by the compile command: rollout.compact_max_keep).
ENGINES = ("auto", "static", "compact")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    # The decode loop runs in this many segments; segment j attends only to the cache slots
    # written by its end, not to the whole cache (1 = one loop over every slot).
    decode_segments: int = 4
    # ... but no segment shorter than this many steps: each segment is its own compiled copy of
    # the decode loop, and a short segment skips too few slots to repay it (bench.step, 64 new
    # tokens, 4-layer 0.85M model on CPU: two 32-step segments instead of one saved 0.01 s per
    # rollout of 0.17 s and cost 0.6 s of a 5.6-6.3 s first step). 1 = exactly decode_segments.
    min_segment_steps: int = 64
    # How a decode step runs the layers: "scan" (over the stacked weights, as training does) or
    # "unrolled" (over per-layer copies of the weights and a per-layer cache: faster on XLA CPU,
    # which copies each layer out of the stacks per step; on TPU it would double the weights'
    # memory). "auto" = unrolled on CPU, scan elsewhere.
    decode_layers: str = "auto"
    # The prefill runs in chunks of this many prompt tokens, skipping the leading chunks that are
    # padding in every row (0 = one pass over the whole bucket; a bucket that is not a multiple
    # of the chunk is also prefilled in one pass).
    prefill_chunk: int = 64
    # Which decode engine runs (ENGINES). With "compact": every `compact_every` decode steps the
    # unfinished rows move into a smaller batch whose row count is a multiple of
    # ceil(rows / compact_buckets) (so at most compact_buckets batch shapes are compiled).
    engine: str = "static"
    compact_every: int = 32
    compact_buckets: int = 16
    # A regroup happens only when the new batch keeps at most this fraction of the running rows
    # (a regroup holds both caches: its peak is at most (1 + this) x the running cache); 1.0 =
    # whenever the rows fit a smaller bucket. Default: RolloutConfig.compact_max_keep's.
    compact_max_keep: float = 0.4

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"rollout.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.decode_segments < 1:
            raise ValueError(f"rollout.decode_segments must be >= 1, got {self.decode_segments}")
        if self.min_segment_steps < 1:
            raise ValueError(f"min_segment_steps must be >= 1, got {self.min_segment_steps}")
        if self.prefill_chunk < 0:
            raise ValueError(f"rollout.prefill_chunk must be >= 0 (0 = one pass), got {self.prefill_chunk}")
        if self.decode_layers not in DECODE_LAYERS:
            raise ValueError(f"rollout.decode_layers must be one of {list(DECODE_LAYERS)}, got {self.decode_layers!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.compact_every < 1:
            raise ValueError(f"rollout.compact_every must be >= 1, got {self.compact_every}")
        if self.compact_buckets < 1:
            raise ValueError(f"rollout.compact_buckets must be >= 1, got {self.compact_buckets}")
        if not 0 < self.compact_max_keep <= 1:
            raise ValueError(f"rollout.compact_max_keep must be in (0, 1], got {self.compact_max_keep}")

    def unrolls_layers(self, platform: str) -> bool:
        """Whether decode runs the layers unrolled on `platform` ("cpu", "tpu", "gpu")."""
        return self.decode_layers == "unrolled" or (self.decode_layers == "auto" and platform == "cpu")

    def compacts(self, platform: str) -> bool:
        """Whether the compacting engine runs on `platform` ("cpu", "tpu", "gpu")."""
        return self.engine == "compact" or (self.engine == "auto" and platform == "cpu")

    def segment_ends(self) -> list[int]:
        """Decode steps at which each segment ends (increasing, the last = max_new_tokens)."""
        count = max(1, min(self.decode_segments, self.max_new_tokens // self.min_segment_steps))
        # Ceil of an even split: strictly increasing since count <= max_new_tokens.
        return [-(-self.max_new_tokens * (i + 1) // count) for i in range(count)]


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


def largest_threshold(satisfied, rows: int) -> jax.Array:
    """Per row, the largest float32 t >= 0 with `satisfied(t)` true, for a predicate that holds at
    0 and only turns false as t grows. A binary search over the bit patterns of non-negative
    float32 (ordered like their values), so the answer is exact, in 31 passes over the row: a
    full-vocabulary sort took 300-450 ms per decode step on CPU at batch 32."""
    lo = jnp.zeros((rows,), jnp.int32)  # satisfied(0.0) holds
    hi = jnp.full((rows,), 0x7F800000, jnp.int32)  # +inf: never satisfied for finite weights

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = satisfied(jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]


def sampling_weights(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Unnormalised softmax(logits) [N, V], with every token outside the top-k and then the top-p
    nucleus set to exactly 0. The nucleus keeps tokens while the mass strictly before them (in
    descending order) is below top_p, so the top token always stays; tokens tied with the last
    kept one stay too (as with HF's warpers)."""
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    rows, vocab = weights.shape
    if 0 < top_k < vocab:
        kth = largest_threshold(lambda t: jnp.sum(weights >= t, axis=-1) >= top_k, rows)
        weights = jnp.where(weights >= kth, weights, 0.0)
    if top_p < 1.0:
        needed = top_p * jnp.sum(weights, axis=-1)
        # The smallest kept weight is the largest t whose tokens >= t hold at least top_p of the mass.
        smallest = largest_threshold(lambda t: jnp.sum(jnp.where(weights >= t, weights, 0.0), axis=-1) >= needed, rows)
        weights = jnp.where(weights >= smallest, weights, 0.0)
    return weights


def inverse_cdf_sample(weights: jax.Array, key: jax.Array, row_ids: jax.Array | None = None, total_rows: int = 0) -> jax.Array:
    """A draw from weights / sum(weights) per row [N, V], with one uniform per row against the CDF:
    the distribution of jax.random.categorical, without its Gumbel number per vocabulary entry
    (10x faster for a 49k vocabulary on CPU). With `row_ids` [N], row i takes the uniform drawn
    for row row_ids[i] of `total_rows` (ids past the end take the last): the compacting engine's
    rows move, and this keeps each row's draw that of its place in the full batch."""
    cdf = jnp.cumsum(weights, axis=-1)
    cdf = cdf / cdf[:, -1:]  # the last entry is exactly 1
    # u in (0, 1): the first index with cdf >= u then always has positive weight (never a
    # filtered token, even a leading one), and it exists since u < 1 = cdf[-1].
    u = jax.random.uniform(key, (total_rows or weights.shape[0], 1), minval=jnp.finfo(jnp.float32).tiny)
    if row_ids is not None:
        u = jnp.take(u, row_ids, axis=0, mode="clip")
    return jnp.sum(cdf < u, axis=-1)


def sample_token(logits: jax.Array, key: jax.Array, params: SamplingParams, row_ids: jax.Array | None = None,
                 total_rows: int = 0) -> tuple[jax.Array, jax.Array]:
    """Returns (token, log-prob of it under softmax(logits / T)) for logits [N, V] float32.
    `row_ids`, `total_rows`: see inverse_cdf_sample."""
    if params.temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        return token, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
    scaled = logits / params.temperature
    token = inverse_cdf_sample(sampling_weights(scaled, params.top_k, params.top_p), key, row_ids, total_rows)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), token[:, None], -1)[:, 0]
    return token, logprob


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


class DecodeState(NamedTuple):
    step: jax.Array  # decode steps taken
    logits: jax.Array  # [N, V] for the next token
    cache: KVCache | LayerKVCache
    done: jax.Array  # [N] bool: the row has emitted a stop token
    response: jax.Array  # [N, T]
    logprobs: jax.Array  # [N, T]


def force_stop(token, step, stop_at, stop_ids, pad_id: int):
    """Benchmarks' forced lengths: the token becomes the first stop id at step stop_at[row], and
    a stop id sampled at any other step becomes pad_id, so rows stop exactly there."""
    if stop_at is None:
        return token
    return jnp.where(step == stop_at, stop_ids[0], jnp.where(jnp.isin(token, stop_ids), pad_id, token))


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


def generate(
    model_or_split,
    prompt_ids,
    prompt_mask,
    key: jax.Array,
    params: SamplingParams,
    group_size: int = 1,
    stop_at=None,
) -> Rollout:
    """Sample `group_size` responses per prompt. `model_or_split` is a Decoder or (graphdef, state)
    (pass the split form in loops: merging once outside avoids walking the object graph per call).
    `stop_at` [rows] (benchmarks only): row i emits the first stop id at decode step stop_at[i]
    and nowhere else (log-probs stay those of the sampled tokens); decode cost does not depend on which
    token is sampled, so this sets the response lengths a bench wants."""
    if group_size < 1:
        raise ValueError(f"rollout.group_size must be >= 1, got {group_size}")
    if isinstance(model_or_split, Decoder):
        graphdef, state = nnx.split(model_or_split)
    else:
        graphdef, state = model_or_split
    if stop_at is not None:
        if not params.stop_ids or params.pad_id in params.stop_ids:
            raise ValueError("stop_at needs a stop token (SamplingParams.stop_ids) and a pad_id that is not one")
        stop_at = jnp.asarray(stop_at, jnp.int32)
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    if params.compacts(jax.default_backend()):
        from pacs_jax.compact import generate_compact

        return generate_compact(graphdef, state, prompt_ids, prompt_mask, key, params, group_size, stop_at)
    # Where the layers are unrolled, their weights are sliced at traced indices (fewer kernels to compile).
    index = layer_index(stacked_layer_count(state)) if params.unrolls_layers(jax.default_backend()) else None
    return _generate(graphdef, state, prompt_ids, prompt_mask, key, params=params, group_size=group_size, stop_at=stop_at,
                     layer_index=index)
