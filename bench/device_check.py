"""Accelerator check (issue 14 item 4): the numbers the existing benches lack, on whatever JAX
backend is present (one GPU, or the CPU). `bench/device_check.sh` runs the three parts:

    python -m bench.device_check parity   [--quick]   # logits vs transformers, SmolLM2 / Qwen2.5 shapes
    python -m bench.device_check rollout  [--quick]   # static vs compact + decode's HBM-roofline fraction
    python -m bench.device_check update   [--quick]   # the PACS update's MFU against a datasheet peak

Every model has random weights (no downloads: the device machine has no network). Each part
writes one JSON file into --out-dir.

parity: a random-weight HF model (transformers, torch on CUDA when available) and ours loaded from
the same folder, float32, left-padded batch; max |logit difference| over real positions.

rollout: bench.rollout_lengths' engines (`run_engines`, `response_lengths`) on a SmolLM2-shaped and,
on GPU, a ~1B Llama-shaped model in the compute dtype chosen. Roofline: the static loop's decode step
time is (time at cap - time at cap/2) / (cap/2 steps), every row running to the cap, so prefill and
fixed costs cancel; bytes a step must read = every weight once (param dtype) + the KV cache of the
positions attended (prompt + mean position), and the fraction is bytes / step time / --peak-bw.

update: bench.update's `bench_variant` on a random-weight SmolLM2-shaped folder; MFU =
6 x matmul params x tokens / step time / --peak-flops (datasheet, not measured).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bench.common import count_params, machine_info, write_json
from bench.rollout_lengths import SMOLLM2_HF_CONFIG, STOP_ID, response_lengths, run_engines

# Qwen2.5-0.5B's shape (bias on q/k/v, tied head); depth reduced below.
QWEN25_HF_CONFIG = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
    rope_theta=1000000.0,
)
# A ~1B Llama (Llama-3.2-1B's shape: 1.24B parameters with the tied 128k vocabulary).
LLAMA_1B_HF_CONFIG = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_theta=500000.0,
)
H200_HBM_BYTES_PER_S = 4.8e12
H200_BF16_DENSE_FLOPS = 989e12


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


# ----------------------------------------------------------------------------------------- parity

def parity(args) -> dict:
    import torch
    import transformers

    from pacs_jax.models import from_pretrained
    from tests.test_models import hf_logits, left_padded_batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPU: compare float32 to float32
    layers = 2 if args.quick else 4
    cases = {"smollm2": ("LlamaConfig", "LlamaForCausalLM", SMOLLM2_HF_CONFIG),
             "qwen2.5": ("Qwen2Config", "Qwen2ForCausalLM", QWEN25_HF_CONFIG)}
    results = []
    for name, (config_cls, model_cls, hf) in cases.items():
        config = getattr(transformers, config_cls)(**{**hf, "num_hidden_layers": layers})
        torch.manual_seed(0)
        hf_model = getattr(transformers, model_cls)(config).eval()
        with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them
            for pname, p in hf_model.named_parameters():
                if "norm" in pname or pname.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            ours = from_pretrained(tmp, dtype="float32")
        rng = np.random.default_rng(0)
        ids, mask = left_padded_batch(rng, config.vocab_size, [9, 32, 17, 1], 32)
        expected = hf_logits(_OnDevice(hf_model.to(device), device), ids, mask)
        got = np.asarray(ours(ids.astype(np.int32), mask.astype(np.int32)), np.float32)
        real = mask.astype(bool)
        diff = float(np.abs(got[real] - expected[real]).max())
        row = {"model": name, "layers": layers, "torch_device": device, "max_abs_logit_diff": diff,
               "logit_scale": float(np.abs(expected[real]).max()), "ok": diff < args.parity_atol}
        print(f"parity {name} ({layers} layers, torch on {device}): max |diff| {diff:.2e} "
              f"(logits up to {row['logit_scale']:.1f}) {'OK' if row['ok'] else 'FAIL'}", flush=True)
        results.append(row)
    return {"part": "parity", "atol": args.parity_atol, "results": results}


class _OnDevice:
    """Lets tests/test_models.hf_logits (CPU tensors in, numpy out) run a model that sits on CUDA."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __call__(self, **inputs):
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        out.logits = out.logits.float().cpu()
        return out


# ---------------------------------------------------------------------------------------- rollout

def weight_bytes(model) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def kv_bytes_per_position(config) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * np.dtype(jax.numpy.dtype(config.compute_dtype)).itemsize


