"""The training forward pass with each group's prompt run once, not once per response.

The update and the old-log-prob pass see the rollout in groups: rows i*G ... i*G + G - 1 are the
G responses to one prompt, with identical prompt ids and mask. Run as [prompt + response] rows, a
prompt's positions go through every matmul G times over. Here each group is one row instead:
its prompt, then its G responses back to back, [P, Lp + G*T] for P = N / G prompts. Norms,
projections and the MLP run over those rows as over any others; only attention knows the layout:
prompt queries attend causally to the prompt, each response's queries to the whole prompt and
causally to their own response. The same math as
`update.response_hidden` (RoPE positions, masks and the last prompt position's hidden state
included); only the order of float sums differs. bench.step (32-token prompts, 64 new tokens,
G = 8) runs 4352 positions instead of 6144. (Two streams, prompts [P, Lp] and responses [N, T],
through each layer ran as fast but doubled the update's compile time: every layer twice in HLO.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pacs_jax.models.llama import (
    ACTIVATION_AXES,
    Decoder,
    decoder_layer,
    resolve_dtype,
    rms_norm,
    rope_inverse_frequencies,
    run_layers,
    token_positions,
)
from pacs_jax.sharding import constrain


def shares_prompts(rows: int, group_size: int, batch_ways: int) -> bool:
    """Whether a pass over `rows` responses runs each group's prompt once: only when its P =
    rows / group_size group rows split evenly over the `batch_ways` devices of the batch axes.
    Otherwise the rows could not be sharded and every chip would run the whole micro-batch (the
    paper's 7B config, 8 prompts per micro-batch on 32 chips: 155-159 GiB of temporaries per chip
    instead of 12-22), so the [prompt + response] rows are used."""
    return group_size > 1 and rows % group_size == 0 and (rows // group_size) % batch_ways == 0


def grouped_response_hidden(model: Decoder, prompt_ids, prompt_mask, response_ids, response_mask, group_size: int) -> jax.Array:
    """`update.response_hidden` for rows in groups of `group_size` responses to one prompt: the
    final hidden states at the positions that predict each response token, [N, T, D]. Only the
    first row of each group's prompt is read."""
    config = model.config
    compute = resolve_dtype(config.compute_dtype)
    rows, length = response_ids.shape
    if rows % group_size:
        raise ValueError(f"{rows} response rows are not whole groups of {group_size}")
    prompts, group = rows // group_size, group_size
    full_mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(bool)
    prompt_ids, prompt_mask = prompt_ids[::group], prompt_mask[::group].astype(bool)
    prompt_len = prompt_ids.shape[1]
    # RoPE positions as in the [prompt + response] rows: the count of real tokens before each one.
    response_positions = token_positions(full_mask, prompt_len, length).reshape(prompts, group * length)
    positions = jnp.concatenate([token_positions(prompt_mask, 0, prompt_len), response_positions], axis=1)
    ids = jnp.concatenate([prompt_ids, response_ids.reshape(prompts, group * length)], axis=1)
    # The masks as segments (llama.Decoder): prompt queries see the prompt's real keys causally; each
    # response query its [prompt + response] row's, causally (the last query aligned with the last key).
    full_len = prompt_len + length
    prompt_segments = jnp.zeros((prompts, prompt_len), jnp.int32)
    prompt_keys = jnp.where(prompt_mask, 0, -1)
    response_segments = jnp.zeros((rows, length), jnp.int32)
    response_keys_segments = jnp.where(full_mask, 0, -1)
    inv_freq = rope_inverse_frequencies(config)

    def attend(q, k, v):
        # q [P, Lp + G*T, H, D]; k, v [P, KV, Lp + G*T, D]: the prompt's positions, then the responses'.
        # Responses attend over their group's prompt keys (repeated: keys are a few percent of the
        # activations) and their own, with the ordinary attention of the [prompt + response] rows.
        heads, kv_heads, dim = q.shape[2], k.shape[1], q.shape[3]
        prompt_out = config.attend(q[:, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len], prompt_segments, prompt_keys)

        def response_keys(x):
            own = x[:, :, prompt_len:].reshape(prompts, kv_heads, group, length, dim).transpose(0, 2, 1, 3, 4)
            prompt = jnp.broadcast_to(x[:, None, :, :prompt_len], (prompts, group, kv_heads, prompt_len, dim))
            return jnp.concatenate([prompt, own], axis=3).reshape(rows, kv_heads, full_len, dim)

        response_q = q[:, prompt_len:].reshape(rows, length, heads, dim)
        response_out = config.attend(response_q, response_keys(k), response_keys(v), response_segments, response_keys_segments)
        return jnp.concatenate([prompt_out, response_out.reshape(prompts, group * length, heads, dim)], axis=1), None

    def body(x, params):
        x, _ = decoder_layer(config, params, x, positions, inv_freq, attend)
        return constrain(x, ACTIVATION_AXES), None  # rows on the data axes, as Decoder.__call__ keeps them

    x = constrain(model.embed[...].astype(compute)[ids], ACTIVATION_AXES)
    x, _ = run_layers(config, body, x, model.stacked_layers(), unrolled=config.unrolled_training_layers())
    # Response token 0 is predicted at the last prompt position (prompts are left-padded), token t
    # at response position t - 1.
    responses = x[:, prompt_len:].reshape(rows, length, -1)
    hidden = jnp.concatenate([jnp.repeat(x[:, prompt_len - 1 : prompt_len], group, axis=0), responses[:, :-1]], axis=1)
    return rms_norm(hidden, model.final_norm[...], config.rms_norm_eps)
