"""Memory-efficient attention (pacs_jax.models.attention, `model.attention`).

The blockwise online-softmax attention and the Pallas splash kernel (in Pallas's interpret mode on
this CPU) are held to a float64 NumPy softmax and to the dense path's gradients, with GQA,
left padding, packed segments and the bottom-right causal offset of shared prompts. Whole
old-log-prob passes and updates of every algorithm with blockwise attention equal the dense ones
on padded, shared-prompt and packed rows. The update compiled at a long length holds far fewer
temporary bytes with blockwise attention than with dense, growing about linearly in the length.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pacs_jax.config import AlgorithmConfig, ConfigError, load_config
from pacs_jax.models import DecoderConfig, attention, init_decoder
from pacs_jax.packing import pack_rollout
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import ROLLOUT_KEYS, batch_logprobs, init_train_state, make_prepare_fn, make_update_fn


def random_case(seed=0, batch=2, length=37, slots=53, heads=4, kv_heads=2, dim=8):
    """q, k, v, segments: row 0 has 5 left-padding keys and segments of 20 keys; row 1 one segment
    per 20 keys and no padding; queries are the last `length` positions (offset slots - length)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, dim))
    k, v = rng.normal(size=(2, batch, kv_heads, slots, dim))
    columns = np.arange(slots)[None]
    kv_segments = np.where(columns < np.array([[5], [0]])[:batch], -1, columns // 20)
    q_segments = np.maximum(kv_segments[:, slots - length :], 0)
    return q, k, v, q_segments.astype(np.int32), kv_segments.astype(np.int32)


def numpy_attention(q, k, v, q_segments, kv_segments, scale):
    """float64: softmax over the keys each query may see (causal from the bottom right, same segment)."""
    batch, length, heads, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for i in range(length):
            seen = [j for j in range(slots) if j <= i + slots - length and q_segments[b, i] == kv_segments[b, j]]
            for h in range(heads):
                g = h // (heads // kv_heads)
                if not seen:
                    continue
                s = np.array([q[b, i, h] @ k[b, g, j] for j in seen]) * scale
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, g][seen]
    return out


def sees_a_key(q_segments, kv_segments):
    return np.asarray(attention.segment_mask(jnp.asarray(q_segments), jnp.asarray(kv_segments)).any(-1))


IMPLEMENTATIONS = {
    "blockwise 8x16": lambda *a: attention.blockwise_attention(*a, 8, 16),
    "blockwise 16x8": lambda *a: attention.blockwise_attention(*a, 16, 8),
    "blockwise 5x7": lambda *a: attention.blockwise_attention(*a, 5, 7),  # lengths not block multiples
    "blockwise one block": lambda *a: attention.blockwise_attention(*a, 512, 512),
    "splash interpret": lambda *a: attention.splash_attention(*a, 128, interpret=True),
}


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_values_and_gradients_equal_dense(name):
    q, k, v, qs, ks = random_case()
    scale = 0.3
    real = sees_a_key(qs, ks)
    expected = numpy_attention(q, k, v, qs, ks, scale)
    weights = np.random.default_rng(1).normal(size=q.shape) * real[:, :, None, None]  # padding queries read nothing
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    segments = (jnp.asarray(qs), jnp.asarray(ks))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, *segments, scale) * weights)

    dense = lambda q, k, v, qs, ks, scale: attention.dense_attention(q, k, v, attention.segment_mask(qs, ks), scale)
    fn = IMPLEMENTATIONS[name]
    out = np.asarray(fn(*args, *segments, scale))
    np.testing.assert_allclose(out[real], expected[real], atol=2e-6, rtol=0)
    assert np.isfinite(out).all()  # padding queries too: their zero cotangent must stay zero
    want = jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2))(*args)
    got = jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2))(*args)
    for name_, a, b in zip("qkv", got, want):
        assert np.abs(np.asarray(b)).max() > 0.1
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name_)


def test_auto_picks_by_backend_and_bad_names_fail():
    assert attention.resolve("auto", "tpu", "bfloat16") == "splash"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float32") == "blockwise"  # cuDNN has no float32 kernel
    assert attention.resolve("auto", "cpu", "float32") == "dense"
    assert attention.resolve("blockwise", "tpu", "bfloat16") == "blockwise"
    with pytest.raises(ValueError, match="model.attention 'flash'"):
        attention.resolve("flash", "cpu", "float32")
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flash"])
    with pytest.raises(ConfigError, match="model.attention_block"):
        load_config(None, ["model.attention_block=0"])
    arch = 'model.arch={"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}'
    config = load_config(None, ["model.tokenizer=char", arch, "model.attention=blockwise", "model.attention_block=256"])
    assert (config.model.attention, config.model.attention_block) == ("blockwise", 256)
    # ... and reach the model the trainer builds
    from pacs_jax.models.tokenizer import load_tokenizer
    from pacs_jax.policy import policy_config

    decoder_config = policy_config(config, load_tokenizer("char", ""))
    assert (decoder_config.attention, decoder_config.attention_block) == ("blockwise", 256)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN flash attention)")
