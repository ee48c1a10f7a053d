"""The sampler's static engine (engine="static", pacs_jax/sampler/static.py; the compacting engine
has tests/test_continuous.py) against independent references: transformers' greedy generate, a
float64 log-softmax of transformers' logits for the sampled log-probs, the training forward pass,
and the softmax distribution (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from pacs_jax.models import DecoderConfig, from_pretrained, init_decoder
from pacs_jax.sampler import SamplingParams, generate, pad_prompts, sample_token, sampling_weights
from pacs_jax.sampler.static import _generate
from pacs_jax.update import response_logprobs

# Both ways a decode step can run the layers (pacs_jax.sampler.SamplingParams.decode_layers).
LAYER_LOOPS = ["scan", "unrolled"]
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=256)


def hf_tiny(tmp_path, kind):
    if kind == "llama":
        config = transformers.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(1)
    model = cls(config).eval()
    with torch.no_grad():  # larger weights make greedy choices decisive (no near-ties)
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(tmp_path)
    return model


def hf_greedy(model, prompts, max_new_tokens, eos_id, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_id, pad_token_id=pad_id,
        )
    return out[:, width:].numpy()


@pytest.mark.parametrize("layers", LAYER_LOOPS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_transformers_generate(kind, layers, tmp_path):
    """Prompts of 1-12 tokens in a 16 bucket, prefilled in chunks of 4 (the first is padding in
    every row and skipped)."""
    hf_model = hf_tiny(tmp_path, kind)
    model = from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 97, n)) for n in (5, 12, 1, 9)]
    # Pick a stop token that greedy decoding actually emits for some row, so stopping is exercised.
    free_run = hf_greedy(hf_model, prompts, 12, eos_id=None)
    eos_id = int(free_run[1, 4])
    expected = hf_greedy(hf_model, prompts, 12, eos_id=eos_id)
    ids, mask = pad_prompts(prompts, [16, 32], pad_id=0)
    out = generate(model, ids, mask, jax.random.key(0), SamplingParams(12, engine="static", temperature=0.0, stop_ids=(eos_id,), decode_layers=layers, prefill_chunk=4))
    response, response_mask = np.asarray(out.response_ids), np.asarray(out.response_mask)
    for row in range(len(prompts)):
        want = list(expected[row])
        if eos_id in want:
            want = want[: want.index(eos_id) + 1]
        got = list(response[row][response_mask[row] == 1])
        assert got == want, (row, got, want)
        assert int(out.lengths[row]) == len(want)


@pytest.mark.parametrize("layers", LAYER_LOOPS)
def test_logprobs_equal_training_forward(layers):
    config = DecoderConfig.from_hf({**TINY, "model_type": "qwen3", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    model = init_decoder(config, seed=0)
    ids, mask = pad_prompts([[5, 6, 7], [8, 9, 10, 11, 12, 13]], [8], pad_id=0)
    params = SamplingParams(16, engine="static", temperature=0.7, top_k=20, top_p=0.9, stop_ids=(3, 4, 5), decode_layers=layers, prefill_chunk=2)
    out = generate(model, ids, mask, jax.random.key(7), params, group_size=3)
    assert out.response_ids.shape == (6, 16)
    recomputed = response_logprobs(model, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, temperature=0.7)
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(out.logprobs), atol=1e-4)
    assert np.all(np.asarray(out.logprobs)[np.asarray(out.response_mask) == 0] == 0)
    # Every row of a group sampled with its own randomness.
    assert len({tuple(r) for r in np.asarray(out.response_ids)[:3]}) > 1
    grouped = out.by_prompt(3)
    assert grouped.response_ids.shape == (2, 3, 16) and grouped.lengths.shape == (2, 3) and grouped.prompt_ids.shape == (2, 3, 8)
    np.testing.assert_array_equal(np.asarray(grouped.response_ids)[1, 2], np.asarray(out.response_ids)[5])
    np.testing.assert_array_equal(np.asarray(grouped.prompt_ids)[1, 0], ids[1])


def hf_float64_logprobs(hf_model, prompt_ids, prompt_mask, response_ids, response_mask, temperature):
    """log softmax(logits / T) of each response token, from transformers' model in float64 over
    the left-padded prompt and the response (positions count real tokens only)."""
    model = hf_model.to(torch.float64)
    ids = torch.tensor(np.concatenate([prompt_ids, response_ids], axis=1), dtype=torch.long)
    mask = torch.tensor(np.concatenate([prompt_mask, response_mask], axis=1), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    width = prompt_ids.shape[1]
    predicting = logits[:, width - 1 : -1] / temperature  # position i predicts token i + 1
    logprobs = torch.log_softmax(predicting, dim=-1).gather(-1, torch.tensor(response_ids)[..., None].long())[..., 0]
    return logprobs.numpy() * response_mask


@pytest.mark.parametrize("layers", LAYER_LOOPS)
def test_logprobs_match_a_float64_log_softmax_of_transformers_logits(layers, tmp_path):
    """The sampler's log-probs are those of softmax(logits / T), before top-k / top-p truncation,
    for prompts of different lengths (chunked prefill) and G responses each."""
    hf_model = hf_tiny(tmp_path, "qwen2")
    model = from_pretrained(tmp_path)
    ids, mask = pad_prompts([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]], [12], pad_id=0)
    temperature = 0.7
    params = SamplingParams(10, engine="static", temperature=temperature, top_k=20, top_p=0.9, stop_ids=(3,), decode_layers=layers, prefill_chunk=4)
    out = generate(model, ids, mask, jax.random.key(3), params, group_size=3)
    response_mask = np.asarray(out.response_mask)
    assert response_mask.sum() > 20
    expected = hf_float64_logprobs(hf_model, np.asarray(out.prompt_ids), np.asarray(out.prompt_mask),
                                   np.asarray(out.response_ids), response_mask, temperature)
    got = np.asarray(out.logprobs)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    # Truncation did not renormalise them: top-p 0.9 would push some log-probs up to 0.
    assert np.all(got[response_mask == 1] < 0)
    assert np.all(got[response_mask == 0] == 0)


def test_response_mask_ends_at_first_stop_token():
    """Half the vocabulary are stop ids, so every row stops (the chance a row of 24 tokens misses
    all of them is ~2^-24, and the seed is fixed): each row's first stop token ends its mask."""
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config)
    ids, mask = pad_prompts([[1, 2, 3]] * 4, [4], 0)
    stops = tuple(range(10, 10 + TINY["vocab_size"] // 2))
    out = generate(model, ids, mask, jax.random.key(1), SamplingParams(24, engine="static", temperature=1.0, stop_ids=stops, pad_id=0), group_size=2)
    first_stops = []
    for row, row_mask, length in zip(np.asarray(out.response_ids), np.asarray(out.response_mask), np.asarray(out.lengths)):
        hits = [i for i, t in enumerate(row) if t in stops]
        assert hits, f"row {row} sampled no stop token"
        first = hits[0]
        first_stops.append(int(row[first]))
        assert length == first + 1
        assert row_mask[: first + 1].all() and not row_mask[first + 1 :].any()
        assert (row[first + 1 :] == 0).all()  # pad after the stop
    assert len(set(first_stops)) > 1  # several stop ids, each one honoured
    assert int(out.decode_steps) <= max(int(n) for n in np.asarray(out.lengths)) < 24  # stopped early


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.8)])
def test_sampling_distribution_chi_square(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, 16).astype(np.float32)
    temperature = 0.8
    params = SamplingParams(1, temperature=temperature, top_k=top_k, top_p=top_p)
    draws = 20000
    keys = jax.random.split(jax.random.key(123), draws)
    tokens = jax.vmap(lambda k: sample_token(jnp.asarray(logits)[None], k, params)[0][0])(keys)
    counts = np.bincount(np.asarray(tokens), minlength=16)
    # Reference in float64 NumPy: softmax(logits / T) restricted to top-k, then the top-p nucleus.
    probs = np.exp(logits.astype(np.float64) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros(16, bool)
    keep[order[: top_k or 16]] = True
    probs_k = np.where(keep, probs, 0)
    probs_k /= probs_k.sum()
    mass = 0.0
    nucleus = np.zeros(16, bool)
    for idx in np.argsort(-probs_k):
        if mass < top_p and probs_k[idx] > 0:
            nucleus[idx] = True
        mass += probs_k[idx]
    expected = np.where(nucleus, probs_k, 0)
    expected /= expected.sum()
    assert counts[~nucleus].sum() == 0
    stat, p_value = scipy.stats.chisquare(counts[nucleus], expected[nucleus] * draws)
    assert p_value > 1e-3, (stat, p_value)


def test_sampling_weights_keep_top_token_even_when_p_is_tiny():
    logits = jnp.asarray([[3.0, 1.0, 0.5, -1.0]])
    kept = np.asarray(sampling_weights(logits, 0, 0.01)) > 0
    assert kept.tolist() == [[True, False, False, False]]


def nucleus_reference(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The kept set by sorting, in float64: top-k, then tokens whose mass before them < top_p."""
    probs = np.exp(logits.astype(np.float64) - logits.max())
    order = np.argsort(-probs)
    keep = np.zeros(len(probs), bool)
    keep[order[: top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
    sorted_probs = probs[order]
    before = np.cumsum(sorted_probs) - sorted_probs
    nucleus = np.zeros(len(probs), bool)
    nucleus[order[(before < top_p) & (sorted_probs > 0)]] = True
    return nucleus


def test_sampling_weights_match_a_sorted_float64_nucleus_on_a_large_vocabulary():
    rng = np.random.default_rng(7)
    rows, vocab = 64, 5000
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    for top_k, top_p in [(40, 1.0), (0, 0.9), (0, 0.5), (300, 0.95), (1, 1.0), (vocab, 0.3)]:
        weights = np.asarray(sampling_weights(jnp.asarray(logits), top_k, top_p))
        for row in range(rows):
            expected = nucleus_reference(logits[row], top_k, top_p)
            np.testing.assert_array_equal(weights[row] > 0, expected, err_msg=f"top_k={top_k} top_p={top_p} row={row}")
        # Kept tokens keep their unnormalised softmax weight exactly.
        full = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(weights[weights > 0], full[weights > 0], rtol=1e-6)


@pytest.mark.parametrize("layers", LAYER_LOOPS)
def test_early_stop_runs_fewer_iterations(layers):
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config, seed=2)
    ids, mask = pad_prompts([[4, 5, 6], [7, 8]], [8], 0)
    free = generate(model, ids, mask, jax.random.key(0), SamplingParams(20, engine="static", temperature=0.0, decode_layers=layers))
    assert int(free.decode_steps) == 20
    # Stop on the tokens greedy decoding emits at step 3: every row is done after 4 iterations.
    stops = tuple(int(t) for t in np.asarray(free.response_ids)[:, 3])
    early = generate(model, ids, mask, jax.random.key(0), SamplingParams(20, engine="static", temperature=0.0, stop_ids=stops, decode_layers=layers))
    assert int(early.decode_steps) <= 4
    assert np.asarray(early.lengths).max() <= 4


def test_no_recompile_within_a_bucket():
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config)
    params = SamplingParams(4, engine="static", temperature=1.0, stop_ids=(2,))
    rng = np.random.default_rng(0)
    before = _generate._cache_size()
    for step, lengths in enumerate([(3, 7), (12, 1), (16, 16), (5, 9)]):
        ids, mask = pad_prompts([list(rng.integers(3, 97, n)) for n in lengths], [16, 32], 0)
        generate(model, ids, mask, jax.random.fold_in(jax.random.key(0), step), params, group_size=2)
    assert _generate._cache_size() - before == 1
    ids, mask = pad_prompts([list(range(3, 20)), [5]], [16, 32], 0)  # 17 tokens: the next bucket
    generate(model, ids, mask, jax.random.key(1), params, group_size=2)
    assert _generate._cache_size() - before == 2


@pytest.mark.parametrize("layers", LAYER_LOOPS)
def test_bfloat16_sampling_runs(layers):
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4}, param_dtype="bfloat16", compute_dtype="bfloat16")
    model = init_decoder(config)
    ids, mask = pad_prompts([[4, 5, 6]], [8], 0)
    out = generate(model, ids, mask, jax.random.key(0), SamplingParams(6, engine="static", temperature=1.0, decode_layers=layers), group_size=2)
    assert out.response_ids.shape == (2, 6) and np.isfinite(np.asarray(out.logprobs)).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p must be in"),
        (dict(max_new_tokens=4, top_p=1.5), "top_p must be in"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature must be >= 0"),
        (dict(max_new_tokens=4, decode_segments=0), "decode_segments must be >= 1"),
        (dict(max_new_tokens=4, decode_layers="unroll"), "decode_layers must be one of"),
        (dict(max_new_tokens=4, prefill_chunk=-1), "prefill_chunk must be >= 0"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_group_size_and_overlong_prompt():
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config)
    ids, mask = pad_prompts([[4, 5]], [8], 0)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        generate(model, ids, mask, jax.random.key(0), SamplingParams(2), group_size=0)
    with pytest.raises(ValueError, match="longer than the largest bucket 8"):
        pad_prompts([list(range(9))], [4, 8], 0)


def test_segment_ends_cover_every_step_once():
    assert SamplingParams(10, decode_segments=4, min_segment_steps=1).segment_ends() == [3, 5, 8, 10]
    assert SamplingParams(3, decode_segments=8, min_segment_steps=1).segment_ends() == [1, 2, 3]
    assert SamplingParams(7, decode_segments=1).segment_ends() == [7]
    # By default no segment is shorter than 64 steps (each one is compiled on its own).
    assert SamplingParams(64, decode_segments=4).segment_ends() == [64]
    assert SamplingParams(128, decode_segments=4).segment_ends() == [64, 128]
    assert SamplingParams(12, decode_segments=4).segment_ends() == [12]
    assert SamplingParams(4096, decode_segments=4).segment_ends() == [1024, 2048, 3072, 4096]


def test_decode_layers_auto_unrolls_on_cpu_only():
    auto = SamplingParams(4)
    assert auto.unrolls_layers("cpu") and not auto.unrolls_layers("tpu") and not auto.unrolls_layers("gpu")
    assert SamplingParams(4, decode_layers="unrolled").unrolls_layers("tpu")
    assert not SamplingParams(4, decode_layers="scan").unrolls_layers("cpu")


def test_decode_segments_layer_loops_and_prefill_chunks_change_nothing_but_the_work_done():
    """Every way of running the sampler (1, 3 or 13 decode segments; scanned or unrolled layers;
    a prefill in one pass or in chunks of 4, where the longest prompt leaves the first chunk all
    padding) samples the same greedy tokens with the same log-probs."""
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config, seed=3)
    ids, mask = pad_prompts([[4, 5, 6, 7, 8, 9, 10], [9, 10], [11, 12, 13]], [12], 0)
    # Each value of each setting appears (with both loops: chunked and not, several segments).
    variants = [dict(decode_segments=n, min_segment_steps=1, decode_layers=layers, prefill_chunk=chunk)
                for n, layers, chunk in [(1, "scan", 0), (3, "scan", 4), (13, "scan", 0), (1, "unrolled", 4), (3, "unrolled", 0), (13, "unrolled", 4)]]
    outs = [generate(model, ids, mask, jax.random.key(0), SamplingParams(13, engine="static", temperature=0.0, **v), group_size=2) for v in variants]
    for variant, out in zip(variants[1:], outs[1:]):
        np.testing.assert_array_equal(np.asarray(out.response_ids), np.asarray(outs[0].response_ids), err_msg=str(variant))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(outs[0].logprobs), atol=1e-5, err_msg=str(variant))


def test_prefill_in_length_sorted_row_groups_matches_one_pass():
    """16 prompts of 1-16 tokens: the unrolled sampler prefills them sorted by length in two
    groups of 8, each from its own first chunk of 4, and must sample what a one-pass prefill
    with the scanned layers samples, row for row."""
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config, seed=4)
    rng = np.random.default_rng(3)
    lengths = rng.permutation(np.arange(1, 17))
    ids, mask = pad_prompts([list(rng.integers(3, 97, n)) for n in lengths], [16], 0)
    grouped = generate(model, ids, mask, jax.random.key(0), SamplingParams(6, engine="static", temperature=0.0, decode_layers="unrolled", prefill_chunk=4))
    one_pass = generate(model, ids, mask, jax.random.key(0), SamplingParams(6, engine="static", temperature=0.0, decode_layers="scan", prefill_chunk=0))
    np.testing.assert_array_equal(np.asarray(grouped.response_ids), np.asarray(one_pass.response_ids))
    np.testing.assert_allclose(np.asarray(grouped.logprobs), np.asarray(one_pass.logprobs), atol=1e-5)
