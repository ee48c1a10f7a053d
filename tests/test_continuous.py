"""The compacting decode engine (`rollout.engine: compact`, pacs_jax/sampler/compact.py) against the same
references as the static sampler: transformers' greedy generate, the static sampler's own draws
for the same key, and the sampling distribution (chi-square). Every test makes the running batch
shrink (buckets of one row, a compaction check every step or two)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx

from pacs_jax.config import Config, ConfigError, MeshConfig, validate
from pacs_jax.models import DecoderConfig, from_pretrained, init_decoder
from pacs_jax.sampler import SamplingParams, compact, generate, pad_prompts, sampling_weights
from pacs_jax.sharding import make_mesh

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=256)


def tiny_llama(seed: int):
    return init_decoder(DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_attention_heads": 4}), seed=seed)


@pytest.fixture
def regroups(monkeypatch):
    """The row counts the engine compacted to, in order."""
    seen = []
    original = compact._regroup

    def spy(loop, out, *, rows, slots):
        seen.append(rows)
        return original(loop, out, rows=rows, slots=slots)

    monkeypatch.setattr(compact, "_regroup", spy)
    return seen


def compacting(**kwargs) -> dict:
    """Settings under which the running batch shrinks as soon as one row finishes."""
    return dict(engine="compact", compact_every=2, compact_buckets=1024, compact_max_keep=1.0, **kwargs)


@pytest.fixture
def decode_rows(monkeypatch):
    """The running batch's row count at each decode call, in order."""
    seen = []
    original = compact._decode

    def spy(graphdef, state, layers, loop, *args, **kwargs):
        seen.append(loop.done.shape[0])
        return original(graphdef, state, layers, loop, *args, **kwargs)

    monkeypatch.setattr(compact, "_decode", spy)
    return seen


def assert_greedy_matches_transformers(kind: str, layers: str, tmp_path, **engine_options):
    """Greedy decoding with `engine_options` equals transformers' greedy generate, row by row, with
    stop tokens that rows emit at different steps (so rows finish at different times). Returns the
    rollout and the number of prompts, for the engine's own checks."""
    torch.manual_seed(1)
    if kind == "llama":
        config = transformers.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        hf_model = transformers.LlamaForCausalLM(config).eval()
    else:
        config = transformers.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
        hf_model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # larger weights make greedy choices decisive (no near-ties)
        for p in hf_model.parameters():
            p.mul_(3.0)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 97, n)) for n in (5, 12, 1, 9, 3, 7)]
    ids, mask = pad_prompts(prompts, [16], pad_id=0)

    def hf_greedy(eos_id):
        with torch.no_grad():
            out = hf_model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                                    max_new_tokens=12, do_sample=False, eos_token_id=eos_id, pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()

    free_run = hf_greedy(None)
    stops = tuple(sorted({int(free_run[1, 2]), int(free_run[3, 6])}))
    expected = hf_greedy(list(stops))
    params = SamplingParams(12, temperature=0.0, stop_ids=stops, decode_layers=layers, prefill_chunk=4, **engine_options)
    out = generate(model, ids, mask, jax.random.key(0), params)
    response, response_mask = np.asarray(out.response_ids), np.asarray(out.response_mask)
    for row in range(len(prompts)):
        want = list(expected[row])
        hits = [i for i, t in enumerate(want) if t in stops]
        if hits:
            want = want[: hits[0] + 1]
        got = list(response[row][response_mask[row] == 1])
        assert got == want, (row, got, want)
        assert int(out.lengths[row]) == len(want)
    return out, len(prompts)


@pytest.mark.parametrize("kind,layers", [("llama", "scan"), ("qwen2", "unrolled")])
def test_greedy_matches_transformers_generate(kind, layers, tmp_path, regroups):
    _, prompts = assert_greedy_matches_transformers(kind, layers, tmp_path, decode_segments=3, min_segment_steps=1, **compacting())
    assert regroups and regroups[-1] < prompts, regroups