def test_cudnn_equals_dense_on_gpu():
    q, k, v, qs, ks = random_case(length=64, slots=128, dim=64)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    real = sees_a_key(qs, ks)
    got = attention.cudnn_attention(*args, jnp.asarray(qs), jnp.asarray(ks), 0.125)
    want = attention.dense_attention(*args, attention.segment_mask(jnp.asarray(qs), jnp.asarray(ks)), 0.125)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real], atol=2e-2)


# ------------------------------------------------------------ whole passes, every algorithm

GROUP, PROMPTS = 3, 4
CONFIG = DecoderConfig.from_hf(dict(
    model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
))
SGD = optax.multi_transform({"policy": optax.sgd(0.5), "critic": optax.sgd(0.5)}, lambda p: {k: k for k in p})


@pytest.fixture(scope="module")
def rollout():
    rng = np.random.default_rng(0)
    ids, mask = pad_prompts([list(rng.integers(3, 61, n)) for n in (3, 6, 1, 5)], [8], 0)
    out = generate(init_decoder(CONFIG, seed=0), ids, mask, jax.random.key(0),
                   SamplingParams(9, temperature=1.0, stop_ids=(3, 4, 5)), group_size=GROUP)
    return {**{k: getattr(out, k) for k in ROLLOUT_KEYS}, "rewards": jnp.asarray(rng.integers(0, 2, PROMPTS * GROUP), jnp.float32)}


def run_step(rollout, algorithm, implementation, layout):
    """Old log-probs (prepare) and one update (2 mini x 2 micro-batches) with `implementation`."""
    config = dataclasses.replace(CONFIG, attention=implementation, attention_block=4)  # several blocks per row
    reference = nnx.state(init_decoder(config, seed=5)) if algorithm.kl_coef else None
    graphdefs, state = init_train_state(init_decoder(config, seed=1), SGD, with_critic=algorithm.name == "ppo")
    batch = dict(rollout)
    if layout == "packed":
        packed, _ = pack_rollout(*(np.asarray(rollout[k]) for k in ROLLOUT_KEYS), micro_batches=4, row_tokens=20)
        batch.update({k: jnp.asarray(v) for k, v in packed.items()})
    shared = layout == "shared"
    prepare = make_prepare_fn(graphdefs, algorithm, chunks=4, on_policy_chunks=2, prompt_group=GROUP if shared else 0)
    extras = prepare(state.params, reference, {k: v for k, v in batch.items() if k not in ("rewards",)})
    update = make_update_fn(graphdefs, SGD, algorithm, group_size=GROUP, mini_batches=2, micro_batches=2, shared_prompts=shared)
    state, metrics = update(state, {**batch, **extras})
    return jax.device_get((extras, state.params, metrics))


# Every algorithm on padded rows; the shared-prompt and packed layouts with PACS and PPO (its critic
# is a second decoder) to keep the suite short: the attention calls do not depend on the loss.
CASES = [(name, "padded") for name in ("pacs", "grpo", "ppo", "rloo")] + [
    (name, layout) for layout in ("shared", "packed") for name in ("pacs", "ppo")]


