"""The slot engine (`rollout.engine: slots`, pacs_jax/sampler/slots.py) against the compacting
engine's references: transformers' greedy generate, the static loop's own draws for the same key,
and the sampling distribution (chi-square). Every test has fewer slots than rows, so slots are
refilled: its decode steps exceed the longest response (rows ran one after another)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx
from test_continuous import TINY, assert_greedy_matches_transformers, tiny_llama

from pacs_jax.config import Config, ConfigError, MeshConfig, validate
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.sampler import SamplingParams, generate, pad_prompts, sampling_weights
from pacs_jax.sharding import make_mesh


def assert_refilled(out, slots: int):
    """The slots ran more rows than they hold: more decode steps than the longest response."""
    lengths = np.asarray(out.lengths)
    assert len(lengths) > slots and int(out.decode_steps) > lengths.max(), (int(out.decode_steps), lengths)


@pytest.mark.parametrize("kind,layers", [("llama", "scan"), ("qwen2", "unrolled")])
def test_greedy_matches_transformers_generate(kind, layers, tmp_path):
    out, _ = assert_greedy_matches_transformers(kind, layers, tmp_path, engine="slots", slots=2)
    assert_refilled(out, 2)


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_samples_what_the_static_loop_samples(layers):
    """For one key the slot engine draws the static loop's tokens, log-probs and response masks
    (each row's uniform from its row id and its own step), whatever the slot count; another key
    draws other tokens."""
    model = tiny_llama(seed=3)
    ids, mask = pad_prompts([[4, 5, 6, 7, 8, 9, 10], [9, 10], [11, 12, 13]], [12], 0)
    sampling = dict(temperature=0.8, top_k=30, top_p=0.9, stop_ids=tuple(range(3, 15)), decode_layers=layers)
    static = generate(model, ids, mask, jax.random.key(5), SamplingParams(16, engine="static", **sampling), group_size=4)
    lengths = np.asarray(static.lengths)
    assert lengths.min() < 16 and len(set(lengths.tolist())) > 2, lengths  # rows finished at different steps
    for slots in (1, 4, 16):
        ours = generate(model, ids, mask, jax.random.key(5), SamplingParams(16, engine="slots", slots=slots, **sampling), group_size=4)
        for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(static, field)), err_msg=f"{field} {slots}")
        np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(static.logprobs), atol=1e-5)
        if slots < 12:
            assert_refilled(ours, slots)
        if slots == 1:  # one slot runs the rows one after another
            assert int(ours.decode_steps) == lengths.sum()
    other = generate(model, ids, mask, jax.random.key(6), SamplingParams(16, engine="slots", slots=4, **sampling), group_size=4)
    assert not np.array_equal(np.asarray(other.response_ids), np.asarray(static.response_ids))


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_slots_split_over_the_mesh_with_rows_that_do_not_divide(layers):
    """8 slots on a mesh whose data x fsdp split rows 4 ways, 15 rows (3 prompts x 5 samples, not a
    multiple of 4, passed as host arrays as eval passes them), forced stops at known steps (more
    than 8 rows, so slots are refilled): the lengths are the forced ones and the tokens and
    log-probs the static loop's on one device."""
    from jax.sharding import NamedSharding, PartitionSpec

    model = tiny_llama(seed=2)
    ids, mask = pad_prompts([[4, 5, 6, 7], [9, 10], [11, 12, 13]], [8], 0)
    stop_at = np.random.default_rng(1).integers(0, 24, 15)
    sampling = dict(temperature=1.0, stop_ids=(3, 4), decode_layers=layers)
    static = generate(model, ids, mask, jax.random.key(2), SamplingParams(20, engine="static", **sampling), group_size=5,
                      stop_at=stop_at)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(model)
    split = (graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    with jax.set_mesh(mesh):
        ours = generate(split, ids, mask, jax.random.key(2), SamplingParams(20, engine="slots", slots=8, **sampling), group_size=5,
                        stop_at=stop_at)
        with pytest.raises(ValueError, match=r"rollout.slots=6 must be a multiple of mesh.data x mesh.fsdp = 4"):
            generate(split, ids, mask, jax.random.key(2), SamplingParams(20, engine="slots", slots=6, **sampling), group_size=5)
    np.testing.assert_array_equal(np.asarray(ours.lengths), np.minimum(stop_at + 1, 20))
    for field in ("response_ids", "response_mask", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(static, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(static.logprobs), atol=1e-5)
    assert_refilled(ours, 8)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (8, 0.8)])
def test_sampling_distribution_chi_square(top_k, top_p):
    """Every token the slot engine samples, in every row and step (rows in refilled slots
    included), follows the model's distribution at its context: with F the CDF over ids of
    softmax(logits / T) restricted to top-k and the top-p nucleus, the randomised PIT
    F(t - 1) + V * p(t) (V uniform) of a token t drawn from p is uniform on (0, 1); chi-square over
    10 bins. The distributions come from the training forward pass over the whole sequence, so a
    row decoded over a wrong cache (another row's prompt, stale ring columns) shifts them."""
    config = DecoderConfig.from_hf({**TINY, "vocab_size": 16, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config, seed=5)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0, state))
    rng = np.random.default_rng(2)
    ids, mask = pad_prompts([list(rng.integers(5, 16, rng.integers(1, 5))) for _ in range(48)], [4], 0)
    temperature, new = 0.9, 6
    params = SamplingParams(new, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(3, 4), engine="slots", slots=64)
    out = generate(model, ids, mask, jax.random.key(11), params, group_size=8)
    assert_refilled(out, 64)
    full_ids = np.concatenate([np.asarray(out.prompt_ids), np.asarray(out.response_ids)], axis=1)
    full_mask = np.concatenate([np.asarray(out.prompt_mask), np.asarray(out.response_mask)], axis=1)
    logits = model(jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask))
    prompt_len = ids.shape[1]
    rows, steps = np.nonzero(np.asarray(out.response_mask))
    at = logits[rows, prompt_len + steps - 1] / temperature
    weights = np.asarray(sampling_weights(at, top_k, top_p), np.float64)
    p = weights / weights.sum(axis=1, keepdims=True)
    tokens = full_ids[rows, prompt_len + steps]
    chosen = p[np.arange(len(tokens)), tokens]
    assert (chosen > 0).all()
    below = np.cumsum(p, axis=1)[np.arange(len(tokens)), tokens] - chosen
    pits = below + np.random.default_rng(0).uniform(size=len(tokens)) * chosen
    counts = np.histogram(pits, bins=10, range=(0, 1))[0]
    assert len(pits) > 1000
    stat, p_value = scipy.stats.chisquare(counts)
    assert p_value > 1e-3, (stat, p_value, counts)


