"""Training throughput of the PACS update step (pacs_jax.update.make_update_fn) on a synthetic
rollout batch: tokens/s and MFU (6 x matmul params x tokens / time, against the matmul peak of
the same dtype measured in the same run), float32 vs bfloat16, with and without remat.

    python -m bench.update --quick          # tiny: all four variants; SmolLM2: float32, no remat
    python -m bench.update                  # SmolLM2-135M and tiny, {float32, bfloat16} x {none, full}
    python -m bench.update --models smollm2 --rows 16 --response-len 256
    python -m bench.update --packing --models tiny --rows 32 --prompt-len 128 --response-len 1024

`--packing`: instead, the packed against the padded update and old-log-prob pass on the same
batch in the same run, responses of rlvr-like lengths (log-normal, mean a quarter of
--response-len, 3% at the cap; bench.rollout_lengths) after prompts of half to all of
--prompt-len real tokens. Reported: real tokens (prompt + response) per second of each, and
packed / padded.

The batch is `rows` responses (groups of `--group-size`) of `--response-len` tokens after
`--prompt-len`-token prompts, all real tokens; the update is one optimizer step over it (one
mini-batch, one micro-batch). Old log-probs come from make_prepare_fn, timed separately (it is
the forward-only pass the trainer overlaps with reward checking). Writes JSON (default
bench/out/update.json).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    OUT_DIR, RssSampler, machine_info, make_tiny_hf_folder, matmul_params,
    matmul_peak_flops, peak_rss_bytes, timed, write_json,
)
from pacs_jax.config import AlgorithmConfig, OptimizerConfig
from pacs_jax.models import from_pretrained
from pacs_jax.update import ROLLOUT_KEYS, init_train_state, make_prepare_fn, make_train_optimizer, make_update_fn


def time_update(update, state, batch, repeats: int):
    """Compile `update` ahead of time (it lands in jit's cache), then time its first call and
    `repeats` steady calls: (state, metrics, compile_s, first_s, steady_s list)."""
    start = time.perf_counter()
    update.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    (state, metrics), first_s = timed(lambda: update(state, batch))
    steady = []
    for _ in range(repeats):
        (state, metrics), seconds = timed(lambda: update(state, batch))
        steady.append(seconds)
    return state, metrics, compile_s, first_s, steady


def synthetic_rollout(vocab_size: int, rows: int, prompt_len: int, response_len: int, group_size: int, seed: int = 0) -> dict:
    """Random tokens, every position real; binary rewards that differ inside each group (so the
    PACS loss has non-zero advantages and a real gradient)."""
    rng = np.random.default_rng(seed)
    rewards = (np.arange(rows) % group_size < group_size // 2).astype(np.float32)
    return {
        "prompt_ids": jnp.asarray(rng.integers(3, vocab_size, (rows, prompt_len)), jnp.int32),
        "prompt_mask": jnp.ones((rows, prompt_len), jnp.int32),
        "response_ids": jnp.asarray(rng.integers(3, vocab_size, (rows, response_len)), jnp.int32),
        "response_mask": jnp.ones((rows, response_len), jnp.int32),
        "rewards": jnp.asarray(rewards),
    }


def pacs_train_state(folder: Path, dtype: str, remat: str):
    """The model in `folder` as a PACS train state: (model config, algorithm, optimizer, graphdefs, state)."""
    model = from_pretrained(folder, dtype=dtype, remat=remat)
    algorithm = AlgorithmConfig(name="pacs")
    optimizer = make_train_optimizer(algorithm, OptimizerConfig(lr=1e-6), total_updates=100)
    graphdefs, state = init_train_state(model, optimizer, with_critic=False)
    return model.config, algorithm, optimizer, graphdefs, state


def bench_variant(name: str, folder: Path, dtype: str, remat: str, args, peaks: dict) -> dict:
    config, algorithm, optimizer, graphdefs, state = pacs_train_state(folder, dtype, remat)
    rollout = synthetic_rollout(config.vocab_size, args.rows, args.prompt_len, args.response_len, args.group_size)
    prepare = make_prepare_fn(graphdefs, algorithm)
    update = make_update_fn(graphdefs, optimizer, algorithm, group_size=args.group_size, mini_batches=1, micro_batches=1)

    tokens = args.rows * (args.prompt_len + args.response_len)
    flops = 6.0 * matmul_params(config) * tokens
    label = f"[{name} {dtype} remat={remat}]"
    print(f"{label} ...", flush=True)
    with RssSampler() as rss:
        old, prepare_first_s = timed(lambda: prepare(state.params, None, {k: rollout[k] for k in ROLLOUT_KEYS}))
        _, prepare_s = timed(lambda: prepare(state.params, None, {k: rollout[k] for k in ROLLOUT_KEYS}))
        batch = {**rollout, **old}
        state, metrics, compile_s, first_s, steady = time_update(update, state, batch, args.repeats)
    loss = float(metrics["loss"])
    if not np.isfinite(loss) or float(metrics["skipped_steps"]) != 0:
        raise RuntimeError(f"{label}: the update did not take a finite step (loss {loss}, metrics {metrics})")
    best = min(steady)
    row = {
        "model": name, "params": sum(int(x.size) for x in jax.tree.leaves(state.params["policy"])), "matmul_params": matmul_params(config),
        "dtype": dtype, "remat": remat, "rows": args.rows, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "tokens_per_update": tokens, "flops_per_update": flops,
        "first_call_s": first_s, "compile_s": compile_s, "steady_s": best, "steady_runs_s": steady,
        "tokens_per_s": tokens / best,
        "prepare_first_call_s": prepare_first_s, "prepare_s": prepare_s, "prepare_tokens_per_s": tokens / prepare_s,
        "peak_rss_bytes": rss.peak, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
    }
    print(f"  {row['tokens_per_s']:.0f} tok/s ({flops / best / peaks[dtype]:.1%} of the {dtype} matmul peak measured "
          f"before), compile {row['compile_s']:.1f} s, peak RSS {rss.peak / 2**30:.2f} GiB", flush=True)
    return row


def rlvr_rollout(vocab_size: int, rows: int, prompt_len: int, response_len: int, group_size: int, seed: int = 0) -> dict:
    """`synthetic_rollout` with real lengths: left-padded prompts of prompt_len / 2 .. prompt_len
    tokens, responses of rlvr-like lengths (then padding)."""
    from bench.rollout_lengths import response_lengths

    rng = np.random.default_rng(seed)
    batch = {k: np.array(v) for k, v in synthetic_rollout(vocab_size, rows, prompt_len, response_len, group_size, seed).items()}
    prompt_real = np.repeat(rng.integers(prompt_len // 2, prompt_len + 1, rows // group_size), group_size)
    response_real = response_lengths("rlvr", rows, response_len, seed)
    batch["prompt_mask"] = (np.arange(prompt_len)[None] >= prompt_len - prompt_real[:, None]).astype(np.int32)
    batch["response_mask"] = (np.arange(response_len)[None] < response_real[:, None]).astype(np.int32)
    batch["prompt_ids"] *= batch["prompt_mask"]
    batch["response_ids"] *= batch["response_mask"]
    return batch


def bench_packing(name: str, folder: Path, args) -> list[dict]:
    """Padded vs packed on one rlvr-like batch: the update (one optimizer step, old log-probs of a
    later mini-batch read from the batch) and the old-log-prob pass, same weights, same run."""
    from pacs_jax.packing import pack_rollout

    config, algorithm, optimizer, graphdefs, state = pacs_train_state(folder, "float32", args.remat[0])
    host = rlvr_rollout(config.vocab_size, args.rows, args.prompt_len, args.response_len, args.group_size)
    real_tokens = int(host["prompt_mask"].sum() + host["response_mask"].sum())
    packed, stats = pack_rollout(*(host[k] for k in ROLLOUT_KEYS), micro_batches=1,
                                 row_tokens=args.prompt_len + args.response_len)
    layouts = {"padded": {k: jnp.asarray(v) for k, v in host.items()}}
    layouts["packed"] = {**layouts["padded"], **{k: jnp.asarray(v) for k, v in packed.items()}}
    prepare = make_prepare_fn(graphdefs, algorithm)
    # The update reads the old log-probs it is given, as mini-batches 2..k do.
    update = make_update_fn(graphdefs, optimizer, algorithm, group_size=args.group_size, mini_batches=1, micro_batches=1,
                            first_mini_batch_on_policy=False)
    rows = []
    for layout, batch in layouts.items():
        label = f"[{name} {layout}]"
        print(f"{label} ...", flush=True)
        forward = {k: v for k, v in batch.items() if k != "rewards"}
        with RssSampler() as rss:
            old, prepare_first_s = timed(lambda: prepare(state.params, None, forward))
            prepare_s = min(timed(lambda: prepare(state.params, None, forward))[1] for _ in range(args.repeats))
            full = {**batch, **old}
            state, metrics, compile_s, first_s, steady = time_update(update, state, full, args.repeats)
        positions = int(np.prod(batch["packed_ids"].shape)) if layout == "packed" else args.rows * (args.prompt_len + args.response_len)
        row = {
            "model": name, "layout": layout, "lengths": "rlvr", "rows": args.rows, "prompt_len": args.prompt_len,
            "response_len": args.response_len, "real_tokens": real_tokens, "positions": positions,
            "compile_s": compile_s, "first_call_s": first_s, "steady_s": min(steady), "steady_runs_s": steady,
            "real_tokens_per_s": real_tokens / min(steady), "prepare_s": prepare_s,
            "prepare_real_tokens_per_s": real_tokens / prepare_s, "peak_rss_bytes": rss.peak,
            "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
        }
        if layout == "packed":
            row.update(stats)
        print(f"  {row['real_tokens_per_s']:.0f} real tok/s update, {row['prepare_real_tokens_per_s']:.0f} old-log-prob pass, "
              f"{positions} positions for {real_tokens} real tokens", flush=True)
        rows.append(row)
    padded, packed_row = rows
    for key in ("real_tokens_per_s", "prepare_real_tokens_per_s"):
        packed_row[f"{key}_vs_padded"] = packed_row[key] / padded[key]
    print(f"  packed / padded: update {packed_row['real_tokens_per_s_vs_padded']:.2f}x, "
          f"old-log-prob pass {packed_row['prepare_real_tokens_per_s_vs_padded']:.2f}x", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tiny", help="comma list of smollm2, tiny")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full", "dots"])
    parser.add_argument("--rows", type=int, default=8, help="responses per update (whole groups)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny: all variants; SmolLM2: float32 without remat")
    parser.add_argument("--packing", action="store_true", help="packed vs padded on rlvr-like lengths (float32, first --remat)")
    parser.add_argument("--out", default=str(OUT_DIR / "update.json"))
    args = parser.parse_args(argv)
    if args.rows % args.group_size:
        parser.error(f"--rows {args.rows} must be a multiple of --group-size {args.group_size}")

    plan = []  # (model, dtype, remat)
    for name in args.models.split(","):
        if name not in ("smollm2", "tiny"):
            parser.error(f"--models: unknown model {name!r}; use smollm2 and/or tiny")
        quick_smollm2 = args.quick and name == "smollm2"
        for dtype in (["float32"] if quick_smollm2 else args.dtypes):
            for remat in (["none"] if quick_smollm2 else args.remat):
                plan.append((name, dtype, remat))

    if args.packing:
        return main_packing(args, plan)
    peaks = {dtype: matmul_peak_flops(dtype) for dtype in ("float32", "bfloat16")}
    print("measured matmul peak (GFLOP/s):", {k: round(v / 1e9, 1) for k, v in peaks.items()}, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, dtype, remat in plan:
            if name not in folders:
                if name == "smollm2":
                    from pacs_jax.models.smollm2 import smollm2_dir

                    folders[name] = smollm2_dir()
                else:
                    folders[name] = make_tiny_hf_folder(Path(tmp) / "tiny")
            results.append(bench_variant(name, folders[name], dtype, remat, args, peaks))
    # The higher of the peaks measured before and after: the machine is shared, so the lower one
    # understates what it can do (and would flatter the MFU).
    for dtype in peaks:
        peaks[dtype] = max(peaks[dtype], matmul_peak_flops(dtype))
    for row in results:
        row["mfu_vs_same_dtype_peak"] = row["flops_per_update"] / row["steady_s"] / peaks[row["dtype"]]
        row["mfu_vs_float32_peak"] = row["flops_per_update"] / row["steady_s"] / peaks["float32"]
    payload = {
        "bench": "update",
        "machine": machine_info(),
        "note": "shared machine: other engineers' jobs run on the same cores; compare ratios within this run",
        "matmul_peak_flops": peaks,
        "algorithm": "pacs, one optimizer step (1 mini-batch, 1 micro-batch), AdamW + clip",
        "process_peak_rss_bytes": peak_rss_bytes(),
        "results": results,
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


def main_packing(args, plan) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in dict.fromkeys(name for name, _, _ in plan):
            if name == "smollm2":
                from pacs_jax.models.smollm2 import smollm2_dir

                folder = smollm2_dir()
            else:
                folder = make_tiny_hf_folder(Path(tmp) / "tiny")
            results.extend(bench_packing(name, folder, args))
    payload = {
        "bench": "update_packing",
        "machine": machine_info(),
        "note": "shared machine: compare the packed / padded ratios within this run",
        "algorithm": "pacs, one optimizer step (1 mini-batch, 1 micro-batch), AdamW + clip; float32",
        "results": results,
    }
    path = write_json(args.out if args.out != str(OUT_DIR / "update.json") else str(OUT_DIR / "update_packing.json"), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
