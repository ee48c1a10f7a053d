"""How far apart the log-prob passes are in float32 and bfloat16 compute, and what that does to
PACS's score, measured on real SmolLM2-135M-Instruct responses to GSM8K prompts.

    python -m bench.dtype_drift                      # 4 prompts x 2 responses, 192 new tokens
    python -m bench.dtype_drift --bf16-exact-weights --out bench/out/dtype_drift_bf16_exact.json
    python -m bench.dtype_drift --prompts 2 --new-tokens 64   # quick

For each compute dtype (parameters float32, as in the paper configs) the trainer's own pieces run
at identical weights, at jax's default matmul precision as in train.py:
  sampler  pacs_jax.sampler.generate's log-probs of the tokens it sampled (temperature 1);
  prepare  the old-log-prob pass, make_prepare_fn (what mini-batches 2..k read as old log-probs);
  loss     the log-probs inside jax.value_and_grad of the paper's PACS loss (the forward the
           gradient differentiates; the real update's own metrics are recorded next to it);
  ref      transformers in float64, each row alone and unpadded (an independent reference).
PACS scores each response s = beta * sum_t (log pi - log pi_old): at identical weights it should
be 0, so beta * sum(loss - prepare) is pure noise. The signal it competes with is the score
change one optimizer step of the paper's (AdamW, lr 1e-6, clip 1, PACS loss, on-policy) makes:
beta * sum(prepare(after) - prepare(before)), with the step taken in float32 and then looked at
through each compute dtype. Rewards are synthetic (1, 0 alternating in each group): the bench
measures numerics, and PACS needs mixed groups for a non-zero gradient.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import OUT_DIR, machine_info, write_json
from pacs_jax.algorithms import pacs_loss
from pacs_jax.config import load_config
from pacs_jax.models import from_pretrained
from pacs_jax.models.smollm2 import smollm2_dir
from pacs_jax.models.tokenizer import load_tokenizer
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import ROLLOUT_KEYS, batch_logprobs, init_train_state, make_prepare_fn, make_train_optimizer, make_update_fn

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIG = ROOT / "configs" / "qwen2.5_7b_pacs.yaml"
GSM8K = ROOT / "tests" / "data" / "gsm8k_test_50.jsonl"


def gsm8k_prompts(tokenizer, count: int) -> list[list[int]]:
    lines = GSM8K.read_text().splitlines()[:count]
    return [tokenizer.encode(tokenizer.chat_prompt(json.loads(line)["question"])) for line in lines]


def gap_stats(a, b, mask) -> dict:
    """|a - b| per real token (mean, p99, max) and |sum over a response| (mean, max), in nats."""
    a, b, mask = (np.asarray(x, np.float64) for x in (a, b, mask))
    per_token = np.abs(a - b)[mask > 0]
    per_response = np.abs(np.sum((a - b) * mask, axis=1))
    return {
        "token_mean": float(per_token.mean()), "token_p99": float(np.quantile(per_token, 0.99)),
        "token_max": float(per_token.max()),
        "response_mean": float(per_response.mean()), "response_max": float(per_response.max()),
    }


def reference_logprobs(path: Path, rollout: dict, bf16_exact_weights: bool = False) -> np.ndarray:
    """transformers' float64 log-probs of the response tokens, [N, T]: each row alone, unpadded
    (with `bf16_exact_weights`, from the weights rounded to bfloat16 as the model under test)."""
    import torch
    import transformers

    torch.set_num_threads(1)  # 2 shared cores: more threads spin at barriers (bench/RESULTS.md)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    if bf16_exact_weights:
        with torch.no_grad():
            for weight in model.parameters():
                weight.copy_(weight.to(torch.bfloat16).to(torch.float64))
    ids, pmask = np.asarray(rollout["prompt_ids"]), np.asarray(rollout["prompt_mask"])
    rids, rmask = np.asarray(rollout["response_ids"]), np.asarray(rollout["response_mask"])
    out = np.zeros(rids.shape, np.float64)
    for row in range(ids.shape[0]):
        prompt = ids[row][pmask[row] > 0]
        length = int(rmask[row].sum())
        tokens = np.concatenate([prompt, rids[row, :length]])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(tokens[None])).logits[0]
        logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
        out[row, :length] = logp[torch.arange(length), torch.tensor(rids[row, :length])].numpy()
    return out


def score_change(new, old, mask, beta: float) -> np.ndarray:
    """PACS's score per response from two sets of log-probs: beta * sum_t (new - old)."""
    return beta * np.sum((np.asarray(new, np.float64) - np.asarray(old, np.float64)) * mask, axis=1)


def make_loss_forward(graphdefs, algorithm, group_size: int):
    """The per-token log-probs that the PACS loss differentiates, returned from inside
    jax.value_and_grad (the same batch_logprobs + pacs_loss the update's _loss_fn calls)."""

    def loss(params, batch):
        policy = nnx.merge(graphdefs["policy"], params["policy"])
        logprobs, _ = batch_logprobs(policy, batch, 1.0, with_entropy=True)
        value, _ = pacs_loss(
            logprobs, batch["old_logprobs"], batch["response_mask"], batch["rewards"], group_size=group_size,
            beta=algorithm.beta, reward_method=algorithm.reward_method, adv_estimator=algorithm.adv_estimator,
            norm_adv_by_std=algorithm.norm_adv_by_std, weight_mode=algorithm.weight_mode,
        )
        return value, logprobs

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(lambda params, batch: grad_fn(params, batch)[0][1])


