"""The compiler options of the engines' programs (pacs_jax/xla_options.py) and the layer weights
sliced at traced indices (llama.layer_index): what each backend gets, that this jaxlib accepts
the CPU options, and that neither changes a number beyond float32 rounding."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pacs_jax import xla_options
from pacs_jax.config import ConfigError, load_config
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.models.llama import layer_index, unstack_tree


@pytest.fixture(autouse=True)
def default_mode():
    yield
    xla_options.set_cpu_compile("fast")


def test_compile_cache_settings(monkeypatch):
    """trainer.compile_cache: the path ("~" expanded), JAX's cache on, programs of 0.2 s or more
    written (unless the user's environment says otherwise); "" turns the cache off. (A second run
    reading its programs back: tests/test_cli.py.)"""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    try:
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        xla_options.set_compile_cache("~/somewhere/xla")
        assert jax.config.jax_enable_compilation_cache
        assert jax.config.jax_compilation_cache_dir == str(Path.home() / "somewhere" / "xla")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.2
        xla_options.set_compile_cache("gs://bucket/xla")
        assert jax.config.jax_compilation_cache_dir == "gs://bucket/xla"
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
        xla_options.set_compile_cache("/tmp/xla")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0
        xla_options.set_compile_cache("")
        assert not jax.config.jax_enable_compilation_cache
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_options_per_backend_and_mode():
    assert xla_options.compiler_options("forward", "cpu") == {
        "xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
    # Scatter (an embedding's gradient) needs the fusion emitters: backward programs keep them.
    assert xla_options.compiler_options("backward", "cpu") == {"xla_backend_optimization_level": 1}
    assert xla_options.compiler_options("backward", "tpu") is None
    assert xla_options.compiler_options("forward", "gpu") is None
    with xla_options.target("tpu"):  # `python -m pacs_jax compile` lowers TPU programs on a CPU host
        assert xla_options.compiler_options("forward") is None
    xla_options.set_cpu_compile("full")
    assert xla_options.compiler_options("forward", "cpu") is None
    with pytest.raises(ValueError, match=r"trainer.cpu_compile must be one of \('fast', 'full'\)"):
        xla_options.set_cpu_compile("slow")
    with pytest.raises(ValueError, match="kind must be one of"):
        xla_options.jit(lambda x: x, kind="sampling")


def test_config_rejects_unknown_mode(tmp_path):
    with pytest.raises(ConfigError, match="trainer.cpu_compile"):
        load_config(None, ["trainer.cpu_compile=slow"])


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_this_jaxlib_accepts_the_options_and_numbers_hold(kind):
    """Compiles a tiny decoder's log-prob gradient with each kind's CPU options (a jaxlib that
    renamed an option fails here: "No such compile option") and compares it with XLA's defaults."""
    config = DecoderConfig.from_hf(dict(
        model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    graphdef, params = nnx.split(init_decoder(config, seed=0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (3, 9)), jnp.int32)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, jnp.ones_like(ids))
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

    fn = jax.value_and_grad(loss)
    assert xla_options.compiler_options(kind, "cpu")
    ours = xla_options.jit(fn, kind=kind)(params)
    xla_options.set_cpu_compile("full")
    reference = xla_options.jit(fn, kind=kind)(params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_unstack_at_traced_indices_equals_static_slices():
    """Values and gradients of the traced-index slices (with their stacking backward) equal plain
    indexing's under autodiff, for weights the loss uses unevenly per layer."""
    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}

    def loss(tree, index):
        layers = unstack_tree(tree, 3, index)
        return sum((i + 1.0) * jnp.sum(jnp.sin(layer["w"]) * layer["b"]) for i, layer in enumerate(layers))

    values = jax.jit(lambda t, index: unstack_tree(t, 3, index))(tree, layer_index(3))
    for i, layer in enumerate(values):
        np.testing.assert_array_equal(np.asarray(layer["w"]), np.asarray(tree["w"][i]))
    ours = jax.jit(jax.grad(loss))(tree, layer_index(3))
    expected = jax.grad(lambda t: loss(t, None))(tree)
    for name in tree:
        np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(expected[name]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="layer_index has 2 entries for 3 layers"):
        unstack_tree(tree, 3, layer_index(2))
