"""Where a decode step of our sampler spends its time, piece by piece, next to baselines measured
in the same process: the decoder of an earlier git revision (same weights, same cache contents)
and a sort-based top-k / top-p filter.

    python -m bench.decode_profile                                   # SmolLM2, batch 32, 384 slots
    python -m bench.decode_profile --baseline-rev 05f8cd6 --cache-len 768
    python -m bench.decode_profile --model tiny

Layer-stack timings run `--steps` decode steps inside one jitted `lax.while_loop` with the KV
cache as the loop carry (as pacs_jax/sampler/static.py does), so in-place updates and copies behave as
they do there. Pieces: the decoder with its KV cache, its layers scanned (what `generate` runs
on TPU / GPU) and unrolled (on CPU), the same layers without a cache (the matmul floor), the
baseline revision's decoder (checked to produce the same hidden states), the LM head, and `sample_token` at the settings that matter (temperature 1 over
the full vocabulary, top-k 50, top-p 0.95, greedy) with the sort-based filter as the baseline.
Timings alternate between variants, best of `--repeats`. Writes JSON (default
bench/out/decode_profile.json).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import OUT_DIR, machine_info, make_tiny_hf_folder, matmul_peak_flops, write_json
from pacs_jax.models import KVCache, from_pretrained
from pacs_jax.models.llama import LayerKVCache
from pacs_jax.sampler import SamplingParams
from pacs_jax.sampler.tokens import inverse_cdf_sample, sample_token

REPO = Path(__file__).resolve().parents[1]


def module_at_revision(revision: str, path: str) -> types.ModuleType:
    """A module's source at a git revision, imported under a private name (no checkout needed)."""
    source = subprocess.check_output(["git", "-C", str(REPO), "show", f"{revision}:{path}"], text=True)
    module = types.ModuleType(f"baseline_{revision}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def sorted_filter_sample(logits, key, top_k: int, top_p: float):
    """The baseline filter: top-k by `lax.top_k`, the nucleus by a full descending sort."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k > 0:
        logits = jnp.where(logits < jax.lax.top_k(logits, top_k)[0][..., -1:], neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        kept = jnp.where(jnp.cumsum(probs, axis=-1) - probs < top_p, sorted_logits, jnp.inf)
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), neg_inf, logits)
    return inverse_cdf_sample(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), key)


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time per function, alternating between them so load drifts hit all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def decode_loop(graphdef, config, cache_mask, token, start_index: int, steps: int, layers: str = "scan"):
    """`steps` decode steps in a while_loop from a prefilled cache; returns the final hidden states.
    layers: "scan" (stacked weights and cache), "unrolled" (per-layer weights and cache, split
    before the loop, as pacs_jax/sampler/static.py does on CPU), or "none" (the scan without a cache)."""

    @jax.jit
    def run(state, cache):
        model = nnx.merge(graphdef, state)
        if layers == "unrolled":
            per_layer = model.unstacked_layers()
            cache = LayerKVCache.from_stacked(cache)

        def body(carry):
            i, _, cache = carry
            # The token depends on the step, so XLA cannot hoist a cache-free step out of the loop.
            step_token = (token + i) % config.vocab_size
            if layers == "scan":
                hidden, cache = model(step_token, attention_mask=cache_mask, cache=cache, cache_index=start_index + i, return_hidden=True)
            elif layers == "unrolled":
                hidden, cache = model.decode_unrolled(step_token, per_layer, cache, cache_mask, start_index + i, return_hidden=True)
            else:
                hidden = model(step_token, return_hidden=True)
            return i + 1, hidden, cache

        hidden0 = jnp.zeros((token.shape[0], 1, config.hidden_size), jnp.float32)
        return jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), hidden0, cache))[1]

    return run


def prefilled_cache(graphdef, state, cache_cls, config, prompt, cache_mask):
    model = nnx.merge(graphdef, state)
    cache = cache_cls.zeros(config, prompt.shape[0], cache_mask.shape[1])
    return jax.jit(lambda c: model(prompt, attention_mask=cache_mask, cache=c, cache_index=0, return_hidden=True)[1])(cache)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache-len", type=int, default=384, help="KV cache slots (prompt bucket + new tokens)")
    parser.add_argument("--prompt-len", type=int, default=256, help="prefilled slots before the timed steps")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed while_loop")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--baseline-rev", default="05f8cd6", help="git revision whose decoder is timed alongside ('' = none)")
    parser.add_argument("--out", default=str(OUT_DIR / "decode_profile.json"))
    args = parser.parse_args(argv)
    if args.prompt_len + args.steps > args.cache_len:
        parser.error("--prompt-len + --steps must fit in --cache-len")

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_hf_folder(Path(tmp) / "tiny") if args.model == "tiny" else None
        if folder is None:
            from pacs_jax.models.smollm2 import smollm2_dir

            folder = smollm2_dir()
        model = from_pretrained(folder, dtype="float32")
    config = model.config
    graphdef, state = nnx.split(model)
    batch, steps = args.batch, args.steps
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, config.vocab_size, (batch, args.prompt_len)), jnp.int32)
    cache_mask = jnp.ones((batch, args.cache_len), jnp.int32)
    token = jnp.full((batch, 1), 7, jnp.int32)

    cache = prefilled_cache(graphdef, state, KVCache, config, prompt, cache_mask)
    ours = decode_loop(graphdef, config, cache_mask, token, args.prompt_len, steps)
    unrolled = decode_loop(graphdef, config, cache_mask, token, args.prompt_len, steps, layers="unrolled")
    floor = decode_loop(graphdef, config, cache_mask, token, args.prompt_len, steps, layers="none")
    layer_fns = {
        "decoder_with_cache, scanned layers (generate on TPU/GPU)": lambda: ours(state, cache),
        "decoder_with_cache, unrolled layers (generate on CPU)": lambda: unrolled(state, cache),
        "decoder_without_cache (matmul floor)": lambda: floor(state, cache),
    }
    unrolled_error = float(jnp.max(jnp.abs(unrolled(state, cache) - ours(state, cache))))
    print(f"unrolled vs scanned hidden states after {steps} steps: max |diff| {unrolled_error:.2e}")
    baseline_error = None
    if args.baseline_rev:
        # The same weights in the baseline revision's module (its cache layout may differ).
        old = module_at_revision(args.baseline_rev, "pacs_jax/models/llama.py")
        old_model = old.Decoder(old.DecoderConfig(**vars(config)), rngs=nnx.Rngs(0))
        nnx.update(old_model, nnx.state(model))
        old_graphdef, old_state = nnx.split(old_model)
        old_cache = prefilled_cache(old_graphdef, old_state, old.KVCache, config, prompt, cache_mask)
        baseline = decode_loop(old_graphdef, config, cache_mask, token, args.prompt_len, steps)
        layer_fns[f"decoder_with_cache at {args.baseline_rev} (baseline)"] = lambda: baseline(old_state, old_cache)
        baseline_error = float(jnp.max(jnp.abs(baseline(old_state, old_cache) - ours(state, cache))))
        print(f"baseline vs current hidden states after {steps} steps: max |diff| {baseline_error:.2e}")
    per_step_ms = {name: s / steps * 1e3 for name, s in best_times(layer_fns, args.repeats).items()}

    head = jax.jit(lambda state, h: nnx.merge(graphdef, state).logits(h)[:, 0])
    hidden = jnp.asarray(rng.standard_normal((batch, 1, config.hidden_size)), jnp.float32)
    logits = head(state, hidden)
    key = jax.random.key(0)
    sample_fns = {"lm_head": lambda: head(state, hidden)}
    for label, top_k, top_p in [("temperature 1", 0, 1.0), ("top_k 50", 50, 1.0), ("top_p 0.95", 0, 0.95), ("greedy", 0, 1.0)]:
        params = SamplingParams(1, temperature=0.0 if label == "greedy" else 1.0, top_k=top_k, top_p=top_p)
        fn = jax.jit(lambda l, k, params=params: sample_token(l, k, params)[0])
        sample_fns[f"sample_token {label}"] = lambda fn=fn: fn(logits, key)
        if top_k or top_p < 1:
            sort_fn = jax.jit(lambda l, k, top_k=top_k, top_p=top_p: sorted_filter_sample(l, k, top_k, top_p))
            sample_fns[f"sort-based filter {label} (baseline)"] = lambda fn=sort_fn: fn(logits, key)
    per_step_ms |= {name: s * 1e3 for name, s in best_times(sample_fns, args.repeats).items()}

    for name, ms in per_step_ms.items():
        print(f"{name:50s} {ms:8.1f} ms/step")
    payload = {
        "bench": "decode_profile",
        "machine": machine_info(),
        "note": "shared machine: other engineers' jobs run on the same cores; compare ratios within this run",
        "model": args.model, "batch": batch, "cache_len": args.cache_len, "prompt_len": args.prompt_len, "steps": steps,
        "baseline_rev": args.baseline_rev or None,
        "baseline_max_abs_hidden_diff": baseline_error,
        "unrolled_vs_scanned_max_abs_hidden_diff": unrolled_error,
        "kv_cache_bytes": int(cache.k.nbytes + cache.v.nbytes),
        "matmul_peak_flops_float32": matmul_peak_flops("float32"),
        "per_step_ms": per_step_ms,
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