@pytest.mark.slow
@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_samples_what_the_static_sampler_samples(layers, regroups):
    """For one key both engines draw the same tokens with the same log-probs and response masks
    (each row takes the uniform drawn for its place in the full batch), and the rows of a group
    stay contiguous."""
    model = tiny_llama(seed=3)
    ids, mask = pad_prompts([[4, 5, 6, 7, 8, 9, 10], [9, 10], [11, 12, 13]], [12], 0)
    sampling = dict(temperature=0.8, top_k=30, top_p=0.9, stop_ids=tuple(range(3, 15)), decode_layers=layers, decode_segments=3, min_segment_steps=1)
    static = generate(model, ids, mask, jax.random.key(5), SamplingParams(16, engine="static", **sampling), group_size=4)
    ours = generate(model, ids, mask, jax.random.key(5), SamplingParams(16, **sampling, **compacting()), group_size=4)
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "lengths", "decode_steps"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(static, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(static.logprobs), atol=1e-5)
    lengths = np.asarray(ours.lengths)
    assert lengths.min() < 16 and len(set(lengths.tolist())) > 2, lengths  # rows finished at different steps
    assert regroups and regroups[-1] < 12, regroups
    again = generate(model, ids, mask, jax.random.key(5), SamplingParams(16, **sampling, **compacting()), group_size=4)
    np.testing.assert_array_equal(np.asarray(again.response_ids), np.asarray(ours.response_ids))
    other = generate(model, ids, mask, jax.random.key(6), SamplingParams(16, **sampling, **compacting()), group_size=4)
    assert not np.array_equal(np.asarray(other.response_ids), np.asarray(ours.response_ids))


