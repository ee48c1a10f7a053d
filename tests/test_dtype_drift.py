"""The numerics the paper configs' compute dtype rests on (docs/algorithms.md "Compute dtype",
bench/dtype_drift.py), on a tiny random Llama against transformers in float64:

- the old-log-prob pass and the forward inside the PACS loss's gradient are the same numbers at
  identical weights, in float32 and in the paper configs' mode (float32 parameters, bfloat16
  compute, remat full), so mini-batches 2..k read no score noise;
- one optimizer step of the paper's (AdamW, lr 1e-6) from a bfloat16 checkpoint (Qwen2.5 ships
  bfloat16 weights) moves PACS's score as float64 says in float32 compute; in bfloat16 compute
  the change is not the step's (a 1e-6 step is below bfloat16's spacing at almost every weight,
  so what moves is the few weights that cross a rounding boundary): the cost docs/algorithms.md weighs.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pacs_jax.algorithms import pacs_loss
from pacs_jax.config import load_config
from pacs_jax.models import from_pretrained, save_pretrained
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import ROLLOUT_KEYS, batch_logprobs, init_train_state, make_prepare_fn, make_train_optimizer, make_update_fn

PAPER = load_config(Path(__file__).resolve().parent.parent / "configs" / "qwen2.5_7b_pacs.yaml")
GROUP = 2
VOCAB = 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Llama saved as a bfloat16-exact float32 HF folder (initializer_range 0.02, as real models)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.02,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.copy_(weight.to(torch.bfloat16).to(torch.float32))
    folder = tmp_path_factory.mktemp("bf16_checkpoint")
    model.save_pretrained(folder)
    return folder


def decoder(folder, compute_dtype):
    return from_pretrained(folder, dtype="float32", compute_dtype=compute_dtype, remat=PAPER.model.remat)


@pytest.fixture(scope="module")
def rollout(checkpoint):
    rng = np.random.default_rng(0)
    ids, mask = pad_prompts([list(rng.integers(3, VOCAB, n)) for n in (5, 9, 7)], [16], 0)
    out = generate(decoder(checkpoint, "float32"), ids, mask, jax.random.key(0),
                   SamplingParams(24, temperature=1.0, stop_ids=(2,)), group_size=GROUP)
    rewards = jnp.asarray(np.arange(6) % 2 == 0, jnp.float32)  # mixed groups: PACS's gradient is non-zero
    return {**{k: getattr(out, k) for k in ROLLOUT_KEYS}, "rewards": rewards}


def float64_logprobs(folder, rollout) -> np.ndarray:
    """transformers in float64, each row alone and unpadded: log pi of every response token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
    prompt_ids, prompt_mask = np.asarray(rollout["prompt_ids"]), np.asarray(rollout["prompt_mask"])
    response_ids, response_mask = np.asarray(rollout["response_ids"]), np.asarray(rollout["response_mask"])
    out = np.zeros(response_ids.shape)
    for row in range(len(prompt_ids)):
        prompt, length = prompt_ids[row][prompt_mask[row] > 0], int(response_mask[row].sum())
        tokens = torch.tensor(np.concatenate([prompt, response_ids[row, :length]])[None])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=tokens).logits[0], dim=-1)[len(prompt) - 1 : -1]
        out[row, :length] = logp[torch.arange(length), torch.tensor(response_ids[row, :length])].numpy()
    return out


def loss_forward_logprobs(graphdefs, params, batch):
    """The log-probs the PACS loss differentiates, taken out of jax.value_and_grad."""
    a = PAPER.algorithm

    def loss(params):
        logprobs, _ = batch_logprobs(nnx.merge(graphdefs["policy"], params["policy"]), batch, 1.0, with_entropy=True)
        value, _ = pacs_loss(logprobs, batch["old_logprobs"], batch["response_mask"], batch["rewards"], group_size=GROUP,
                             beta=a.beta, reward_method=a.reward_method, adv_estimator=a.adv_estimator,
                             norm_adv_by_std=a.norm_adv_by_std, weight_mode=a.weight_mode)
        return value, logprobs

    return np.asarray(jax.jit(jax.value_and_grad(loss, has_aux=True))(params)[0][1])


def optimizer():
    return make_train_optimizer(PAPER.algorithm, PAPER.optimizer, total_updates=10)


@pytest.mark.parametrize("compute_dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_old_logprob_pass_is_the_loss_forward(checkpoint, rollout, compute_dtype, tolerance):
    graphdefs, state = init_train_state(decoder(checkpoint, compute_dtype), optimizer(), with_critic=False)
    old = np.asarray(make_prepare_fn(graphdefs, PAPER.algorithm)(state.params, None, rollout)["old_logprobs"])
    inside_grad = loss_forward_logprobs(graphdefs, state.params, {**rollout, "old_logprobs": old})
    mask = np.asarray(rollout["response_mask"]) > 0
    # The same numbers in both programs (bench/dtype_drift.py: 0 on SmolLM2 in both dtypes).
    assert np.max(np.abs(old - inside_grad)[mask]) <= 1e-5
    # ... and both are the model's: float64 transformers, to the compute dtype's precision.
    assert np.max(np.abs(old - float64_logprobs(checkpoint, rollout))[mask]) <= tolerance


def test_one_lr_1e6_step_is_seen_in_float32_and_lost_in_bfloat16(checkpoint, rollout, tmp_path):
    graphdefs, state = init_train_state(decoder(checkpoint, "float32"), optimizer(), with_critic=False)
    before = jax.tree.map(jnp.copy, state.params)
    prepare = make_prepare_fn(graphdefs, PAPER.algorithm)
    batch = {**rollout, "old_logprobs": prepare(before, None, rollout)["old_logprobs"]}
    update = make_update_fn(graphdefs, optimizer(), PAPER.algorithm, group_size=GROUP, mini_batches=1, micro_batches=1)
    after = update(state, batch)[0].params
    save_pretrained(nnx.merge(graphdefs["policy"], after["policy"]), tmp_path)
    mask = np.asarray(rollout["response_mask"], np.float64)
    beta = PAPER.algorithm.beta

    def score_change(new, old):
        return beta * np.sum((np.asarray(new, np.float64) - np.asarray(old, np.float64)) * mask, axis=1)

    expected = score_change(float64_logprobs(tmp_path, rollout), float64_logprobs(checkpoint, rollout))
    assert np.min(np.abs(expected)) > 1e-3  # the step does move every response's score
    float32 = score_change(prepare(after, None, rollout)["old_logprobs"], batch["old_logprobs"])
    np.testing.assert_allclose(float32, expected, rtol=0.05, atol=1e-4)
    graphdefs16, _ = init_train_state(decoder(checkpoint, "bfloat16"), optimizer(), with_critic=False)
    prepare16 = make_prepare_fn(graphdefs16, PAPER.algorithm)
    bfloat16 = score_change(prepare16(after, None, rollout)["old_logprobs"], prepare16(before, None, rollout)["old_logprobs"])
    # Rounded to bfloat16 inside the forward, almost every weight is where it was: the score
    # change seen is off by more than half the true change's size (measured: wrong sign in half the rows).
    assert np.max(np.abs(bfloat16 - expected)) > 0.5 * np.max(np.abs(expected))
