"""compile_ahead: the batch keeps its buffers when given the batch sharding, and a failed compile
ahead of time costs only time (the trainer's use of it, end to end: test_train.py)."""

import logging

import jax
import numpy as np
import optax
import pytest

from pacs_jax import sharding
from pacs_jax.compile_ahead import CompileAhead, batch_arrays, rollout_types
from pacs_jax.config import AlgorithmConfig, MeshConfig
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.update import init_train_state, make_prepare_fn, make_update_fn

CONFIG = DecoderConfig.from_hf(dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, model_type="llama",
))


def test_batch_arrays_take_the_batch_sharding_without_copying():
    mesh = sharding.make_mesh(MeshConfig(data=-1))  # the 8 virtual devices (conftest)
    rows = jax.device_put(np.arange(16 * 3, dtype=np.int32).reshape(16, 3), jax.sharding.NamedSharding(mesh, jax.P("data")))
    out = batch_arrays({"response_ids": rows}, mesh)["response_ids"]
    assert out.sharding == sharding.batch_sharding(mesh) != rows.sharding  # what the programs were compiled for
    assert [s.data.unsafe_buffer_pointer() for s in out.addressable_shards] == [
        s.data.unsafe_buffer_pointer() for s in rows.addressable_shards]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(rows))
    types = rollout_types(16, 8, 5, mesh)
    assert types["prompt_ids"].shape == (16, 8) and types["response_mask"].shape == (16, 5)
    assert all(t.sharding == out.sharding for t in types.values())


def test_a_failed_compile_ahead_is_a_warning_and_the_call_reports_the_error(caplog):
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    algorithm = AlgorithmConfig(name="grpo", kl_coef=0.0)
    optimizer = optax.multi_transform({"policy": optax.adamw(1e-3)}, lambda params: {name: name for name in params})
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), optimizer, with_critic=False)
    # 8 rows cannot be 2 mini-batches x 3 chunks: lowering the old-log-prob pass fails.
    prepare = make_prepare_fn(graphdefs, algorithm, chunks=3, on_policy_chunks=1)
    update = make_update_fn(graphdefs, optimizer, algorithm, group_size=2, mini_batches=2, micro_batches=1)
    with jax.set_mesh(mesh), caplog.at_level(logging.WARNING, logger="pacs_jax"):
        ahead = CompileAhead(prepare, update, state, None, rows=8, prompt_width=4, max_new_tokens=3, mesh=mesh)
        ahead.wait_prepare()
        ahead.wait_update()
    messages = [r.getMessage() for r in caplog.records]
    assert any("compiling the old-log-prob pass ahead of its first call failed" in m for m in messages), messages
    assert any("compiling the update ahead of its first call failed" in m for m in messages), messages
    rollout = {k: jax.numpy.zeros(t.shape, t.dtype) for k, t in rollout_types(8, 4, 3, mesh).items()}
    with jax.set_mesh(mesh), pytest.raises(TypeError, match="reshape"):
        prepare(state.params, None, batch_arrays(rollout, mesh))
