"""Sharding: a greedy rollout and a PACS update step give the single-device results on every
mesh shape of the 8 virtual CPU devices, the state is laid out as the rule table says, and bad
meshes fail before anything compiles with messages that name the config keys."""

import contextlib
import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pacs_jax import sharding
from pacs_jax.config import AlgorithmConfig, ConfigError, MeshConfig, OptimizerConfig
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import ROLLOUT_KEYS, init_train_state, make_prepare_fn, make_train_optimizer, make_update_fn

CONFIG = DecoderConfig.from_hf(dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, model_type="llama",
))
ALGORITHM = AlgorithmConfig(name="pacs", beta=1.0)
# eps=1e-3: Adam's first step is lr * g / (|g| + eps), which for eps -> 0 is lr * sign(g) and
# turns float-rounding noise in a near-zero gradient entry into a full lr-sized step. With a
# larger eps the step is smooth in g, so sharded and unsharded runs can be compared at 1e-5.
OPTIMIZER = make_train_optimizer(ALGORITHM, OptimizerConfig(lr=1e-3, eps=1e-3, weight_decay=0.01), 10)
ROLLOUT_GROUP, UPDATE_GROUP, MINI_BATCHES = 2, 4, 2
MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]


def make_inputs():
    rng = np.random.default_rng(0)
    prompt_ids, prompt_mask = pad_prompts([list(rng.integers(6, 64, n)) for n in (2, 7, 3, 5, 8, 1, 4, 6)], [8], 0)
    rows, prompt_len, response_len = 16, 8, 6
    lengths = rng.integers(1, response_len + 1, rows)
    response_mask = (np.arange(response_len)[None, :] < lengths[:, None]).astype(np.int32)
    batch = {
        "prompt_ids": rng.integers(1, 64, (rows, prompt_len)).astype(np.int32),
        "prompt_mask": np.ones((rows, prompt_len), np.int32),
        "response_ids": (rng.integers(1, 64, (rows, response_len)) * response_mask).astype(np.int32),
        "response_mask": response_mask,
        # Every group of 4 mixed (two right, two wrong): every group carries gradient.
        "rewards": np.tile(np.array([1, 0, 0, 1], np.float32), rows // UPDATE_GROUP),
    }
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, batch


def run_rollout_and_update(mesh):
    """Greedy tokens, update metrics and new train state, on `mesh` (None: one device)."""
    prompts, batch = make_inputs()
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), OPTIMIZER, with_critic=False)
    if mesh is None:
        context, state_sharding = contextlib.nullcontext(), None
    else:
        sharding.validate_mesh_for_model(mesh, CONFIG, prompts_per_step=8, group_size=ROLLOUT_GROUP, mini_batches=MINI_BATCHES)
        state = sharding.shard_train_state(state, mesh)
        state_sharding = sharding.train_state_shardings(state, mesh)
        prompts, batch = sharding.shard_batch(prompts, mesh), sharding.shard_batch(batch, mesh)
        context = jax.set_mesh(mesh)
    with context:
        rollout = generate(
            (graphdefs["policy"], state.params["policy"]), prompts["prompt_ids"], prompts["prompt_mask"],
            jax.random.key(0), SamplingParams(5, temperature=0.0), group_size=ROLLOUT_GROUP,
        )
        extras = make_prepare_fn(graphdefs, ALGORITHM)(state.params, None, {k: batch[k] for k in ROLLOUT_KEYS})
        update = make_update_fn(
            graphdefs, OPTIMIZER, ALGORITHM, group_size=UPDATE_GROUP, mini_batches=MINI_BATCHES, micro_batches=1,
            state_sharding=state_sharding,
        )
        new_state, metrics = update(state, {**batch, **extras})
    return np.asarray(rollout.response_ids), jax.device_get(metrics), new_state


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """XLA's optimisation passes dominate these tiny programs' run time; both sides of every
    comparison are compiled the same way."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def single_device():
    tokens, metrics, state = run_rollout_and_update(None)
    return tokens, metrics, jax.device_get(state)


def leaf(state, *path):
    node = state.params["policy"]
    for key in path:
        node = node[key]
    return node[...]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_rollout_and_update_match_one_device(single_device, shape):
    ref_tokens, ref_metrics, ref_state = single_device
    mesh = sharding.make_mesh(MeshConfig(*shape))
    tokens, metrics, state = run_rollout_and_update(mesh)

    np.testing.assert_array_equal(tokens, ref_tokens)
    assert ref_metrics["grad_norm"] > 1e-2  # the step is not trivially zero
    for name in ("loss", "grad_norm", "pacs/critic_log_loss", "entropy"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], atol=1e-5, rtol=1e-5, err_msg=name)
    for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(new), old, atol=1e-5, err_msg=jax.tree_util.keystr(path))

    # The layout the rule table asks for, on the params and on Adam's moments alike.
    data, fsdp, tensor = shape
    fsdp_axis = "fsdp" if fsdp > 1 else None
    tensor_axis = "tensor" if tensor > 1 else None
    expected = {
        ("layers", "q_proj"): P(None, fsdp_axis, tensor_axis, None),
        ("layers", "down_proj"): P(None, tensor_axis, fsdp_axis),
        ("embed",): P(tensor_axis, fsdp_axis),
        ("final_norm",): P(fsdp_axis),
    }
    adam_moments = state.opt_state.inner_states["policy"].inner_state[1][0]
    for path, spec in expected.items():
        assert leaf(state, *path).sharding.spec == spec, path
        node = adam_moments.mu["policy"]
        for key in path:
            node = node[key]
        assert node[...].sharding.spec == spec, ("mu", path)
    assert adam_moments.count.sharding.spec == P()
    if fsdp * tensor > 1:  # each device holds a slice, not the whole matrix
        q_proj = leaf(state, "layers", "q_proj")
        assert q_proj.addressable_shards[0].data.size == q_proj.size // (fsdp * tensor)


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_sharded_rollout_matches_one_device_with_either_layer_loop(single_device, layers):
    """The test above samples with the default decode (unrolled on CPU); the scanned one, which
    TPU runs, must give the same tokens on a mesh too."""
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    prompts, _ = make_inputs()
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), OPTIMIZER, with_critic=False)
    state, prompts = sharding.shard_train_state(state, mesh), sharding.shard_batch(prompts, mesh)
    with jax.set_mesh(mesh):
        rollout = generate(
            (graphdefs["policy"], state.params["policy"]), prompts["prompt_ids"], prompts["prompt_mask"],
            jax.random.key(0), SamplingParams(5, temperature=0.0, decode_layers=layers), group_size=ROLLOUT_GROUP,
        )
    np.testing.assert_array_equal(np.asarray(rollout.response_ids), single_device[0])


# ----------------------------------------------------------------- rules and placement


def test_logical_to_spec_rules():
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    rules = sharding.LOGICAL_AXIS_RULES
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules) == P(None, "fsdp", "tensor", None)
    assert sharding.logical_to_spec(("batch", "length"), rules) == P(("data", "fsdp"), None)
    # A mesh axis is used once per array: the later dimension stays whole.
    assert sharding.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
    # Dimensions the mesh axes do not divide stay whole; size-1 axes are dropped.
    assert sharding.logical_to_spec(("vocab", "embed"), rules, (61, 32), mesh) == P(None, "fsdp")
    assert sharding.logical_to_spec(("batch",), rules, (6,), mesh) == P(None)
    one_fsdp = sharding.make_mesh(MeshConfig(4, 1, 2))
    assert sharding.logical_to_spec(("batch", "vocab"), rules, (8, 64), one_fsdp) == P("data", "tensor")
    with pytest.raises(ValueError, match="'experts' has no sharding rule"):
        sharding.logical_to_spec(("experts",), rules)
    decode = sharding.logical_to_spec(("layers", "embed", "mlp"), sharding.DECODE_RULES, (2, 32, 64), mesh)
    assert decode == P(None, None, "tensor")


def test_non_dividing_dimension_falls_back_to_replicated(caplog):
    odd = DecoderConfig.from_hf(dict(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, model_type="llama",
    ))
    mesh = sharding.make_mesh(MeshConfig(1, 2, 4))  # vocab 61 is not divisible by tensor=4
    from flax import nnx

    _, state = nnx.split(init_decoder(odd))
    with caplog.at_level(logging.DEBUG, logger="pacs_jax.sharding"):
        placed = sharding.shard_train_state(state, mesh)
    assert placed["embed"][...].sharding.spec == P(None, "fsdp")
    assert placed["layers"]["gate_proj"][...].sharding.spec == P(None, "fsdp", "tensor")
    assert "vocab, size 61" in caplog.text
    np.testing.assert_array_equal(np.asarray(placed["embed"][...]), np.asarray(state["embed"][...]))


def test_shard_batch_and_process_slice_one_process():
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    assert sharding.process_slice(16, mesh) == (0, 16)
    host = {"ids": np.arange(32, dtype=np.int32).reshape(16, 2), "rewards": np.arange(4, dtype=np.float32)}
    placed = sharding.shard_batch(host, mesh)
    assert placed["ids"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(placed["ids"]), host["ids"])
    np.testing.assert_array_equal(np.asarray(placed["rewards"]), host["rewards"])
    # rows 4k..4k+3 sit on the devices with batch index k (tensor pairs hold the same rows)
    shard_rows = sorted({(s.index[0].start, s.data.shape[0]) for s in placed["ids"].addressable_shards})
    assert shard_rows == [(0, 4), (4, 4), (8, 4), (12, 4)]
    with pytest.raises(ConfigError, match="multiple of 4"):
        sharding.shard_batch({"ids": np.zeros((6, 2))}, mesh)
    with pytest.raises(ConfigError, match="trainer.prompts_per_step"):
        sharding.process_slice(6, mesh)


def test_single_process_helpers():
    assert sharding.initialize_distributed() is False
    assert sharding.initialize_distributed(num_processes=1) is False
    assert sharding.is_main_process()
    with pytest.raises(ValueError, match="coordinator"):
        sharding.initialize_distributed(num_processes=2, process_id=0)


# ------------------------------------------------------------------------ mesh errors


def test_mesh_shapes_and_fill():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]).size == 1


@pytest.mark.parametrize("shape, match", [
    ((3, 1, 1), r"mesh.data \* mesh.fsdp \* mesh.tensor = 3 \(data\) \* 1 \(fsdp\) \* 1 \(tensor\) = 3, but there are 8 devices"),
    ((2, 2, 4), r"= 16, but there are 8 devices"),
    ((-1, 3, 1), r"mesh.data=-1 cannot fill 8 devices"),
    ((-1, -1, 1), r"only one of mesh.data / mesh.fsdp / mesh.tensor may be -1"),
    ((0, 1, 1), r"mesh.data=0"),
])
def test_bad_mesh_config(shape, match):
    with pytest.raises(ConfigError, match=match):
        sharding.make_mesh(MeshConfig(*shape))


def test_mesh_does_not_fit_the_model_or_batch():
    tensor4 = sharding.make_mesh(MeshConfig(2, 1, 4))
    with pytest.raises(ConfigError, match=r"mesh.tensor=4 must divide .*num_attention_heads=4 and num_key_value_heads=2.*\[1, 2\]"):
        sharding.validate_mesh_for_model(tensor4, CONFIG, prompts_per_step=8, group_size=4)
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    with pytest.raises(ConfigError, match=r"trainer.prompts_per_step=6 must be divisible by mesh.data \* mesh.fsdp = 2 \* 2 = 4"):
        sharding.validate_mesh_for_model(mesh, CONFIG, prompts_per_step=6, group_size=4)
    with pytest.raises(ConfigError, match=r"trainer.mini_batches \* trainer.micro_batches.*= 2 responses"):
        sharding.validate_mesh_for_model(mesh, CONFIG, prompts_per_step=4, group_size=2, mini_batches=2, micro_batches=2)
    sharding.validate_mesh_for_model(mesh, CONFIG, prompts_per_step=8, group_size=4, mini_batches=2)
