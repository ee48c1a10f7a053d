"""The sampler: groups of responses from left-padded prompts, with a KV cache, by one of three engines.

    generate      the entry point: chooses the engine (SamplingParams.engine) and runs it
    params.py     SamplingParams
    rollout.py    pad_prompts / pick_bucket (the input), Rollout and finish_rollout (the output)
    tokens.py     token sampling (temperature, top-k, top-p), forced stops
    cache.py      prefill once per prompt, the KV cache, one decode step
    static.py     the static engine: every row until the last one stops, one jitted program
    compact.py    the compacting engine: unfinished rows gathered into smaller batches as rows stop
    slots.py      the slot engine: a fixed number of response slots, refilled as responses stop

The engines sample the same tokens for a key (each row's uniform comes from the key, its decode
step and its row id: tokens.row_uniforms); they differ only in what decoding costs and holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pacs_jax.models.llama import Decoder
from pacs_jax.sampler.compact import generate_compact
from pacs_jax.sampler.params import DECODE_LAYERS, ENGINES, SamplingParams
from pacs_jax.sampler.rollout import Rollout, pad_prompts, pick_bucket
from pacs_jax.sampler.slots import generate_slots
from pacs_jax.sampler.static import generate_static
from pacs_jax.sampler.tokens import sample_token, sampling_weights

__all__ = ["DECODE_LAYERS", "ENGINES", "Rollout", "SamplingParams", "generate", "pad_prompts", "pick_bucket", "sample_token",
           "sampling_weights"]

_ENGINES = {"static": generate_static, "compact": generate_compact, "slots": generate_slots}


def generate(
    model_or_split,
    prompt_ids,
    prompt_mask,
    key: jax.Array,
    params: SamplingParams,
    group_size: int = 1,
    stop_at=None,
) -> Rollout:
    """Sample `group_size` responses per prompt with the engine `params.engine` names ("auto":
    by the platform, SamplingParams.engine_on). `model_or_split` is a Decoder or (graphdef, state)
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
    run = _ENGINES[params.engine_on(jax.default_backend())]
    return run(graphdef, state, prompt_ids, prompt_mask, key, params, group_size, stop_at)