def test_rows_split_over_devices_compact_within_their_blocks(regroups):
    """Under a mesh whose data x fsdp axes split the rows 4 ways (as in the trainer), each device's
    block of rows is compacted within itself (every batch a multiple of 4 rows) and the tokens,
    log-probs and lengths are still the static loop's on one device."""
    from jax.sharding import NamedSharding, PartitionSpec

    model = tiny_llama(seed=3)
    ids, mask = pad_prompts([[4, 5, 6, 7, 8, 9, 10], [9, 10], [11, 12, 13], [20, 21, 22, 23]], [12], 0)
    sampling = dict(temperature=0.8, top_k=30, stop_ids=tuple(range(3, 15)), decode_layers="scan", decode_segments=2, min_segment_steps=1)
    static = generate(model, ids, mask, jax.random.key(5), SamplingParams(16, engine="static", **sampling), group_size=4)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(model)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        ours = generate((graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec()))), jax.device_put(ids, rows),
                        jax.device_put(mask, rows), jax.random.key(5), SamplingParams(16, **sampling, **compacting()), group_size=4)
    for field in ("response_ids", "response_mask", "lengths", "decode_steps"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(static, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(static.logprobs), atol=1e-5)
    assert len(set(np.asarray(static.lengths).tolist())) > 2, static.lengths  # rows finished at different steps
    assert regroups and all(rows % 4 == 0 for rows in regroups) and regroups[-1] < 16, regroups


def test_rows_that_do_not_divide_over_the_mesh(regroups):
    """90 rows (a validation batch of eval.prompts_per_batch=30 at 3 samples, as eval passes it:
    host arrays) on mesh.data=4 with every engine default. The running batch is padded to 92 rows
    (4 blocks of 23) and compacts within its blocks to multiples of 8 (the quantum ceil(92 / 16)
    = 6, rounded up to the 4 blocks). Forced stops: 66 rows stop in the first chunk of 32 steps,
    20 in the second, 4 (one per block) run to the cap; the engine once regrouped these 90 -> 24
    -> 6 rows and raised at 6 (not a multiple of the 4 blocks of the 24-row batch). Tokens,
    log-probs and lengths are the static engine's on the same mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    model = tiny_llama(seed=3)
    rng = np.random.default_rng(4)
    ids, mask = pad_prompts([list(rng.integers(5, 97, rng.integers(1, 9))) for _ in range(30)], [8], 0)
    rows, new_tokens, blocks = 90, 96, 4
    live_after_32 = np.array([int(k * rows / 24) + 1 for k in range(24)])  # spread over the rows
    long_rows = live_after_32[[2, 8, 14, 20]]  # one in each block of 23 rows, and of 6 among these 24
    stop_at = rng.integers(0, 32, rows)
    stop_at[live_after_32] = rng.integers(32, 64, 24)
    stop_at[long_rows] = 1000  # never: clipped at the cap
    assert sorted(long_rows // 23) == [0, 1, 2, 3]
    sampling = dict(temperature=1.0, stop_ids=(3, 4))
    mesh = make_mesh(MeshConfig(data=blocks, fsdp=1, tensor=2))
    graphdef, state = nnx.split(model)
    split = (graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    with jax.set_mesh(mesh):
        outs = {engine: generate(split, ids, mask, jax.random.key(9), SamplingParams(new_tokens, engine=engine, **sampling),
                                 group_size=3, stop_at=stop_at) for engine in ("static", "compact")}
    # The first call grows the unrolled decode's caches to the segment's slots; then, after 32
    # steps, the bucket of 4 x the most live rows in a block of 23; after 64, one row per block.
    first = -(-blocks * max(np.sum(live_after_32 // 23 == b) for b in range(blocks)) // 8) * 8
    assert first <= 0.4 * 92 and 8 <= 0.4 * first
    assert regroups == [92, first, 8]
    for field in ("response_ids", "response_mask", "lengths", "decode_steps"):
        np.testing.assert_array_equal(np.asarray(getattr(outs["compact"], field)), np.asarray(getattr(outs["static"], field)),
                                      err_msg=field)
    np.testing.assert_allclose(np.asarray(outs["compact"].logprobs), np.asarray(outs["static"].logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(outs["static"].lengths), np.minimum(stop_at + 1, new_tokens))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (8, 0.8)])
def test_sampling_distribution_chi_square(top_k, top_p, regroups):
    """Every token the engine samples, in every row and step (after compactions), follows the
    model's distribution at its context: with F the CDF over ids of softmax(logits / T) restricted
    to top-k and the top-p nucleus, the randomised PIT F(t - 1) + V * p(t) (V uniform) of a token t
    drawn from p is uniform on (0, 1), independently across steps; chi-square over 10 bins.
    (A row decoded with another row's cache after a compaction is caught by the exact comparison
    with the static loop above, not here: these tiny models' distributions barely depend on the
    context beyond the last token.)"""
    config = DecoderConfig.from_hf({**TINY, "vocab_size": 16, "model_type": "llama", "num_attention_heads": 4})
    model = init_decoder(config, seed=5)
    # Larger weights give peaked distributions. (At x4 one of the two cases failed, p = 4e-11, with
    # excess at both ends of the PIT; not investigated: possibly float32 differences between the
    # cached decode and the training forward at very large logits.)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0, state))
    rng = np.random.default_rng(2)
    ids, mask = pad_prompts([list(rng.integers(5, 16, rng.integers(1, 5))) for _ in range(48)], [4], 0)
    temperature, new = 0.9, 6
    params = SamplingParams(new, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(3, 4), **compacting())
    out = generate(model, ids, mask, jax.random.key(11), params, group_size=8)
    assert regroups and regroups[-1] < 384, regroups
    full_ids = np.concatenate([np.asarray(out.prompt_ids), np.asarray(out.response_ids)], axis=1)
    full_mask = np.concatenate([np.asarray(out.prompt_mask), np.asarray(out.response_mask)], axis=1)
    logits = model(jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask))
    prompt_len = ids.shape[1]
    # The distribution each response token was drawn from: logits at the position before it.
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


def test_forced_lengths_in_both_engines():
    """bench/rollout_lengths.py's `stop_at`: each row stops exactly at its step (a stop token
    sampled elsewhere is replaced by padding), in both engines."""
    model = tiny_llama(seed=1)
    ids, mask = pad_prompts([[4, 5, 6], [7, 8]], [4], 0)
    stop_at = np.array([0, 3, 9, 20, 5, 1])  # 20 = never: the row is clipped at 10
    for engine in ("static", "compact"):
        params = SamplingParams(10, temperature=1.0, stop_ids=(3, 4, 5), engine=engine, compact_every=1, compact_buckets=6)
        out = generate(model, ids, mask, jax.random.key(0), params, group_size=3, stop_at=stop_at)
        np.testing.assert_array_equal(np.asarray(out.lengths), [1, 4, 10, 10, 6, 2], err_msg=engine)
    with pytest.raises(ValueError, match="pad_id that is not one"):
        generate(model, ids, mask, jax.random.key(0), SamplingParams(4, stop_ids=(0,)), stop_at=np.zeros(2))


@pytest.mark.parametrize("layered", [False, True])
@pytest.mark.parametrize("devices", [1, 8])
def test_regroup_holds_the_two_caches_and_at_most_one_layer_more(layered, devices):
    """Compaction's memory, from XLA's analysis of the compiled `_regroup` (stacked cache: the scan
    decode, as on TPU; per-layer: the unrolled CPU decode), per device: the old cache (argument)
    and the new one (output) are live together, since an array cannot shrink in place; anything
    beyond them is at most one layer's keys and values of the kept rows. With the rows split over
    8 devices (as the trainer places them), each device holds its share of both caches: a gather
    across devices gave every device all the kept rows (output 8x) and a copy of them. (Gathering
    the stacked cache at once built half the new cache as a temporary: two layers' worth here.)"""
    from bench.rollout_lengths import regroup_memory

    layers, kv_heads, head_dim, vocab = 4, 2, 16, 97
    config = DecoderConfig.from_hf({**TINY, "model_type": "llama", "num_hidden_layers": layers, "num_attention_heads": 4,
                                    "num_key_value_heads": kv_heads})
    rows, keep, prompt_len, new = 32, 16, 8, 24
    mesh = None if devices == 1 else make_mesh(MeshConfig(data=2, fsdp=4), jax.devices()[:devices])
    memory = regroup_memory(config, rows, keep, prompt_len, new, layered, mesh)
    slots = prompt_len + new
    row_bytes = 2 * layers * kv_heads * head_dim * slots * 4  # keys and values of one row, float32
    # The rest of the state per row: logits, cache mask, done, row id, response and log-probs
    # (running and written-out copies).
    small_row_bytes = vocab * 4 + slots * 4 + 1 + 4 + 4 * new * 4
    one_layer = 2 * keep // devices * kv_heads * head_dim * slots * 4
    assert memory["cache_old"] == rows // devices * row_bytes and memory["cache_new"] == keep // devices * row_bytes
    assert memory["temp"] <= one_layer, memory
    assert memory["peak"] <= (rows + keep) // devices * (row_bytes + small_row_bytes) + one_layer, memory


@pytest.mark.parametrize("max_keep", [1.0, 0.5, 0.3])
def test_regroups_keep_at_most_max_keep_of_the_running_rows(max_keep, decode_rows):
    """rollout.compact_max_keep: with forced stops (rows leave at known steps), the row count of
    every decode call (one per step) is the closed form: at step s the live rows are those whose
    stop is at step >= s, their bucket is the next multiple of 32 / 16 = 2, and the batch moves
    to it only when it keeps at most max_keep x the running rows. Tokens are the static loop's."""
    model = tiny_llama(seed=2)
    ids, mask = pad_prompts([[4 + i, 5, 6] for i in range(8)], [4], 0)
    total, new_tokens = 32, 16
    stop_at = np.random.default_rng(0).permutation(np.arange(total) // 2)  # 2 rows stop at each step 0..15
    params = dict(temperature=1.0, stop_ids=(3, 4, 5), decode_layers="scan")
    static = generate(model, ids, mask, jax.random.key(1), SamplingParams(new_tokens, engine="static", **params), group_size=4,
                      stop_at=stop_at)
    ours = generate(model, ids, mask, jax.random.key(1), SamplingParams(
        new_tokens, **params, engine="compact", compact_every=1, compact_buckets=16, compact_max_keep=max_keep),
        group_size=4, stop_at=stop_at)
    expected, rows = [], total
    for step in range(new_tokens):
        live = int(np.sum(stop_at >= step))
        bucket = -(-live // 2) * 2
        if bucket <= max_keep * rows:
            rows = bucket
        expected.append(rows)
    assert decode_rows == expected
    assert all(new == old or new <= max_keep * old for old, new in zip(decode_rows, decode_rows[1:]))
    assert len(set(decode_rows)) > 2, decode_rows  # it did compact, more than once
    for field in ("response_ids", "response_mask", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(static, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(static.logprobs), atol=1e-5)


def test_largest_regroup_is_the_largest_bucket_max_keep_allows():
    """The compile check's worst regroup, from all rows: the largest multiple of the bucket
    quantum that is below the row count and at most max_keep of it (none below the quantum)."""
    for max_keep, largest in ((1.0, 7680), (0.5, 4096), (0.45, 3584), (0.4, 3072), (0.0625, 512), (0.06, 8192)):
        params = SamplingParams(4, compact_buckets=16, compact_max_keep=max_keep)
        assert compact.largest_regroup(8192, params, shards=64) == largest, max_keep
    assert compact.largest_regroup(64, SamplingParams(4, compact_buckets=1, compact_max_keep=1.0)) == 64  # never compacts


def test_bucket_rows():
    assert [compact.bucket_rows(n, 64, 16) for n in (64, 63, 60, 33, 5, 4, 1)] == [64, 64, 60, 36, 8, 4, 4]
    assert compact.bucket_rows(3, 64, 1) == 64  # one bucket: never compacts
    assert compact.bucket_rows(3, 10, 4) == 3 and compact.bucket_rows(10, 10, 4) == 10  # quantum 3, capped at 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(engine="paged"), "rollout.engine must be one of"),
        (dict(compact_every=0), "rollout.compact_every must be >= 1"),
        (dict(compact_buckets=0), "rollout.compact_buckets must be >= 1"),
        (dict(compact_max_keep=0.0), r"rollout.compact_max_keep must be in \(0, 1\]"),
        (dict(compact_max_keep=1.5), r"rollout.compact_max_keep must be in \(0, 1\]"),
    ],
)
def test_bad_engine_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(4, **kwargs)


@pytest.mark.parametrize(
    "key,value,match",
    [("engine", "paged", "rollout.engine must be"), ("compact_every", 0, "rollout.compact_every must be >= 1"),
     ("compact_buckets", -1, "rollout.compact_buckets must be >= 1"),
     ("compact_max_keep", 0, r"rollout.compact_max_keep must be in \(0, 1\]"),
     ("compact_max_keep", 1.01, r"rollout.compact_max_keep must be in \(0, 1\]"),
     ("compact_max_keep", "half", r"rollout.compact_max_keep must be in \(0, 1\]")],
)
def test_bad_engine_config_names_the_field(key, value, match):
    config = Config()
    setattr(config.rollout, key, value)
    with pytest.raises(ConfigError, match=match):
        validate(config)
    assert Config().rollout.engine_options()["engine"] == Config().rollout.engine
    rollout = Config().rollout
    rollout.compact_max_keep = 0.25
    assert SamplingParams(4, **rollout.engine_options()).compact_max_keep == 0.25
    assert SamplingParams(4).compact_max_keep == Config().rollout.compact_max_keep  # one default


@pytest.mark.slow
def test_trainer_steps_equal_with_either_engine(tmp_path, regroups):
    """The trainer samples through `rollout.engine` on the sharded path (8 virtual devices): a step
    with the compacting engine scores, measures and updates exactly as one with the static loop.
    64 rows (8 per device) and 96 new tokens of an untrained model (its stop token has
    probability ~1/128 per step): the running batch compacts once every device holds a finished
    row (to 56 rows or fewer: buckets of 8, one row per device)."""
    from test_train import read_metrics, tiny_config  # tests/test_train.py's tiny arithmetic run

    from pacs_jax.train import train

    records = {}
    for engine in ("static", "compact"):
        config = tiny_config(tmp_path / engine, "trainer.total_steps=1", f"rollout.engine={engine}", "trainer.prompts_per_step=32",
                             "rollout.max_new_tokens=96", "rollout.compact_every=1", "rollout.compact_buckets=16",
                             "rollout.compact_max_keep=1.0", "rollout.temperature=1.5")
        train(config)
        records[engine] = read_metrics(tmp_path / engine)[-1]
    assert regroups and min(regroups) < 64, regroups  # it compacted (the first calls only grow the caches)
    assert records["static"]["response_length/mean"] < 96  # rows stopped early
    for key in ("reward/mean", "response_length/mean", "response_length/max", "loss", "grad_norm"):
        assert records["compact"][key] == pytest.approx(records["static"][key], rel=1e-4, abs=1e-6), key


def test_engine_auto_compacts_on_cpu_only():
    auto = SamplingParams(4, engine="auto")
    assert auto.compacts("cpu") and not auto.compacts("tpu") and not auto.compacts("gpu")
    assert SamplingParams(4, engine="compact").compacts("tpu") and not SamplingParams(4, engine="static").compacts("cpu")
    # The library's default is the trainer's.
    assert SamplingParams(4).engine == Config().rollout.engine == "auto"


@pytest.mark.slow
@pytest.mark.smollm2
def test_real_smollm2_greedy_equals_the_static_loop(smollm2_path, regroups):
    """The real SmolLM2-135M-Instruct (whose static greedy decode test_smollm2.py holds to
    transformers): three chat prompts, greedy, the compacting engine with a stop id that one row
    emits early, so it leaves the batch; same tokens as the static loop."""
    from pacs_jax.models.smollm2 import STOP_TOKEN
    from pacs_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_path))
    model = from_pretrained(smollm2_path, dtype="float32")
    prompts = [tokenizer.encode(tokenizer.chat_prompt(q)) for q in ("What is 2 + 3?", "Name a prime number larger than 10.", "Say hi.")]
    ids, mask = pad_prompts(prompts, [64], pad_id=tokenizer.pad_id)
    (stop_id,) = tokenizer.encode(STOP_TOKEN)
    free = generate(model, ids, mask, jax.random.key(0), SamplingParams(12, engine="static", temperature=0.0, stop_ids=(stop_id,)))
    stops = (stop_id, int(np.asarray(free.response_ids)[0, 3]))  # row 0 stops by step 3
    static = generate(model, ids, mask, jax.random.key(0), SamplingParams(12, engine="static", temperature=0.0, stop_ids=stops,
                                                                          pad_id=tokenizer.pad_id))
    ours = generate(model, ids, mask, jax.random.key(0), SamplingParams(12, temperature=0.0, stop_ids=stops, pad_id=tokenizer.pad_id, **compacting()))
    np.testing.assert_array_equal(np.asarray(ours.response_ids), np.asarray(static.response_ids))
    np.testing.assert_array_equal(np.asarray(ours.lengths), np.asarray(static.lengths))
    assert int(np.asarray(static.lengths).min()) <= 4 and regroups and regroups[-1] < 3, (static.lengths, regroups)
