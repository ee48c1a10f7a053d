"""Where a decode step of our sampler spends its time, piece by piece, with prototypes of faster
pieces checked against the real ones (so a suggested change comes with its measured gain).

    python -m bench.decode_profile                          # SmolLM2, batch 32, cache 192 slots
    python -m bench.decode_profile --batch 32 --cache-len 640
    python -m bench.decode_profile --model tiny

Layer-stack timings run `--steps` decode steps inside one jitted `lax.while_loop` (the cache is a
loop carry, as in pacs_jax.rollout), so in-place updates and copies behave as they do there.
Pieces: the decoder with its KV cache (what `generate` runs), the same layers without a cache
(the matmul floor), a prototype that writes the cache once per step after the layer scan, one
that unrolls the layers over per-layer cache arrays written in place, the
LM head, and two samplers (the Gumbel-max `jax.random.categorical`, and inverse-CDF with one
uniform per row). Writes JSON (default bench/out/decode_profile.json).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import OUT_DIR, machine_info, make_tiny_hf_folder, matmul_peak_flops, write_json
from pacs_jax.models import KVCache, from_pretrained
from pacs_jax.models.llama import apply_rope, layer_param_shapes, rms_norm, rope_inverse_frequencies
from pacs_jax.rollout import SamplingParams, sample_token


def deferred_write_layer(config, params, x, positions, slot_mask, inv_freq, cache_k, cache_v):
    """Prototype decode layer (T = 1, Llama without biases / q-k norm): attends to the cache as it
    was before this step plus this token's own key and value, and returns the new key/value for
    the caller to write once for all layers, instead of rewriting the whole cache in the scan."""
    batch = x.shape[0]
    kv_heads, head_dim = config.num_kv_heads, config.head_dim
    group = config.num_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    h = rms_norm(x, params["attn_norm"], config.rms_norm_eps)
    q = apply_rope(jnp.einsum("btd,dhk->bthk", h, params["q_proj"]), positions, inv_freq)
    q = q[:, 0].reshape(batch, kv_heads, group, head_dim)
    k_new = apply_rope(jnp.einsum("btd,dhk->bthk", h, params["k_proj"]), positions, inv_freq)[:, 0]
    v_new = jnp.einsum("btd,dhk->bthk", h, params["v_proj"])[:, 0]
    cached_scores = jnp.einsum("bkgd,bksd->bkgs", q, cache_k, preferred_element_type=jnp.float32) * scale
    cached_scores = jnp.where(slot_mask[:, None, None, :], cached_scores, jnp.finfo(jnp.float32).min)
    own_score = jnp.einsum("bkgd,bkd->bkg", q, k_new, preferred_element_type=jnp.float32)[..., None] * scale
    probs = jax.nn.softmax(jnp.concatenate([cached_scores, own_score], axis=-1), axis=-1)
    attn = jnp.einsum("bkgs,bksd->bkgd", probs[..., :-1], cache_v) + probs[..., -1:] * v_new[:, :, None, :]
    x = x + jnp.einsum("bthk,hkd->btd", attn.reshape(batch, 1, config.num_heads, head_dim), params["o_proj"])
    h = rms_norm(x, params["mlp_norm"], config.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", h, params["gate_proj"])
    up = jnp.einsum("btd,df->btf", h, params["up_proj"])
    return x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, params["down_proj"]), k_new, v_new


def deferred_write_step(model, token, cache_mask, cache: KVCache, index):
    """Prototype of Decoder.__call__ for one decode step; returns (final hidden [B,1,D], cache)."""
    config = model.config
    slots = cache.k.shape[3]
    seen = jnp.cumsum(cache_mask, axis=1) - 1
    positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(seen, index, 1, axis=1), 0)
    slot_mask = cache_mask.astype(bool) & (jnp.arange(slots) < index)[None]
    inv_freq = rope_inverse_frequencies(config)
    layer_params = {name: getattr(model.layers, name)[...] for name in layer_param_shapes(config)}

    def body(x, layer):
        params, cache_k, cache_v = layer
        x, k_new, v_new = deferred_write_layer(config, params, x, positions, slot_mask, inv_freq, cache_k, cache_v)
        return x, (k_new, v_new)

    x = model.embed[...][token]
    x, (k_new, v_new) = jax.lax.scan(body, x, (layer_params, cache.k, cache.v))
    # One in-place write of this step's keys/values for every layer: [L, B, KV, 1, D] at `index`.
    k = jax.lax.dynamic_update_slice(cache.k, k_new[:, :, :, None, :], (0, 0, 0, index, 0))
    v = jax.lax.dynamic_update_slice(cache.v, v_new[:, :, :, None, :], (0, 0, 0, index, 0))
    return rms_norm(x, model.final_norm[...], config.rms_norm_eps), KVCache(k, v)


def unrolled_step(model, token, cache_mask, cache: tuple, index):
    """Prototype: layers unrolled in Python over one cache array per layer, each written in place
    before attention reads it (write-then-read needs no copy; read-old-then-write makes XLA copy
    the buffer), and no layer's cache is ever sliced out of a stacked array."""
    config = model.config
    batch, slots = token.shape[0], cache[0][0].shape[2]
    kv_heads, head_dim = config.num_kv_heads, config.head_dim
    group = config.num_heads // kv_heads
    seen = jnp.cumsum(cache_mask, axis=1) - 1
    positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(seen, index, 1, axis=1), 0)
    slot_mask = cache_mask.astype(bool) & (jnp.arange(slots) <= index)[None]
    inv_freq = rope_inverse_frequencies(config)
    x = model.embed[...][token]
    new_cache = []
    for layer, (cache_k, cache_v) in enumerate(cache):
        p = {name: getattr(model.layers, name)[layer] for name in layer_param_shapes(config)}
        h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q = apply_rope(jnp.einsum("btd,dhk->bthk", h, p["q_proj"]), positions, inv_freq)
        k = apply_rope(jnp.einsum("btd,dhk->bthk", h, p["k_proj"]), positions, inv_freq)
        v = jnp.einsum("btd,dhk->bthk", h, p["v_proj"])
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3), (0, 0, index, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3), (0, 0, index, 0))
        q = q[:, 0].reshape(batch, kv_heads, group, head_dim)
        scores = jnp.einsum("bkgd,bksd->bkgs", q, cache_k) / math.sqrt(head_dim)
        probs = jax.nn.softmax(jnp.where(slot_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min), axis=-1)
        attn = jnp.einsum("bkgs,bksd->bkgd", probs, cache_v).reshape(batch, 1, config.num_heads, head_dim)
        x = x + jnp.einsum("bthk,hkd->btd", attn, p["o_proj"])
        h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
        x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(jnp.einsum("btd,df->btf", h, p["gate_proj"])) * jnp.einsum("btd,df->btf", h, p["up_proj"]), p["down_proj"])
        new_cache.append((cache_k, cache_v))
    return rms_norm(x, model.final_norm[...], config.rms_norm_eps), tuple(new_cache)


