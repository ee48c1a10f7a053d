"""Decode with FSDP-sharded weights (the training layout, which XLA runs weight-stationary:
it all-reduces activations rather than gathering weights per token) against weights resharded
once per rollout to the decode layout (`pacs_jax.sharding.DECODE_RULES`: whole across fsdp,
still split across tensor), on the 8 virtual CPU devices, per mesh shape, in one run with the
one-device sampler as the baseline. Also counts the collectives in each compiled sampler.

    python -m bench.decode_layout [--new-tokens 64] [--prompts 8] [--group 4] [--repeats 3]

The decode-layout time includes the reshard (the all-gather a trainer pays once per rollout).
Both layouts produce the same greedy tokens (checked). Writes JSON (default
bench/out/decode_layout.json). CPU "devices" share two cores here, so collectives are memory
copies, compute does not scale with devices and replicated weights multiply the memory
traffic on the one shared RAM: read the ratios, not the absolute numbers, and measure on TPU
(its own HBM per chip, collectives over ICI) before choosing a layout.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import OUT_DIR, machine_info, timed, write_json  # noqa: E402
from pacs_jax import sharding  # noqa: E402
from pacs_jax.config import MeshConfig  # noqa: E402
from pacs_jax.models import DecoderConfig, init_decoder  # noqa: E402
from pacs_jax.sampler import SamplingParams, generate, pad_prompts  # noqa: E402
from pacs_jax.sampler.static import _generate  # noqa: E402

MODELS = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "small": dict(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
}
MESHES = [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]


def per_device_param_bytes(params) -> int:
    """Parameter bytes on the first device (the largest share: layouts are even)."""
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == device)


def loop_collectives(graphdef, params, ids, mask, sampling, group) -> dict[str, int]:
    """Collectives in the compiled program (most sit in the decode loop's body)."""
    text = _generate.lower(graphdef, params, ids, mask, jax.random.key(0), params=sampling, group_size=group).compile().as_text()
    return {op: len(re.findall(rf"= \S+ {op}(-start)?\(", text)) for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all")}


def bench_model(name: str, args) -> dict:
    config = DecoderConfig.from_hf({**MODELS[name], "model_type": "llama"})
    graphdef, params = nnx.split(init_decoder(config, seed=0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, config.vocab_size, rng.integers(args.prompt_len // 2, args.prompt_len + 1))) for _ in range(args.prompts)]
    ids, mask = pad_prompts(prompts, [args.prompt_len], 0)
    sampling = SamplingParams(args.new_tokens, temperature=0.0)  # greedy, no stop: every step runs
    tokens = args.prompts * args.group * args.new_tokens

    def best_of(fn):
        first, compile_s = timed(fn)
        return first, compile_s, min(timed(fn)[1] for _ in range(args.repeats))

    baseline, compile_s, best = best_of(lambda: generate((graphdef, params), ids, mask, jax.random.key(0), sampling, args.group).response_ids)
    result = {"model": MODELS[name], "one_device": {"first_call_s": compile_s, "best_s": best, "tokens_per_s": tokens / best}, "meshes": []}
    print(f"{name}: one device {tokens / best:,.0f} tokens/s")
    for shape in MESHES:
        mesh = sharding.make_mesh(MeshConfig(*shape))
        sharding.validate_mesh_for_model(mesh, config, args.prompts, args.group)
        train_params = sharding.shard_train_state(params, mesh)
        decode_shardings = sharding.param_shardings(train_params, mesh, sharding.DECODE_RULES)
        placed = sharding.shard_batch({"ids": ids, "mask": mask}, mesh)
        row = {"mesh": dict(mesh.shape)}
        with jax.set_mesh(mesh):
            def sample(p):
                return generate((graphdef, p), placed["ids"], placed["mask"], jax.random.key(0), sampling, args.group).response_ids

            out, first_s, best = best_of(lambda: sample(train_params))
            np.testing.assert_array_equal(np.asarray(out), np.asarray(baseline))
            row["fsdp_layout"] = {
                "first_call_s": first_s, "best_s": best, "tokens_per_s": tokens / best,
                "param_bytes_per_device": per_device_param_bytes(train_params),
                "collectives": loop_collectives(graphdef, train_params, placed["ids"], placed["mask"], sampling, args.group),
            }
            out, first_s, best = best_of(lambda: sample(jax.device_put(train_params, decode_shardings)))
            np.testing.assert_array_equal(np.asarray(out), np.asarray(baseline))
            decode_params = jax.device_put(train_params, decode_shardings)
            _, _, reshard_best = best_of(lambda: jax.device_put(train_params, decode_shardings))
            row["decode_layout"] = {
                "first_call_s": first_s, "best_s": best, "tokens_per_s": tokens / best,
                "reshard_best_s": reshard_best,
                "param_bytes_per_device": per_device_param_bytes(decode_params),
                "collectives": loop_collectives(graphdef, decode_params, placed["ids"], placed["mask"], sampling, args.group),
            }
        row["decode_speedup"] = row["fsdp_layout"]["best_s"] / row["decode_layout"]["best_s"]
        print(f"  mesh {shape}: fsdp layout {row['fsdp_layout']['tokens_per_s']:,.0f} tokens/s, "
              f"decode layout {row['decode_layout']['tokens_per_s']:,.0f} tokens/s (x{row['decode_speedup']:.2f} incl. reshard)")
        result["meshes"].append(row)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(OUT_DIR / "decode_layout.json"))
    args = parser.parse_args()
    payload = {
        "machine": machine_info(),
        "devices": jax.device_count(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": {name: bench_model(name, args) for name in args.models.split(",")},
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
