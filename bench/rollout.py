"""Rollout throughput: our sampler (pacs_jax.sampler.generate) against transformers' `generate`
on the same model, weights, prompts and settings, measured in the same run.

    python -m bench.rollout --quick                     # SmolLM2 b32 x 64 tokens + tiny b32/b64 x 128
    python -m bench.rollout                             # the full grid (slow on 2 cores)
    python -m bench.rollout --models tiny --batch 64 --new-tokens 512
    python -m bench.rollout --models smollm2 --batch 32 --group 8 --new-tokens 128   # 4 prompts x 8

`--batch` counts rows (responses sampled at once): batch / group distinct prompts, each sampled
`--group` times, as PACS and GRPO do (transformers: `num_return_sequences`). Both sides sample at
temperature 1 (top-k / top-p off unless `--top-k` / `--top-p`) and generate exactly `new_tokens`
per row: ours with no stop tokens, transformers with min_new_tokens. Each side also runs once
with a single new token, which times the prefill, so the JSON splits prefill from decode. Our
compile time (ahead of time, `lower().compile()`) is reported apart from the tokens/s of the
best of `--repeats` runs. Writes JSON (default bench/out/rollout.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import (
    OUT_DIR, RssSampler, attention_flops_per_token, count_params, machine_info, make_tiny_hf_folder,
    matmul_params, matmul_peak_flops, peak_rss_bytes, timed, write_json,
)
from pacs_jax.models import from_pretrained
from pacs_jax.sampler import DECODE_LAYERS, SamplingParams, generate, pad_prompts
from pacs_jax.sampler.static import _generate

GSM8K = Path(__file__).resolve().parents[1] / "tests" / "data" / "gsm8k_test_50.jsonl"
INSTRUCTION = " Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_BUCKETS = (64, 128, 256)


def smollm2_prompts(folder: Path, count: int) -> tuple[list[list[int]], int]:
    """GSM8K questions as chat prompts (cycled when `count` exceeds the 50 we ship); pad id."""
    from pacs_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines() if line.strip()]
    prompts = [tokenizer.encode(tokenizer.chat_prompt(questions[i % len(questions)] + INSTRUCTION)) for i in range(count)]
    return prompts, tokenizer.pad_id


def tiny_prompts(vocab_size: int, count: int) -> tuple[list[list[int]], int]:
    """Random ids, 20-100 tokens long, so the tiny model's prompts pad like real ones."""
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, int(rng.integers(20, 101))).tolist() for _ in range(count)], 0


def kv_cache_bytes(config, rows: int, length: int) -> int:
    itemsize = np.dtype(config.compute_dtype).itemsize
    return 2 * config.num_layers * rows * config.num_kv_heads * length * config.head_dim * itemsize


def split_prefill(result: dict, rows: int, new_tokens: int) -> dict:
    """Adds the decode-only rate: the tokens after the first, over the time after the prefill."""
    decode_s = result["steady_s"] - result["first_token_s"]
    result["decode_tokens_per_s"] = rows * (new_tokens - 1) / decode_s if decode_s > 0 else float("nan")
    return result


def run_ours(split, ids, mask, new_tokens: int, pad_id: int, repeats: int, group: int, top_k: int, top_p: float,
             decode_layers: str = "auto") -> dict:
    graphdef, state = split
    rows = ids.shape[0] * group

    def params(count: int) -> SamplingParams:
        return SamplingParams(count, temperature=1.0, top_k=top_k, top_p=top_p, stop_ids=(), pad_id=pad_id, decode_layers=decode_layers)

    def sample(count: int, seed: int):
        return generate(split, ids, mask, jax.random.key(seed), params(count), group)

    with RssSampler() as rss:
        # Compile ahead of time so compile seconds are measured, not inferred from noisy run times;
        # the executable lands in jit's cache, so the runs below do not compile again.
        start = time.perf_counter()
        _generate.lower(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), params=params(new_tokens), group_size=group).compile()
        compile_s = time.perf_counter() - start
        runs = []
        for r in range(repeats):
            out, seconds = timed(lambda: sample(new_tokens, r))
            runs.append(seconds)
        jax.block_until_ready(sample(1, 0))  # compiles the one-token program (and waits: dispatch is async)
        first_token_s = min(timed(lambda: sample(1, r))[1] for r in range(repeats))
    lengths = np.asarray(out.lengths)
    if not (lengths == new_tokens).all():  # the comparison is only fair at full length
        raise RuntimeError(f"our sampler stopped early: lengths {sorted(set(lengths.tolist()))}")
    best = min(runs)
    return split_prefill({
        "decode_layers": decode_layers,
        "compile_s": compile_s,
        "steady_s": best,
        "runs_s": runs,
        "first_token_s": first_token_s,
        "tokens_per_s": rows * new_tokens / best,
        "peak_rss_bytes": rss.peak,
    }, rows, new_tokens)