def inverse_cdf_sample(logits, key):
    """One uniform per row against the CDF of softmax(logits): the same distribution as
    jax.random.categorical, without drawing a Gumbel number per vocabulary entry."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    cdf = jnp.cumsum(jnp.exp(logprobs), axis=-1)
    u = jax.random.uniform(key, (logits.shape[0], 1)) * cdf[:, -1:]
    token = jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1)
    return token, jnp.take_along_axis(logprobs, token[:, None], -1)[:, 0]


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache-len", type=int, default=192, help="KV cache slots (prompt bucket + new tokens)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prefilled slots before the timed steps")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed while_loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(OUT_DIR / "decode_profile.json"))
    args = parser.parse_args(argv)
    if args.prompt_len + args.steps > args.cache_len:
        parser.error("--prompt-len + --steps must fit in --cache-len")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "smollm2":
            from pacs_jax.models.smollm2 import smollm2_dir

            folder = smollm2_dir()
        else:
            folder = make_tiny_hf_folder(Path(tmp) / "tiny")
        model = from_pretrained(folder, dtype="float32")
    config = model.config
    if config.qkv_bias or config.o_bias or config.qk_norm:
        raise SystemExit("the deferred-write prototype covers Llama-style layers only")
    graphdef, state = nnx.split(model)
    batch, slots, steps = args.batch, args.cache_len, args.steps
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, config.vocab_size, (batch, args.prompt_len)), jnp.int32)
    cache_mask = jnp.ones((batch, slots), jnp.int32)

    @jax.jit
    def prefill(state):
        m = nnx.merge(graphdef, state)
        _, cache = m(prompt, attention_mask=cache_mask, cache=KVCache.zeros(config, batch, slots), cache_index=0, return_hidden=True)
        return cache

    cache = prefill(state)
    token = jnp.full((batch, 1), 7, jnp.int32)

    def decode_loop(step_fn):
        """`steps` decode steps of `step_fn` in a while_loop, from the prefilled cache."""

        @jax.jit
        def run(state, cache):
            m = nnx.merge(graphdef, state)

            def body(carry):
                i, _, cache = carry
                hidden, cache = step_fn(m, token, cache, args.prompt_len + i)
                return i + 1, hidden, cache

            hidden0 = jnp.zeros((batch, 1, config.hidden_size), jnp.float32)
            return jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), hidden0, cache))

        return run

    variants = {
        "decoder_with_cache (what generate runs)": lambda m, t, c, i: m(t, attention_mask=cache_mask, cache=c, cache_index=i, return_hidden=True),
        "prototype_deferred_cache_write": lambda m, t, c, i: deferred_write_step(m, t, cache_mask, c, i),
        "decoder_without_cache (matmul floor)": lambda m, t, c, i: (m(t, return_hidden=True), c),
    }
    loops = {name: decode_loop(fn) for name, fn in variants.items()}
    # The unrolled prototype carries a tuple of per-layer caches instead of one stacked array.
    layered_cache = tuple((cache.k[layer], cache.v[layer]) for layer in range(config.num_layers))
    loops["prototype_unrolled_per_layer_cache"] = decode_loop(lambda m, t, c, i: unrolled_step(m, t, cache_mask, c, i))
    compile_s = {}
    for name, run in loops.items():
        start_cache = layered_cache if name == "prototype_unrolled_per_layer_cache" else cache
        start = time.perf_counter()
        run.lower(state, start_cache).compile()  # lands in jit's cache: later calls do not recompile
        compile_s[name] = time.perf_counter() - start
    # The prototypes must compute what the decoder computes: same hidden states, same cache.
    _, ref_hidden, ref_cache = loops["decoder_with_cache (what generate runs)"](state, cache)
    _, proto_hidden, proto_cache = loops["prototype_deferred_cache_write"](state, cache)
    hidden_error = float(jnp.max(jnp.abs(ref_hidden - proto_hidden)))
    cache_error = float(jnp.max(jnp.abs(ref_cache.k - proto_cache.k)))
    _, unrolled_hidden, unrolled_cache = loops["prototype_unrolled_per_layer_cache"](state, layered_cache)
    hidden_error = max(hidden_error, float(jnp.max(jnp.abs(ref_hidden - unrolled_hidden))))
    cache_error = max(cache_error, float(jnp.max(jnp.abs(ref_cache.k - jnp.stack([k for k, _ in unrolled_cache])))))
    print(f"prototypes vs decoder after {steps} steps: max |hidden diff| {hidden_error:.2e}, max |cache diff| {cache_error:.2e}")

    per_step_ms = {}
    for name, run in loops.items():
        start_cache = layered_cache if name == "prototype_unrolled_per_layer_cache" else cache
        per_step_ms[name] = best_time(run, state, start_cache, repeats=args.repeats) / steps * 1e3

    head = jax.jit(lambda state, h: nnx.merge(graphdef, state).logits(h)[:, 0])
    hidden = jnp.asarray(rng.standard_normal((batch, 1, config.hidden_size)), jnp.float32)
    per_step_ms["lm_head"] = best_time(head, state, hidden, repeats=args.repeats) * 1e3
    logits = head(state, hidden)
    gumbel = jax.jit(lambda l, k: sample_token(l, k, SamplingParams(1, temperature=1.0)))
    greedy = jax.jit(lambda l, k: sample_token(l, k, SamplingParams(1, temperature=0.0)))
    per_step_ms["sample_token temperature=1 (Gumbel-max)"] = best_time(gumbel, logits, jax.random.key(0), repeats=args.repeats) * 1e3
    per_step_ms["prototype_inverse_cdf_sample"] = best_time(jax.jit(inverse_cdf_sample), logits, jax.random.key(0), repeats=args.repeats) * 1e3
    per_step_ms["sample_token greedy (argmax + log_softmax)"] = best_time(greedy, logits, jax.random.key(0), repeats=args.repeats) * 1e3

    for name, ms in per_step_ms.items():
        compiled = f"   (loop compile {compile_s[name]:.1f} s)" if name in compile_s else ""
        print(f"{name:45s} {ms:8.1f} ms/step{compiled}")
    payload = {
        "bench": "decode_profile",
        "machine": machine_info(),
        "note": "shared machine: other engineers' jobs run on the same cores; compare ratios within this run",
        "model": args.model, "batch": batch, "cache_len": slots, "prompt_len": args.prompt_len, "steps": steps,
        "kv_cache_bytes": int(ref_cache.k.nbytes + ref_cache.v.nbytes),
        "matmul_peak_flops_float32": matmul_peak_flops("float32"),
        "prototype_max_abs_error": {"hidden": hidden_error, "cache": cache_error},
        "per_step_ms": per_step_ms,
        "loop_compile_s": compile_s,
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
