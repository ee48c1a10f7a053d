"""Each group's prompt run once (pacs_jax.models.shared_prompt, trainer.shared_prompts): the
log-probs equal transformers' on the [prompt + response] rows, and whole updates and old-log-prob
passes equal the per-row path for every algorithm."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from pacs_jax.config import AlgorithmConfig
from pacs_jax.models import DecoderConfig, build_decoder, from_pretrained, init_decoder
from pacs_jax.models.shared_prompt import grouped_response_hidden
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import ROLLOUT_KEYS, batch_logprobs, init_train_state, make_prepare_fn, make_update_fn

VOCAB, GROUP = 89, 3
CONFIG_TINY = DecoderConfig.from_hf(dict(
    model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
))


def grouped_rows(rng, prompt_lengths, bucket, response_len):
    """Left-padded prompts, each repeated GROUP times, and responses of random lengths."""
    prompt_ids, prompt_mask = pad_prompts([list(rng.integers(3, VOCAB, n)) for n in prompt_lengths], [bucket], 0)
    rows = len(prompt_lengths) * GROUP
    lengths = rng.integers(1, response_len + 1, rows)
    response_mask = (np.arange(response_len)[None] < lengths[:, None]).astype(np.int32)
    response_ids = rng.integers(3, VOCAB, (rows, response_len)) * response_mask
    return np.repeat(prompt_ids, GROUP, 0), np.repeat(prompt_mask, GROUP, 0), response_ids, response_mask


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_grouped_logprobs_match_transformers(layers, tmp_path):
    hf_config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype="float32")
    model = build_decoder(dataclasses.replace(loaded.config, train_layers=layers), nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
    prompt_ids, prompt_mask, response_ids, response_mask = grouped_rows(np.random.default_rng(1), [7, 2, 5, 1], 8, 6)

    ids = np.concatenate([prompt_ids, response_ids], 1)
    mask = np.concatenate([prompt_mask, response_mask], 1)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.double()
    prompt_len = prompt_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, prompt_len - 1 : -1] / 0.7, -1)
    expected = torch.gather(logprobs, -1, torch.tensor(response_ids)[..., None])[..., 0].numpy() * response_mask

    batch = {k: jnp.asarray(v, jnp.int32) for k, v in zip(ROLLOUT_KEYS, (prompt_ids, prompt_mask, response_ids, response_mask))}
    ours = np.asarray(batch_logprobs(model, batch, 0.7, group_size=GROUP))
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)


def test_rows_must_be_whole_groups():
    model = init_decoder(CONFIG_TINY)
    ids = jnp.ones((4, 3), jnp.int32)
    with pytest.raises(ValueError, match="not whole groups of 3"):
        grouped_response_hidden(model, ids, ids, ids, ids, GROUP)


# ------------------------------------------------------------------ whole updates, every algorithm

PROMPTS = 4
SGD = optax.multi_transform({"policy": optax.sgd(0.5), "critic": optax.sgd(0.5)}, lambda p: {k: k for k in p})


@pytest.fixture(scope="module")
def rollout():
    """A real rollout: `generate` returns each prompt's GROUP responses as consecutive rows."""
    rng = np.random.default_rng(0)
    ids, mask = pad_prompts([list(rng.integers(3, 61, n)) for n in (3, 6, 1, 5)], [8], 0)
    out = generate(init_decoder(CONFIG_TINY, seed=0), ids, mask, jax.random.key(0),
                   SamplingParams(7, temperature=1.0, stop_ids=(3, 4, 5)), group_size=GROUP)
    return {**{k: getattr(out, k) for k in ROLLOUT_KEYS}, "rewards": jnp.asarray(rng.integers(0, 2, PROMPTS * GROUP), jnp.float32)}


@pytest.mark.parametrize("name", ["pacs", "grpo", "ppo", "rloo"])
def test_update_and_old_logprobs_equal_the_per_row_path(rollout, name, monkeypatch):
    algorithm = AlgorithmConfig(name=name, kl_coef=0.1 if name == "grpo" else 0.0)
    reference = nnx.state(init_decoder(CONFIG_TINY, seed=5)) if name == "grpo" else None
    # Which arm traced the shared-prompt forward: a silent fallback to the per-row path would make
    # both arms equal and this test pass for nothing.
    import pacs_jax.update as update_module

    traced, real_grouped = [], update_module.grouped_response_hidden

    def counting(*args, **kwargs):
        traced.append(shared)
        return real_grouped(*args, **kwargs)

    monkeypatch.setattr(update_module, "grouped_response_hidden", counting)
    results = []
    for shared in (False, True):
        graphdefs, state = init_train_state(init_decoder(CONFIG_TINY, seed=1), SGD, with_critic=name == "ppo")
        prepare = make_prepare_fn(graphdefs, algorithm, chunks=4, on_policy_chunks=2, prompt_group=GROUP if shared else 0)
        extras = prepare(state.params, reference, {k: rollout[k] for k in ROLLOUT_KEYS})
        update = make_update_fn(graphdefs, SGD, algorithm, group_size=GROUP, mini_batches=2, micro_batches=2, shared_prompts=shared)
        state, metrics = update(state, {**rollout, **extras})
        results.append((jax.device_get(extras), jax.device_get(state.params), jax.device_get(metrics)))
    (extras, params, metrics), (shared_extras, shared_params, shared_metrics) = results
    # The shared arm ran the grouped forward in both passes (prepare and update), the per-row arm never.
    assert traced.count(True) >= 2 and False not in traced, traced
    for key in extras:
        np.testing.assert_allclose(shared_extras[key], extras[key], atol=2e-5, rtol=0, err_msg=key)
    assert np.abs(np.asarray(extras["old_logprobs"])).max() > 0.1  # mini-batch 2 was really computed
    for a, b in zip(jax.tree.leaves(shared_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    for key in ("loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(shared_metrics[key], metrics[key], rtol=1e-4, err_msg=key)


def test_group_rows_only_where_they_split_over_the_batch_devices():
    """On a mesh the group rows are used only when they split evenly over data x fsdp; otherwise
    every chip would run the whole micro-batch (the paper 7B config: 8 prompts on 32 chips)."""
    from pacs_jax import sharding
    from pacs_jax.config import MeshConfig
    from pacs_jax.models.shared_prompt import shares_prompts

    assert sharding.traced_batch_ways() == 1
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=4, fsdp=2))):
        assert sharding.traced_batch_ways() == 8
    assert shares_prompts(64, 8, 8) and shares_prompts(64, 8, 1)
    assert not shares_prompts(64, 8, 32)  # 8 group rows on 32 chips
    assert not shares_prompts(64, 1, 1)  # no groups