def test_slot_config_is_checked_and_passed_to_the_sampler():
    config = Config()
    config.rollout.engine = "slots"
    with pytest.raises(ConfigError, match=r"rollout.slots must be >= 1 with rollout.engine=slots"):
        validate(config)
    config.rollout.slots, config.mesh.data, config.mesh.fsdp = 6, 2, 2
    with pytest.raises(ConfigError, match=r"rollout.slots=6 must be a multiple of mesh.data x mesh.fsdp = 4"):
        validate(config)
    config.rollout.slots = 8
    config.model.path = "an/hf/folder"  # the one other field validate needs
    validate(config)
    params = SamplingParams(4, **config.rollout.engine_options())
    assert params.engine == "slots" and params.slots == 8 and params.engine_on("tpu") == "slots"
    with pytest.raises(ValueError, match="rollout.slots must be >= 1"):
        SamplingParams(4, engine="slots")


@pytest.mark.slow
def test_slot_engine_compiles_each_program_with_the_slots_split_over_the_chips():
    """`python -m pacs_jax compile` with rollout.engine=slots (the tiny TPU config of
    tests/test_compile.py on v5e-4, 256 rows): `_start`, `_decode` at the slot count (with the
    refill inside) and `_finish` compile and fit; decode holds each chip's share of the slot
    cache (32 slots x (prompt + max_new_tokens + 1) columns: an eighth of the static loop's),
    donated, with no copy of it as a temporary (the refill's copies from the bank stay on the
    slot's chip)."""
    from test_compile import GROUP, NEW_TOKENS, PROMPT_LEN, PROMPTS, kv_cache_bytes, tiny_overrides

    from pacs_jax import compile_tpu
    from pacs_jax.config import load_config

    slots, chips = 32, 4
    config = load_config(None, tiny_overrides() + ["rollout.engine=slots", f"rollout.slots={slots}"])
    report = compile_tpu.compile_for_topology(config, compile_tpu.parse_topology("v5e-4"), programs=["rollout"])
    programs = {p.name: p for p in report.programs}
    assert list(programs) == ["rollout _start", f"rollout _decode {slots} slots", "rollout _finish"]
    assert report.model["rollout_engine"] == "slots" and report.model["slots"] == slots and report.fits
    for p in programs.values():
        assert p.fits and not p.error and p.peak_bytes > 0, p.name
    decode = programs[f"rollout _decode {slots} slots"]
    slot_cache = kv_cache_bytes(slots) * (PROMPT_LEN + NEW_TOKENS + 1) // (PROMPT_LEN + NEW_TOKENS)
    assert slot_cache * 8 < kv_cache_bytes(PROMPTS * GROUP) * 1.01  # the static loop's cache, all rows
    assert decode.argument_bytes >= slot_cache / chips and decode.alias_bytes >= slot_cache / chips
    assert decode.temp_bytes < slot_cache / chips, (decode.temp_bytes, slot_cache / chips)