@pytest.mark.parametrize("name,layout", CASES)
def test_updates_with_blockwise_attention_equal_dense(rollout, name, layout, monkeypatch):
    algorithm = AlgorithmConfig(name=name, kl_coef=0.1 if name == "grpo" else 0.0)
    calls = []  # the blockwise path really ran (a silent dense fallback would pass for nothing)
    real = attention.blockwise_attention
    monkeypatch.setattr(attention, "blockwise_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    extras, params, metrics = run_step(rollout, algorithm, "dense", layout)
    assert not calls
    block_extras, block_params, block_metrics = run_step(rollout, algorithm, "blockwise", layout)
    assert calls
    if layout == "shared":
        assert any(shape[1] == 9 for shape in calls)  # the responses' queries over [prompt, response]
    for key in extras:
        np.testing.assert_allclose(block_extras[key], extras[key], atol=2e-5, rtol=0, err_msg=key)
    assert np.abs(np.asarray(extras["old_logprobs"])).max() > 0.1
    for a, b in zip(jax.tree.leaves(block_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    for key in ("loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(block_metrics[key], metrics[key], rtol=1e-4, err_msg=key)


@pytest.mark.slow  # Pallas's interpreter runs every grid step in Python
def test_splash_logprobs_equal_dense_in_interpret_mode(rollout):
    """The model's log-probs (padded and shared-prompt rows) through the Pallas kernel, interpreted."""
    batch = {k: rollout[k] for k in ROLLOUT_KEYS}
    params = nnx.state(init_decoder(CONFIG, seed=1))
    for group in (0, GROUP):
        results = {}
        for implementation in ("dense", "splash"):
            model = nnx.merge(nnx.graphdef(init_decoder(dataclasses.replace(CONFIG, attention=implementation))), params)
            results[implementation] = np.asarray(batch_logprobs(model, batch, 1.0, group_size=group))
        mask = np.asarray(rollout["response_mask"], bool)
        np.testing.assert_allclose(results["splash"][mask], results["dense"][mask], atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------- memory


def update_temp_bytes(implementation: str, length: int) -> int:
    """Temporary bytes XLA CPU plans for the forward and backward of one row of `length` tokens."""
    config = DecoderConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4),
                                   attention=implementation, attention_block=256, train_layers="scan")
    graphdef, params = nnx.split(init_decoder(config))
    half = length // 2
    batch = {"prompt_ids": jax.ShapeDtypeStruct((1, half), jnp.int32), "prompt_mask": jax.ShapeDtypeStruct((1, half), jnp.int32),
             "response_ids": jax.ShapeDtypeStruct((1, half), jnp.int32), "response_mask": jax.ShapeDtypeStruct((1, half), jnp.int32)}

    def loss(params, batch):
        return jnp.sum(batch_logprobs(nnx.merge(graphdef, params), batch))

    compiled = jax.jit(jax.grad(loss)).lower(params, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # four compiles at 2048 and 4096 tokens
def test_blockwise_update_memory_grows_linearly():
    dense = {t: update_temp_bytes("dense", t) for t in (2048, 4096)}
    blockwise = {t: update_temp_bytes("blockwise", t) for t in (2048, 4096)}
    scores = 4 * 4 * 4096 * 4096  # one layer's float32 scores at 4096 tokens, 4 heads: 256 MiB
    assert dense[4096] >= scores
    assert blockwise[4096] < dense[4096] / 10
    assert blockwise[4096] < 2.5 * blockwise[2048]  # linear: twice the length, about twice the bytes
    assert dense[4096] > 3.5 * dense[2048]  # quadratic


# --------------------------------------------------------------------------- TPU compile

from pacs_jax import compile_tpu  # noqa: E402  (libtpu's check; the section's own import)

_libtpu = compile_tpu.libtpu_problem()


def tpu_update_compiled(implementation: str, length: int):
    """The gradient of a one-layer model's log-probs, lowered for v5e-4 (mesh fsdp 2 x tensor 2) under
    the TPU target as `python -m pacs_jax compile` lowers programs, and compiled by XLA TPU."""
    from pacs_jax import sharding, xla_options
    from pacs_jax.compile_programs import placed
    from pacs_jax.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2),
                              devices=compile_tpu.tpu_devices(compile_tpu.parse_topology("v5e-4")))
    config = DecoderConfig.from_hf(dict(model_type="llama", vocab_size=256, hidden_size=512, intermediate_size=512,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
                                   compute_dtype="bfloat16", attention=implementation, train_layers="scan")
    abstract = jax.eval_shape(lambda: nnx.split(init_decoder(config))[1])
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_decoder(config)))
    params = placed(abstract, sharding.param_shardings(abstract, mesh))
    half = jax.ShapeDtypeStruct((4, length // 2), jnp.int32, sharding=sharding.batch_sharding(mesh))
    batch = dict.fromkeys(ROLLOUT_KEYS, half)

    def loss(params, batch):
        return jnp.sum(batch_logprobs(nnx.merge(graphdef, params), batch))

    with jax.set_mesh(mesh), xla_options.target("tpu"):
        return jax.jit(jax.grad(loss)).lower(params, batch).compile()


@pytest.mark.slow
@pytest.mark.skipif(_libtpu is not None, reason=f"needs a TPU compiler (libtpu): {_libtpu}")
def test_auto_is_splash_on_tpu_and_compiles_under_the_mesh(monkeypatch):
    calls = []
    real = attention.splash_attention
    monkeypatch.setattr(attention, "splash_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    splash = tpu_update_compiled("auto", 2048)
    assert calls and not any(k["interpret"] for k in calls)  # auto resolved to the compiled kernel
    assert "tpu_custom_call" in splash.as_text()  # the Pallas kernel is in the program
    dense = tpu_update_compiled("dense", 2048)
    # Per chip: 2 rows x 2 heads of 2048 x 2048 float32 scores are 64 MiB per layer for dense.
    assert splash.memory_analysis().temp_size_in_bytes < dense.memory_analysis().temp_size_in_bytes / 4