def rollout_model(name: str, hf: dict, dtype: str, args) -> dict:
    from pacs_jax.models import DecoderConfig, init_decoder
    from pacs_jax.sampler import SamplingParams, pad_prompts

    config = DecoderConfig.from_hf({**hf, "model_type": "llama"}, param_dtype=dtype, compute_dtype=dtype)
    model = init_decoder(config, seed=0)
    wbytes, params = weight_bytes(model), count_params(model)
    split = nnx.split(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, int(rng.integers(20, 101))).tolist() for _ in range(args.prompts)]
    ids, mask = pad_prompts(prompts, [128], pad_id=0)
    rows, cap = args.prompts * args.group, args.new_tokens
    common = dict(temperature=1.0, stop_ids=(STOP_ID,), pad_id=0)
    engines = {"static": SamplingParams(cap, **common), "compact": SamplingParams(cap, **common, engine="compact")}
    row = {"model": name, "dtype": dtype, "params": params, "weight_bytes": wbytes, "rows": rows, "max_new_tokens": cap}

    # Static vs compact on rlvr-like lengths (the ratio issue 14 asks for).
    lengths = response_lengths("rlvr", rows, cap, args.seed)
    stop_at = np.where(lengths == cap, cap, lengths - 1)
    runs = run_engines(split, ids, mask, engines, args.group, stop_at, args.repeats)
    for run in runs.values():
        run.pop("lengths")
    row["rlvr"] = {**runs, "compact_over_static": runs["compact"]["useful_tokens_per_s"] / runs["static"]["useful_tokens_per_s"]}
    print(f"rollout {name} {dtype} rlvr: static {runs['static']['useful_tokens_per_s']:.0f} useful tok/s, "
          f"compact {runs['compact']['useful_tokens_per_s']:.0f} ({row['rlvr']['compact_over_static']:.2f}x)", flush=True)

    # Decode step time of the static loop, every row to the cap: difference of two caps.
    half = cap // 2
    times = {}
    for steps in (half, cap):
        params_s = SamplingParams(steps, **common)
        never = np.full(rows, steps)  # no row stops
        times[steps] = run_engines(split, ids, mask, {"static": params_s}, args.group, never, args.repeats)["static"]["steady_s"]
    step_s = (times[cap] - times[half]) / (cap - half)
    context = ids.shape[1] + (half + cap) / 2  # mean attended positions over the steps measured
    step_bytes = wbytes + rows * context * kv_bytes_per_position(config)
    row["decode"] = {"batch": rows, "step_s": step_s, "times_s": {str(k): v for k, v in times.items()},
                     "bytes_per_step": step_bytes, "kv_bytes_per_step": step_bytes - wbytes,
                     "bytes_per_s": step_bytes / step_s if step_s > 0 else None, "peak_bytes_per_s": args.peak_bw,
                     "roofline_fraction": step_bytes / step_s / args.peak_bw if step_s > 0 else None}
    d = row["decode"]
    print(f"decode {name} {dtype} batch {rows}: {step_s * 1e3:.2f} ms/step, {step_bytes / 2**20:.0f} MiB/step, "
          f"{(d['bytes_per_s'] or 0) / 1e9:.1f} GB/s = {(d['roofline_fraction'] or 0):.2%} of {args.peak_bw / 1e12:.2f} TB/s",
          flush=True)
    return row


def rollout(args) -> dict:
    dtype = "bfloat16" if on_gpu() else "float32"
    models = {"smollm2": SMOLLM2_HF_CONFIG}
    if args.quick:
        models = {"smollm2-4l": {**SMOLLM2_HF_CONFIG, "num_hidden_layers": 4}}
    elif on_gpu():
        models["llama-1b"] = LLAMA_1B_HF_CONFIG
    return {"part": "rollout", "results": [rollout_model(name, hf, dtype, args) for name, hf in models.items()]}


# ----------------------------------------------------------------------------------------- update

def update(args) -> dict:
    import torch
    import transformers

    from bench.update import bench_variant

    dtype = "bfloat16" if on_gpu() else "float32"
    hf = {**SMOLLM2_HF_CONFIG, "num_hidden_layers": 4} if args.quick else SMOLLM2_HF_CONFIG
    bench_args = argparse.Namespace(rows=args.update_rows, group_size=4, prompt_len=64,
                                    response_len=args.update_response_len, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).save_pretrained(tmp)
        row = bench_variant("smollm2-shape", Path(tmp), dtype, args.remat, bench_args, {dtype: args.peak_flops})
    row["peak_flops"] = args.peak_flops
    row["mfu"] = row["flops_per_update"] / row["steady_s"] / args.peak_flops
    print(f"update smollm2-shape {dtype} remat={args.remat}: {row['tokens_per_s']:.0f} tok/s, "
          f"{row['flops_per_update'] / row['steady_s'] / 1e12:.3f} TFLOP/s = MFU {row['mfu']:.2%} of "
          f"{args.peak_flops / 1e12:.0f} TFLOP/s", flush=True)
    return {"part": "update", "results": [row]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["parity", "rollout", "update"])
    parser.add_argument("--quick", action="store_true", help="small shapes that finish in minutes on a CPU")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or str(Path(__file__).parent / "out" / "device_check"))
    parser.add_argument("--peak-bw", type=float, default=H200_HBM_BYTES_PER_S, help="bytes/s (default H200 4.8e12)")
    parser.add_argument("--peak-flops", type=float, default=H200_BF16_DENSE_FLOPS, help="FLOP/s (default H200 bf16 dense 989e12)")
    parser.add_argument("--parity-atol", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=None, help="rollout prompts (default 16; quick 2)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=None, help="rollout cap (default 512; quick 32)")
    parser.add_argument("--update-rows", type=int, default=None, help="default 32; quick 4")
    parser.add_argument("--update-response-len", type=int, default=None, help="default 448; quick 64")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--repeats", type=int, default=None, help="default 2; quick 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = dict(prompts=(2, 16), new_tokens=(32, 512), update_rows=(4, 32), update_response_len=(64, 448), repeats=(1, 2))
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    start = time.time()
    payload = {"parity": parity, "rollout": rollout, "update": update}[args.part](args)
    payload.update({"bench": "device_check", "quick": args.quick, "machine": machine_info(),
                    "jax_devices": [str(d) for d in jax.devices()], "args": vars(args), "wall_s": time.time() - start})
    print(f"wrote {write_json(Path(args.out_dir) / f'{args.part}.json', payload)}", flush=True)
    return payload


if __name__ == "__main__":
    main()