def run(args) -> dict:
    if args.dtypes[0] != "float32":
        raise SystemExit("list float32 first in --dtypes: its optimizer step gives the weights 'after'")
    paper = load_config(PAPER_CONFIG)
    algorithm, beta = paper.algorithm, paper.algorithm.beta
    path = smollm2_dir()
    tokenizer = load_tokenizer(str(path))
    ids, mask = pad_prompts(gsm8k_prompts(tokenizer, args.prompts), [128, 256], tokenizer.pad_id)
    group = args.group
    rows = args.prompts * group
    rewards = jnp.asarray(np.arange(rows) % 2 == 0, jnp.float32)
    sampling = SamplingParams(args.new_tokens, temperature=1.0, stop_ids=tuple(tokenizer.eos_ids), pad_id=tokenizer.pad_id)
    optimizer = make_train_optimizer(algorithm, paper.optimizer, total_updates=paper.trainer.total_steps)

    def decoder(dtype):
        model = from_pretrained(path, dtype="float32", compute_dtype=dtype, remat=paper.model.remat)
        if args.bf16_exact_weights:
            # Qwen2.5 ships bfloat16 weights, so its float32 parameters start on the bfloat16 grid;
            # SmolLM2 here is dequantised Q4_1 (21% on the grid, 8% exactly half-way between two points).
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), state)
            model = nnx.merge(graphdef, state)
        return model

    result = {"machine": machine_info(), "args": vars(args), "model": "SmolLM2-135M-Instruct", "beta": beta,
              "lr": paper.optimizer.lr, "remat": paper.model.remat, "rows": rows, "dtypes": {}}
    float32_graphdefs, before, after = None, None, None
    for dtype in args.dtypes:
        start = time.perf_counter()
        graphdefs, state = init_train_state(decoder(dtype), optimizer, with_critic=False)
        if before is None:
            before = state.params
        policy = nnx.merge(graphdefs["policy"], before["policy"])
        out = generate(policy, ids, mask, jax.random.key(args.seed), sampling, group_size=group)
        rollout = {k: getattr(out, k) for k in ROLLOUT_KEYS}
        prepare = make_prepare_fn(graphdefs, algorithm)
        old = prepare(before, None, rollout)["old_logprobs"]
        batch = {**rollout, "rewards": rewards, "old_logprobs": old, "sampler_logprobs": out.logprobs}
        loss_logprobs = make_loss_forward(graphdefs, algorithm, group)(before, batch)
        # The real update at identical weights reading the old-log-prob pass's numbers (as
        # mini-batches 2..k do): its PACS metrics are the score noise through the trainer's own code.
        off_policy = make_update_fn(graphdefs, optimizer, algorithm, group_size=group, mini_batches=1, micro_batches=1,
                                    first_mini_batch_on_policy=False)
        _, update_metrics = off_policy(init_train_state(decoder(dtype), optimizer, False)[1], batch)
        if after is None:
            # One float32 optimizer step on the float32 rollout: the weights "after" for every dtype.
            on_policy = make_update_fn(graphdefs, optimizer, algorithm, group_size=group, mini_batches=1, micro_batches=1)
            after = on_policy(init_train_state(decoder(dtype), optimizer, False)[1], batch)[0].params
            float32_graphdefs = graphdefs
        new = prepare(after, None, rollout)["old_logprobs"]
        response_mask = np.asarray(rollout["response_mask"], np.float64)
        reference = reference_logprobs(path, rollout, args.bf16_exact_weights)
        # The step's signal through float32 on this dtype's responses (identical for float32 itself).
        prepare32 = make_prepare_fn(float32_graphdefs, algorithm)
        signal32 = score_change(prepare32(after, None, rollout)["old_logprobs"], prepare32(before, None, rollout)["old_logprobs"],
                                response_mask, beta)
        signal = score_change(new, old, response_mask, beta)
        noise = score_change(loss_logprobs, old, response_mask, beta)  # 0 where the two passes agree
        sampler = np.asarray(out.logprobs)
        result["dtypes"][dtype] = {
            "response_lengths": np.asarray(out.lengths).tolist(),
            "sampler_vs_prepare": gap_stats(sampler, old, response_mask),
            "sampler_vs_loss": gap_stats(sampler, loss_logprobs, response_mask),
            "prepare_vs_loss": gap_stats(old, loss_logprobs, response_mask),
            "sampler_vs_ref64": gap_stats(sampler, reference, response_mask),
            "prepare_vs_ref64": gap_stats(old, reference, response_mask),
            "loss_vs_ref64": gap_stats(loss_logprobs, reference, response_mask),
            "score_noise": noise.tolist(),
            "score_signal_one_step": signal.tolist(),
            "score_signal_one_step_float32": signal32.tolist(),
            "signal_error_vs_float32": float(np.max(np.abs(signal - signal32))),
            "signal_correlation_with_float32": float(np.corrcoef(signal, signal32)[0, 1]),
            "update_metrics_identical_weights": {k: float(v) for k, v in update_metrics.items()
                                                 if k.startswith(("pacs/", "rollout/"))},
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps({dtype: result["dtypes"][dtype]}, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16-exact-weights", action="store_true",
                        help="round the float32 weights to bfloat16 values first, as a bfloat16 checkpoint (Qwen2.5) loads")
    parser.add_argument("--out", default=str(OUT_DIR / "dtype_drift.json"))
    args = parser.parse_args()
    path = write_json(args.out, run(args))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
