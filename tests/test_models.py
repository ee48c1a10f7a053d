"""Decoder parity with `transformers` (PyTorch, CPU) on random tiny configs, HF export round trip,
and clear errors for folders that do not match."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402
import transformers  # noqa: E402

from pacs_jax.models import DecoderConfig, from_pretrained, init_decoder, save_pretrained  # noqa: E402

BASE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
)

CASES = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0)),
    "llama_mqa_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_bias_mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, attention_bias=True, tie_word_embeddings=False)),
    "llama3_rope_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_tied_mqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True)),
}


def make_hf_model(case: str, folder):
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**BASE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    # Random init leaves norms at 1 and biases at 0, which would hide layout bugs in them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def left_padded_batch(rng, vocab, lengths, total):
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, vocab, n)
        mask[row, total - n:] = 1
    return ids, mask


def hf_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf_model = make_hf_model(case, tmp_path)
    model = from_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(0)
    for lengths, total in [([7], 7), ([11, 5, 1], 11), ([16, 9], 16)]:
        ids, mask = left_padded_batch(rng, BASE["vocab_size"], lengths, total)
        expected = hf_logits(hf_model, ids, mask)
        ours = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
        assert ours.shape == expected.shape
        real = mask.astype(bool)
        np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama_bias_mha", "qwen2_tied_mqa", "qwen3_qknorm"])
@pytest.mark.parametrize("layers", ["scan", "unrolled", "unrolled_indexed"])
def test_gradients_match_transformers(case, layers, tmp_path):
    """Every parameter's gradient of a weighted sum of token log-probs (left-padded rows) equals
    PyTorch autograd's through the transformers model: pins the projections' hand-written backward
    (`llama.project`) and the ways of running the layers. "unrolled_indexed" is the trainer's CPU
    path: weights sliced at traced `layer_index` arguments (with its stacking backward), compiled
    with the CPU options of a backward program (`xla_options`)."""
    import dataclasses

    from flax import nnx

    from pacs_jax import xla_options
    from pacs_jax.models.hf import _LAYER_NAMES, _to_hf, build_decoder
    from pacs_jax.models.llama import indexed_layers, layer_index

    hf_model = make_hf_model(case, tmp_path)
    loaded = from_pretrained(tmp_path, dtype="float32")
    config = dataclasses.replace(loaded.config, train_layers=layers.removesuffix("_indexed"))
    model = build_decoder(config, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
    rng = np.random.default_rng(0)
    ids, mask = left_padded_batch(rng, BASE["vocab_size"], [12, 7, 3], 12)
    labels = rng.integers(0, BASE["vocab_size"], ids.shape)
    weights = rng.normal(size=ids.shape) * mask

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[..., None], -1)[..., 0]
        return jnp.sum(logprobs * jnp.asarray(weights, jnp.float32))

    if layers == "unrolled_indexed":
        def indexed_grad(params, index):
            with indexed_layers(index):
                return jax.grad(loss)(params)

        grads = nnx.to_pure_dict(xla_options.jit(indexed_grad, kind="backward")(params, layer_index(config.num_layers)))
    else:
        grads = nnx.to_pure_dict(jax.grad(loss)(params))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits
    logprobs = torch.gather(torch.log_softmax(logits, -1), -1, torch.tensor(labels)[..., None])[..., 0]
    (logprobs * torch.tensor(weights, dtype=torch.float32)).sum().backward()
    expected = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}

    ours = {"model.embed_tokens.weight": grads["embed"], "model.norm.weight": grads["final_norm"]}
    if "lm_head" in grads:
        ours["lm_head.weight"] = np.asarray(grads["lm_head"]).T
    for name, stacked in grads["layers"].items():
        for i in range(config.num_layers):
            ours[f"model.layers.{i}.{_LAYER_NAMES[name]}"] = _to_hf(name, np.asarray(stacked[i]))
    assert sorted(ours) == sorted(expected)
    for name, grad in expected.items():
        np.testing.assert_allclose(np.asarray(ours[name]), grad, atol=2e-5 * max(1.0, np.abs(grad).max()), rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen3_qknorm", "qwen2_tied_mqa"])
def test_export_round_trip_loads_in_transformers(case, tmp_path):
    hf_model = make_hf_model(case, tmp_path / "src")
    model = from_pretrained(tmp_path / "src")
    save_pretrained(model, tmp_path / "export")
    reloaded = getattr(transformers, CASES[case][1]).from_pretrained(tmp_path / "export").eval()
    ids, mask = left_padded_batch(np.random.default_rng(1), BASE["vocab_size"], [9, 4], 9)
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask), hf_logits(hf_model, ids, mask), atol=1e-5, rtol=0)


def test_random_init_exports_and_matches(tmp_path):
    config = DecoderConfig.from_hf({**BASE, "model_type": "llama", "num_key_value_heads": 2})
    model = init_decoder(config, seed=3)
    save_pretrained(model, tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch(np.random.default_rng(2), BASE["vocab_size"], [6, 3], 6)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    np.testing.assert_allclose(ours[mask.astype(bool)], hf_logits(reloaded, ids, mask)[mask.astype(bool)], atol=1e-4)


def test_bfloat16_close_to_float32(tmp_path):
    make_hf_model("qwen2_bias", tmp_path)
    f32 = from_pretrained(tmp_path, dtype="float32")
    bf16 = from_pretrained(tmp_path, dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)), jnp.int32)
    a, b = np.asarray(f32(ids)), np.asarray(bf16(ids))
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_parameters_carry_logical_axes():
    config = DecoderConfig.from_hf({**BASE, "model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 16})
    model = init_decoder(config)
    from flax import nnx

    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var[...].ndim, path
        assert set(axes) <= {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers"}
    assert model.layers.q_proj.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        from_pretrained(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        from_pretrained(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    make_hf_model("llama_gqa_untied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        from_pretrained(tmp_path)


def test_unknown_dtype(tmp_path):
    make_hf_model("llama_mqa_tied", tmp_path)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        from_pretrained(tmp_path, dtype="float8")