def run_transformers(hf_model, ids, mask, new_tokens: int, pad_id: int, repeats: int, threads: int,
                     group: int = 1, top_k: int = 0, top_p: float = 1.0, time_prefill: bool = True) -> dict:
    import torch

    torch.set_num_threads(threads)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    # top_k=0 turns transformers' default top-50 off, as for us.
    settings = dict(do_sample=True, temperature=1.0, top_k=top_k, top_p=top_p, pad_token_id=pad_id, num_return_sequences=group)

    def sample(count: int, seed: int):
        torch.manual_seed(seed)
        return hf_model.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=count, min_new_tokens=count, **settings)

    times = []
    with RssSampler() as rss, torch.inference_mode():
        sample(2, 0)  # warm-up
        for r in range(repeats):
            out, seconds = timed(lambda: sample(new_tokens, r))
            times.append(seconds)
        first_token_s = min(timed(lambda: sample(1, r))[1] for r in range(repeats)) if time_prefill else None
    if out.shape[1] - ids.shape[1] != new_tokens or out.shape[0] != ids.shape[0] * group:
        raise RuntimeError(f"transformers generated {tuple(out.shape)} for {ids.shape[0]} x {group} rows of {new_tokens} tokens")
    best = min(times)
    rows = ids.shape[0] * group
    result = {
        "steady_s": best, "runs_s": times, "tokens_per_s": rows * new_tokens / best,
        "peak_rss_bytes": rss.peak, "torch_threads": threads,
    }
    if first_token_s is None:
        return result
    result["first_token_s"] = first_token_s
    return split_prefill(result, rows, new_tokens)


def best_torch_threads(hf_model, ids, mask, pad_id: int, group: int) -> tuple[int, dict]:
    """The torch thread count that generates fastest right now (1 or every core), from a short run.

    On shared cores torch's OpenMP workers spin at barriers: with other jobs running, 2 threads
    have measured 40x slower than 1 here, so a fixed count would make the baseline a straw man.
    """
    import os

    trial = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        trial[threads] = run_transformers(hf_model, ids, mask, 8, pad_id, 1, threads, group, time_prefill=False)["steady_s"]
    return min(trial, key=trial.get), trial


