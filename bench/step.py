"""Full RL steps of our trainer's code path on the workload ../shared/bench/tunix_grpo_bench.py
runs on Tunix, so the two can be timed side by side in one session (see bench/RESULTS.md).

    python -m bench.step                       # 12 steps; the last stdout line is one JSON object
    python -m bench.step --mini-batches 2      # with a separate old-log-prob pass (mini-batch 2)
    python -m bench.step --no-shared-prompts   # every response row with its own prompt copy
    python -m bench.step --train-layers scan   # the training passes' layers scanned (TPU's default)
    python -m bench.step --cpu-compile full    # XLA's default compiler options (trainer.cpu_compile)
    python -m bench.step --no-compile-ahead    # the passes compiled at their first call (compile_ahead)
    python -m bench.step --min-segment-steps 32   # two 32-step decode loops, not one 64-step loop

Workload (the Tunix script's defaults): a Qwen2-shaped random-init model (vocab 512, hidden 128,
MLP 384, 4 layers, 4 heads, 2 KV heads, head_dim 32, tied embeddings, q/k/v biases, rope_theta
1e4, rms eps 1e-6, float32); 8 prompts per step of BOS + 31 ids uniform in [3, 512) (numpy
RandomState(0), the same prompts), 8 responses each, exactly 64 new tokens (no stop token),
temperature 1, top-p 1; reward on the host: 1 if the completion holds an even number of even
ids; GRPO, beta 0 (no reference), epsilon 0.2, seq-mean-token-mean, one optimizer step per
batch of 64; optax.adamw(1e-5) with its default weight decay 1e-4 and no clipping.

A step is what `pacs_jax.train` does per step: pad_prompts + shard_batch, `generate`, the
response tokens to the host, the old-log-prob pass (nothing to compute with one mini-batch: the
update's first mini-batch is on-policy by construction), the reward on the host, the update
(each group's prompt run once, `trainer.shared_prompts`; layers as `model.train_layers: auto`),
metrics to the host. Split like the Tunix script: rollout (generate + tokens to host), prep
(reward + advantage inputs), train (old log-probs + update, blocked until ready). Step 1
includes compilation; steady state = median / min of steps 3..12.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np
import optax

from bench.common import OUT_DIR, machine_info, write_json
from pacs_jax import sharding, xla_options
from pacs_jax.compile_ahead import CompileAhead, batch_arrays
from pacs_jax.config import AlgorithmConfig, MeshConfig
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import ROLLOUT_KEYS, init_train_state, make_prepare_fn, make_update_fn

BOS, FIRST_REAL = 1, 3


def parity_reward(response_ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """1.0 where a completion holds an even number of even-id tokens (the Tunix script's reward)."""
    even = ((response_ids % 2 == 0) & (response_mask == 1)).sum(axis=1)
    return (even % 2 == 0).astype(np.float32)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens including BOS")
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--mini-batches", type=int, default=1)
    parser.add_argument("--decode-layers", default="auto", choices=["auto", "scan", "unrolled"])
    parser.add_argument("--decode-segments", type=int, default=SamplingParams.decode_segments)
    parser.add_argument("--min-segment-steps", type=int, default=SamplingParams.min_segment_steps,
                        help="no decode segment shorter than this (32: two loops for 64 new tokens)")
    parser.add_argument("--train-layers", default="auto", choices=["auto", "scan", "unrolled"])
    parser.add_argument("--no-shared-prompts", dest="shared_prompts", action="store_false",
                        help="run every response row with its own copy of the prompt (trainer.shared_prompts=false)")
    parser.add_argument("--cpu-compile", default="fast", choices=["fast", "full"],
                        help="trainer.cpu_compile: fast (LLVM level 1, elemental emitters) or XLA's defaults")
    parser.add_argument("--no-compile-ahead", dest="compile_ahead", action="store_false",
                        help="compile the old-log-prob pass and the update when first called, not while the rollout compiles")
    parser.add_argument("--steady-from", type=int, default=3)
    parser.add_argument("--out", default=str(OUT_DIR / "step.json"))
    args = parser.parse_args(argv)
    xla_options.set_cpu_compile(args.cpu_compile)

    config = DecoderConfig.from_hf(dict(
        model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        rope_theta=10000.0, rms_norm_eps=1e-6,
    ), train_layers=args.train_layers)
    rng = np.random.RandomState(0)  # the Tunix script's prompts, token for token
    prompts = rng.randint(FIRST_REAL, config.vocab_size, size=(args.steps, args.prompts_per_step, args.prompt_len - 1))
    algorithm = AlgorithmConfig(name="grpo", clip_low=0.2, clip_high=0.2, loss_agg_mode="seq-mean-token-mean", kl_coef=0.0)
    optimizer = optax.multi_transform({"policy": optax.adamw(1e-5)}, lambda params: {name: name for name in params})
    mesh = sharding.make_mesh(MeshConfig())
    graphdefs, state = init_train_state(init_decoder(config, seed=0), optimizer, with_critic=False)
    state = jax.device_put(state, sharding.train_state_shardings(state, mesh))
    sampling = SamplingParams(args.max_new, temperature=1.0, top_p=1.0, stop_ids=(), pad_id=0, decode_layers=args.decode_layers,
                              decode_segments=args.decode_segments, min_segment_steps=args.min_segment_steps)
    micro = 1
    prompt_group = args.group_size if args.shared_prompts else 0
    prepare = make_prepare_fn(graphdefs, algorithm, chunks=args.mini_batches * micro, on_policy_chunks=micro, prompt_group=prompt_group)
    update = make_update_fn(graphdefs, optimizer, algorithm, group_size=args.group_size,
                            mini_batches=args.mini_batches, micro_batches=micro, shared_prompts=args.shared_prompts)
    base_key = jax.random.key(0)
    records, rewards_seen = [], []
    before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])
    with jax.set_mesh(mesh):
        for step in range(args.steps):
            start = time.perf_counter()
            ids, mask = pad_prompts([[BOS, *row] for row in prompts[step].tolist()], [args.prompt_len], 0)
            batch = sharding.shard_batch({"ids": ids, "mask": mask}, mesh)
            if step == 0 and args.compile_ahead:
                ahead = CompileAhead(prepare, update, state, None, rows=len(ids) * args.group_size, prompt_width=ids.shape[1],
                                     max_new_tokens=args.max_new, mesh=mesh)
            rollout = generate((graphdefs["policy"], state.params["policy"]), batch["ids"], batch["mask"],
                               jax.random.fold_in(base_key, step), sampling, args.group_size)
            response_ids, response_mask = jax.device_get((rollout.response_ids, rollout.response_mask))
            rollout_s = time.perf_counter() - start

            arrays = batch_arrays({k: getattr(rollout, k) for k in ROLLOUT_KEYS}, mesh)
            if step == 0 and args.compile_ahead:
                ahead.wait_prepare()
            extras = prepare(state.params, None, arrays)  # dispatched; runs while the host scores
            scores = parity_reward(response_ids, response_mask)
            rewards = sharding.shard_batch({"rewards": scores}, mesh)["rewards"]
            prep_s = time.perf_counter() - start - rollout_s

            if step == 0 and args.compile_ahead:
                ahead.wait_update()
            state, metrics = update(state, batch_arrays({**arrays, **extras, "rewards": rewards, "sampler_logprobs": rollout.logprobs}, mesh))
            metrics = jax.device_get(metrics)
            jax.block_until_ready(state.params)
            step_s = time.perf_counter() - start
            records.append({"step": step_s, "rollout": rollout_s, "prep": prep_s, "train": step_s - rollout_s - prep_s,
                            "loss": float(metrics["loss"]), "logprob_diff_max": float(metrics["rollout/logprob_diff_max"])})
            rewards_seen.append(float(scores.mean()))
            print(f"step {step + 1:2d}: " + " ".join(f"{k}={v:.3f}" for k, v in records[-1].items()), file=sys.stderr, flush=True)
    after = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])
    steady = records[args.steady_from - 1 :]
    summary = {}
    for key in ("step", "rollout", "prep", "train"):
        values = [r[key] for r in steady]
        summary[f"{key}_median_s"], summary[f"{key}_min_s"] = float(np.median(values)), float(np.min(values))
    result = {
        "bench": "pacs_jax_grpo_step_cpu",
        "machine": machine_info(),
        "workload": "../shared/bench/tunix_grpo_bench.py defaults",
        "params": int(sum(x.size for x in jax.tree.leaves(state.params["policy"]))),
        "devices": len(jax.devices()), "mini_batches": args.mini_batches, "decode_layers": args.decode_layers,
        "decode_segments": args.decode_segments, "min_segment_steps": args.min_segment_steps, "train_layers": args.train_layers, "shared_prompts": args.shared_prompts,
        "cpu_compile": args.cpu_compile, "compile_ahead": args.compile_ahead,
        "first_step_s": records[0]["step"], "second_step_s": records[1]["step"] if len(records) > 1 else None,
        **summary, "reward_mean_per_step": rewards_seen, "params_changed": bool(np.any(before != after)),
        "per_step": records,
    }
    write_json(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
