"""Rollout throughput when responses stop at different lengths: the compacting engine
(`rollout.engine: compact`) and the slot engine (`rollout.engine: slots`) against the static
loop, in the same run.

    python -m bench.rollout_lengths                               # tiny model, rlvr / uniform / all-max
    python -m bench.rollout_lengths --models tiny smollm2 --dists rlvr all-max
    python -m bench.rollout_lengths --prompts 16 --group 8 --new-tokens 512
    python -m bench.rollout_lengths --regroup-memory --models smollm2 --prompts 32 --new-tokens 1024
    python -m bench.rollout_lengths --prompts 16 --new-tokens 2048 --slots 32   # the slot engine at a long cap

The engines sample the same random-weight model from the same prompts, and every row emits the
stop token at a step drawn from the distribution (`generate(..., stop_at=...)`; a decode step's
cost does not depend on which token it samples):

    rlvr     log-normal, mean a quarter of the cap, about 3% of rows clipped at the cap (RLVR runs on
             maths: mean responses of 600-1500 tokens against 4096)
    uniform  uniform over 1 .. cap
    all-max  every row runs to the cap (the compacting engine's worst case: nothing to compact)

Reported: useful tokens/s = real response tokens (up to and including the stop token) / wall time
of the whole `generate` (prefill included), best of `--repeats` after a warm-up call with the
same lengths (so compile time is excluded and reported apart); the engines' timed calls
alternate. Memory held: the KV cache columns each engine allocates (static and compact: rows x
(prompt + cap), the compacting engine's shrinking after its first regroup; slots: slots x
(prompt + cap + 1) plus each prompt once in the prompt bank). Writes JSON (default
bench/out/rollout_lengths.json).

`--regroup-memory` instead compiles (never runs) the compacting engine's regroup from all rows to
the next bucket down, for the stacked cache (the scan decode, as on TPU) and the per-layer cache
(the unrolled CPU decode), and reports XLA's memory analysis against the two caches' sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bench.common import OUT_DIR, TINY_HF_CONFIG, machine_info, timed, write_json
from pacs_jax.config import MeshConfig
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.models.llama import KVCache, LayerKVCache
from pacs_jax.sampler import SamplingParams, compact, generate, pad_prompts
from pacs_jax.sharding import BATCH_AXES, make_mesh

# SmolLM2-135M's shape (random weights: lengths are forced, so the weights do not matter).
SMOLLM2_HF_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
MODELS = {"tiny": TINY_HF_CONFIG, "smollm2": SMOLLM2_HF_CONFIG}
DISTRIBUTIONS = ("rlvr", "uniform", "all-max")
STOP_ID = 2


def response_lengths(dist: str, rows: int, cap: int, seed: int = 0) -> np.ndarray:
    """Lengths in 1 .. cap (the stop token included; `cap` = never stopped)."""
    rng = np.random.default_rng(seed)
    if dist == "rlvr":
        # Log-normal with mean cap / 4 and P(X >= cap) = 3%: sigma solves
        # ln 4 + sigma^2 / 2 = z_0.97 * sigma (z = 1.881), the smaller root.
        z = 1.8808
        sigma = z - math.sqrt(z * z - 2 * math.log(4))
        mu = math.log(cap / 4) - sigma * sigma / 2
        lengths = np.ceil(rng.lognormal(mu, sigma, rows))
    elif dist == "uniform":
        lengths = rng.integers(1, cap + 1, rows)
    elif dist == "all-max":
        lengths = np.full(rows, cap)
    else:
        raise ValueError(f"unknown distribution {dist!r}; choose from {list(DISTRIBUTIONS)}")
    return np.clip(lengths, 1, cap).astype(np.int32)


def run_engines(split, ids, mask, engines: dict[str, SamplingParams], group: int, stop_at, repeats: int) -> dict:
    """Per engine: a warm-up call (compiles every batch shape these lengths reach), then the best of
    `repeats` timed calls. The engines' timed calls alternate, so load drift on a shared machine
    hits both alike."""
    def sample(params):
        return generate(split, ids, mask, jax.random.key(0), params, group, stop_at=stop_at)

    runs = {}
    for engine, params in engines.items():
        out, first_s = timed(lambda: sample(params))
        runs[engine] = {"engine": engine, "first_call_s": first_s, "times_s": [], "useful_tokens": int(np.asarray(out.lengths).sum()),
                        "decode_steps": int(out.decode_steps), "lengths": np.asarray(out.lengths)}
    for _ in range(repeats):
        for engine, params in engines.items():
            runs[engine]["times_s"].append(timed(lambda: sample(params))[1])
    for run in runs.values():
        run["steady_s"] = min(run["times_s"])
        run["useful_tokens_per_s"] = run["useful_tokens"] / run["steady_s"]
    return runs


def bench_model(name: str, args) -> list[dict]:
    config = DecoderConfig.from_hf({**MODELS[name], "model_type": "llama"})
    split = nnx.split(init_decoder(config, seed=0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, int(rng.integers(20, 101))).tolist() for _ in range(args.prompts)]
    ids, mask = pad_prompts(prompts, [128], pad_id=0)
    rows, cap = args.prompts * args.group, args.new_tokens
    common = dict(temperature=1.0, stop_ids=(STOP_ID,), pad_id=0, decode_segments=args.decode_segments)
    engines = {"static": SamplingParams(cap, **common, engine="static"),
               "compact": SamplingParams(cap, **common, engine="compact", compact_every=args.compact_every,
                                         compact_buckets=args.compact_buckets)}
    prompt_len = ids.shape[1]
    cache_columns = {"static": rows * (prompt_len + cap), "compact": rows * (prompt_len + cap)}
    if args.slots:
        engines["slots"] = SamplingParams(cap, **common, engine="slots", slots=args.slots)
        cache_columns["slots"] = args.slots * (prompt_len + cap + 1) + args.prompts * prompt_len
    results = []
    for dist in args.dists:
        lengths = response_lengths(dist, rows, cap, args.seed)
        stop_at = lengths - 1  # the step that emits the stop token; cap - 1 + 1 = never
        stop_at[lengths == cap] = cap
        runs = run_engines(split, ids, mask, engines, args.group, stop_at, args.repeats)
        for engine, run in runs.items():
            run["cache_columns"] = cache_columns[engine]
            # The forced lengths are what both engines produced.
            np.testing.assert_array_equal(run.pop("lengths"), lengths)
            print(f"{name} {dist} {engine}: {run['useful_tokens_per_s']:.0f} useful tok/s "
                  f"({run['steady_s']:.2f} s, first call {run['first_call_s']:.1f} s)", flush=True)
        results.append({
            "model": name, "distribution": dist, "rows": rows, "prompts": args.prompts, "group": args.group,
            "max_new_tokens": cap, "mean_length": float(lengths.mean()), "clipped_fraction": float((lengths == cap).mean()),
            "compact_every": args.compact_every, "compact_buckets": args.compact_buckets,
            "decode_segments": args.decode_segments, **{engine: run for engine, run in runs.items()},
            "compact_over_static": runs["compact"]["useful_tokens_per_s"] / runs["static"]["useful_tokens_per_s"],
            **({"slots": args.slots, "slots_over_static": runs["slots"]["useful_tokens_per_s"] / runs["static"]["useful_tokens_per_s"]}
               if args.slots else {}),
        })
        print(f"{name} {dist}: compact / static = {results[-1]['compact_over_static']:.2f}x" +
              (f", slots / static = {results[-1]['slots_over_static']:.2f}x" if args.slots else ""), flush=True)
    return results


def regroup_memory(config: DecoderConfig, rows: int, keep: int, prompt_len: int, new_tokens: int, layered: bool,
                   mesh=None) -> dict:
    """XLA's memory analysis of `compact._regroup` compiled for the current backend, from `rows`
    rows to `keep`, with every cache slot present (the stacked cache's shape; the per-layer
    cache's in the last segment). With `mesh`, the rows are split over its data x fsdp axes as the
    trainer places them and the regroup is compiled under it. Bytes per device; `cache_old` /
    `cache_new` are one device's share of the two caches."""
    slots = prompt_len + new_tokens
    cache = jax.eval_shape(lambda: KVCache.zeros(config, rows, slots))
    if layered:
        cache = jax.eval_shape(LayerKVCache.from_stacked, cache)
    ways = 1 if mesh is None else math.prod(mesh.shape[axis] for axis in BATCH_AXES)

    def spec(shape, dtype, row_axis=0):  # rows (on row_axis) split over the mesh's batch axes
        if mesh is None or not shape:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=None if mesh is None else NamedSharding(mesh, PartitionSpec()))
        axes = [None] * len(shape)
        axes[row_axis] = BATCH_AXES
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*axes)))

    cache = jax.tree.map(lambda a: spec(a.shape, a.dtype, 0 if layered else 1), cache)  # stacked: [layers, rows, ...]
    loop = compact.CompactState(
        step=spec((), np.int32), logits=spec((rows, config.vocab_size), np.float32), cache=cache,
        cache_mask=spec((rows, slots), np.int32), done=spec((rows,), np.bool_), row_ids=spec((rows,), np.int32),
        response=spec((rows, new_tokens), np.int32), logprobs=spec((rows, new_tokens), np.float32))
    out = compact.Output(spec((rows, new_tokens), np.int32), spec((rows, new_tokens), np.float32))
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        memory = compact._regroup.lower(loop, out, rows=keep, slots=0).compile().memory_analysis()
    cache_old = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) // ways
    report = {"rows": rows, "keep": keep, "slots": slots, "layered": layered, "cache_dtype": config.compute_dtype,
              "devices_per_batch": ways, "cache_old": cache_old, "cache_new": cache_old // rows * keep,
              "argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
              "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes}
    # Live at once, at most: the arguments, the outputs that do not reuse one, the temporaries.
    report["peak"] = report["argument"] + report["output"] - report["alias"] + report["temp"]
    return report


def bench_regroup_memory(args) -> list[dict]:
    mesh = None
    if args.row_devices > 1:  # rows split over that many devices, as on a TPU slice
        mesh = make_mesh(MeshConfig(data=1, fsdp=args.row_devices), jax.devices()[: args.row_devices])
    results = []
    for name in args.models:
        config = DecoderConfig.from_hf({**MODELS[name], "model_type": "llama"})
        rows = args.prompts * args.group
        # The first compaction: one bucket (the smallest batch) fewer than all rows.
        keep = rows - compact.bucket_rows(1, rows, args.compact_buckets, args.row_devices)
        for layered in (False, True):
            report = {"model": name, **regroup_memory(config, rows, keep, 128, args.new_tokens, layered, mesh)}
            gib = {key: report[key] / 2**30 for key in ("cache_old", "cache_new", "temp", "peak")}
            print(f"{name} {'per-layer' if layered else 'stacked'} cache, {rows} -> {keep} rows over {args.row_devices} "
                  f"device(s), per device: old cache {gib['cache_old']:.2f} GiB, new {gib['cache_new']:.2f} GiB, "
                  f"temp {gib['temp']:.3f} GiB, peak {gib['peak']:.2f} GiB", flush=True)
            results.append(report)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny"])
    parser.add_argument("--dists", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--decode-segments", type=int, default=4)
    parser.add_argument("--compact-every", type=int, default=SamplingParams(1).compact_every)
    parser.add_argument("--compact-buckets", type=int, default=SamplingParams(1).compact_buckets)
    parser.add_argument("--slots", type=int, default=0, help="also run the slot engine with this many slots (0 = not)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regroup-memory", action="store_true",
                        help="compile the regroup for the first compaction and report its memory analysis (runs nothing)")
    parser.add_argument("--row-devices", type=int, default=1,
                        help="--regroup-memory: split the rows over this many devices (on CPU, set "
                        "XLA_FLAGS=--xla_force_host_platform_device_count to at least this)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/out/rollout_lengths.json, or "
                        "rollout_lengths_regroup_memory.json with --regroup-memory)")
    args = parser.parse_args(argv)
    start = time.time()
    if args.regroup_memory:
        results = bench_regroup_memory(args)
    else:
        results = [r for name in args.models for r in bench_model(name, args)]
    args.out = args.out or str(OUT_DIR / ("rollout_lengths_regroup_memory.json" if args.regroup_memory else "rollout_lengths.json"))
    payload = {"bench": "rollout_lengths", "machine": machine_info(), "args": vars(args), "results": results,
               "wall_s": time.time() - start}
    print(f"wrote {write_json(args.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