def bench_model(name: str, folder: Path, prompts_fn, batches, new_token_counts, args) -> list[dict]:
    import torch
    import transformers

    model = from_pretrained(folder, dtype="float32")
    config = model.config
    split = nnx.split(model)
    hf_model = None
    if not args.skip_transformers:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    all_prompts, pad_id = prompts_fn(max(batches))
    group = args.group
    results = []
    for batch in batches:
        ids, mask = pad_prompts(all_prompts[: batch // group], PROMPT_BUCKETS, pad_id)
        for new_tokens in new_token_counts:
            prompt_len = ids.shape[1]
            # Useful FLOPs: every matmul weight once per token, attention over the real context.
            mean_context = float(mask.sum(axis=1).mean()) + new_tokens / 2
            flops_per_token = 2.0 * matmul_params(config) + attention_flops_per_token(config, mean_context)
            row = {
                "model": name, "params": count_params(model), "batch": batch, "prompts": batch // group, "group": group,
                "prompt_len_padded": prompt_len,
                "prompt_len_mean": float(mask.sum(axis=1).mean()), "new_tokens": new_tokens,
                "kv_cache_bytes": kv_cache_bytes(config, batch, prompt_len + new_tokens),
                "flops_per_token": flops_per_token,
            }
            for index, layers in enumerate(args.decode_layers):
                side = "ours" if index == 0 else f"ours_{layers}"
                print(f"[{name} b{batch} n{new_tokens}] {side} (decode_layers={layers}) ...", flush=True)
                row[side] = run_ours(split, ids, mask, new_tokens, pad_id, args.repeats, group, args.top_k, args.top_p, layers)
                print(f"  {side} {row[side]['tokens_per_s']:.1f} tok/s (compile {row[side]['compile_s']:.1f} s)", flush=True)
                if index:
                    row[f"speedup_vs_{side}"] = row["ours"]["tokens_per_s"] / row[side]["tokens_per_s"]
            if hf_model is not None:
                threads, trial = best_torch_threads(hf_model, ids, mask, pad_id, group)
                row["transformers"] = run_transformers(hf_model, ids, mask, new_tokens, pad_id, args.hf_repeats, threads, group, args.top_k, args.top_p)
                row["transformers"]["thread_trial_8_tokens_s"] = trial
                hf = row["transformers"]
                row["speedup_vs_transformers"] = row["ours"]["tokens_per_s"] / hf["tokens_per_s"]
                row["decode_speedup_vs_transformers"] = row["ours"]["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
                print(f"  transformers {hf['tokens_per_s']:.1f} tok/s -> ours/transformers {row['speedup_vs_transformers']:.2f}x "
                      f"(decode only {row['decode_speedup_vs_transformers']:.2f}x; prefill {row['ours']['first_token_s']:.1f} s "
                      f"vs {hf['first_token_s']:.1f} s)", flush=True)
            results.append(row)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tiny", help="comma list of smollm2, tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--group", type=int, default=1, help="responses per prompt; --batch counts rows (prompts x group)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of ours (after compiling ahead of time)")
    parser.add_argument("--hf-repeats", type=int, default=1, help="timed transformers runs after a warm-up")
    parser.add_argument("--decode-layers", nargs="+", default=["auto"], choices=DECODE_LAYERS,
                        help="ours with each setting, in this order (the first is 'ours'; the rest are timed as baselines)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 at b32 x 64 tokens; tiny at b32, b64 x 128; one run each")
    parser.add_argument("--out", default=str(OUT_DIR / "rollout.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = args.hf_repeats = 1
    for batch in args.batch:
        if batch % args.group:
            parser.error(f"--batch {batch} is not a multiple of --group {args.group} (batch counts rows: prompts x group)")

    plan = []  # (model, batches, new token counts)
    for name in args.models.split(","):
        if name not in ("smollm2", "tiny"):
            parser.error(f"--models: unknown model {name!r}; use smollm2 and/or tiny")
        if args.quick:
            plan.append((name, [32], [64]) if name == "smollm2" else (name, [32, 64], [128]))
        else:
            plan.append((name, args.batch, args.new_tokens))

    peak_before = matmul_peak_flops("float32")
    print(f"measured float32 matmul peak: {peak_before / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, batches, new_token_counts in plan:
            if name == "smollm2":
                from pacs_jax.models.smollm2 import smollm2_dir

                folder = smollm2_dir()
                prompts_fn = lambda n, folder=folder: smollm2_prompts(folder, n)  # noqa: E731
            else:
                folder = make_tiny_hf_folder(Path(tmp) / "tiny")
                vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
                prompts_fn = lambda n, vocab=vocab: tiny_prompts(vocab, n)  # noqa: E731
            results += bench_model(name, folder, prompts_fn, batches, new_token_counts, args)
    peak_after = matmul_peak_flops("float32")
    # The higher of the two peaks: the machine is shared, so the lower one understates what it can do.
    peak = max(peak_before, peak_after)
    for row in results:
        for side in [key for key in row if key.startswith("ours") or key == "transformers"]:
            if isinstance(row[side], dict):
                row[side]["fraction_of_matmul_peak"] = row[side]["tokens_per_s"] * row["flops_per_token"] / peak
    payload = {
        "bench": "rollout",
        "machine": machine_info(),
        "note": "shared machine: other engineers' jobs run on the same cores; compare ratios within this run",
        "matmul_peak_flops_float32": {"before": peak_before, "after": peak_after},
        "sampling": {"temperature": 1.0, "top_k": args.top_k, "top_p": args.top_p, "group": args.group, "stop": "none (full length)",
                     "decode_layers": args.decode_layers},
        "process_peak_rss_bytes": peak_rss_bytes(),
        "results": results,
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
