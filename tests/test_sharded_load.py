"""Weights from an HF folder straight into their shards: every parameter built from the blocks
the devices hold, each read as a slice of the safetensors, equals the whole-tensor import
(held to `transformers` in tests/test_models.py) for every layout a mesh gives, including a
rule table that splits head_dim (a merged HF dimension read whole and cut)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pacs_jax import sharding
from pacs_jax.config import MeshConfig
from pacs_jax.models import Decoder, from_pretrained
from pacs_jax.models.hf import hf_decoder_config, load_hf_params


def qwen2_folder(folder):
    """A tiny Qwen2 (q/k/v biases, untied head) saved by transformers, norms and biases randomised."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mesh_shape,rules", [
    ((1, 8, 1), sharding.LOGICAL_AXIS_RULES),
    ((2, 2, 2), sharding.LOGICAL_AXIS_RULES),
    ((1, 4, 2), sharding.with_rules(sharding.LOGICAL_AXIS_RULES, heads=None, kv_heads=None, head_dim="tensor")),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_load_equals_the_whole_import(tmp_path, mesh_shape, rules, dtype):
    folder = qwen2_folder(tmp_path / "hf")
    config = hf_decoder_config(folder, dtype)
    whole = load_hf_params(folder, config)
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape))
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    targets = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, rules))
    sharded = load_hf_params(folder, config, targets)

    split = 0
    for (path, a), b, target in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(sharded), jax.tree.leaves(targets)):
        assert b.sharding == target, path
        assert a.dtype == b.dtype == jax.numpy.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        split += len({tuple((c.start, c.stop) for c in shard.index) for shard in b.addressable_shards}) > 1
    assert split >= 8  # most parameters really are split
    if rules is not sharding.LOGICAL_AXIS_RULES:  # head_dim split: the read-whole-then-cut path ran
        assert sharded["layers"]["q_proj"].sharding.spec[-1] == "tensor"


def test_from_pretrained_with_shardings_places_every_parameter(tmp_path):
    folder = qwen2_folder(tmp_path / "hf")
    mesh = sharding.make_mesh(MeshConfig(1, -1, 1))
    model = from_pretrained(folder, shardings_for=lambda state: sharding.param_shardings(state, mesh))
    reference = from_pretrained(folder)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference))):
        assert len(a.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
