"""The decoder: one Flax NNX implementation for Llama 2/3/3.1, Qwen2/2.5, Qwen3 (dense) and SmolLM2.

The families differ only in a few switches (q/k/v biases, per-head q/k RMSNorm, tied embeddings,
RoPE scaling), so they share one module. Layers are stored stacked (leading `layers` axis) and run
with `lax.scan`, so compile time does not grow with depth. Every parameter carries logical axis
names (`logical_axes` metadata) that `pacs_jax.sharding` maps to mesh axes.

The same forward pass serves training (full sequences, no cache) and sampling (a KV cache written
at one scalar position per call; prompts are left-padded so every row writes at the same index).
`Decoder.decode_unrolled` is the sampler's CPU variant of the cached pass: the layers unrolled
over per-layer weights and caches, because XLA CPU copies each scanned layer out of the stacks.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pacs_jax import xla_options
from pacs_jax.models import attention as attention_lib
from pacs_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# Logical axes of the hidden states between layers (pacs_jax.sharding maps them to the mesh).
ACTIVATION_AXES = ("batch", "length", "activation_embed")


class ModelLoadError(ValueError):
    """A model folder or architecture that we cannot load as asked; the message names the file."""


def resolve_dtype(name: str, what: str = "dtype"):
    if name not in DTYPES:
        raise ModelLoadError(f"unknown {what} {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture plus numerics. Frozen and hashable: it is a static argument of jitted code."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    # or ("linear", factor) or None.
    rope_scaling: Optional[tuple] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    # How the forward without a cache (training, log-prob passes) runs the layers: scan | unrolled
    # | auto (unrolled on CPU, scanned on accelerators, where compile time must not grow with depth).
    train_layers: str = "auto"
    # Attention over a whole sequence (training passes, an empty-cache prefill):
    # auto | dense | blockwise | splash | cudnn (pacs_jax.models.attention), and its block size.
    attention: str = "auto"
    attention_block: int = 512

    def unrolled_training_layers(self) -> bool:
        return self.train_layers == "unrolled" or (self.train_layers == "auto" and jax.default_backend() == "cpu")

    def attend(self, q, k, v, q_segments, kv_segments):
        """Causal attention over a whole sequence with `model.attention`'s implementation (`auto`
        resolved for the backend the program is built for): see `attention.causal_attention`."""
        backend = xla_options.backend()
        implementation = attention_lib.resolve(self.attention, backend, self.compute_dtype)
        return attention_lib.causal_attention(q, k, v, q_segments, kv_segments, 1.0 / math.sqrt(self.head_dim),
                                              implementation=implementation, block=self.attention_block, backend=backend)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json", **numerics) -> "DecoderConfig":
        """Build from a Hugging Face config.json dict; unsupported features raise, never fall back."""
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported; supported: "
                f"{list(SUPPORTED_MODEL_TYPES)} (Llama, Qwen2/2.5, Qwen3 dense, SmolLM2)"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ModelLoadError(f"{source}: missing required key {key!r}")
        if hf.get("mlp_bias"):
            raise ModelLoadError(f"{source}: mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
        if hf.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: use_sliding_window=true is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling")
        if legacy_scaling:
            rope = {**legacy_scaling, **rope}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            scaling = (
                "llama3",
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "linear":
            scaling = ("linear", float(rope["factor"]))
        else:
            raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported (default, llama3, linear)")
        num_heads = hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (and no o bias); Llama's attention_bias covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "mistral", "qwen3") and attention_bias,
            qk_norm=model_type == "qwen3",
            model_type=model_type,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            **numerics,
        )

    def to_hf(self) -> dict:
        """The config.json that `transformers` needs to load an export of this model."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling and self.rope_scaling[0] == "llama3":
            _, factor, low, high, original = self.rope_scaling
            rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
        elif self.rope_scaling:
            rope.update(rope_type="linear", factor=self.rope_scaling[1])
        hf = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.qkv_bias
        if rope["rope_type"] != "default":
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return hf


class KVCache(NamedTuple):
    """Keys and values for every layer. Keys are stored transposed, [layers, batch, kv_heads,
    head_dim, max_len], so that a decode step's scores are a plain matrix product over the slots;
    values are [layers, batch, kv_heads, max_len, head_dim]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, config: DecoderConfig, batch: int, max_len: int) -> "KVCache":
        dtype = resolve_dtype(config.compute_dtype)
        values = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        keys = (config.num_layers, batch, config.num_kv_heads, config.head_dim, max_len)
        return cls(jnp.zeros(keys, dtype), jnp.zeros(values, dtype))

    @property
    def slots(self) -> int:
        return self.v.shape[3]


class LayerKVCache(NamedTuple):
    """The same keys and values as KVCache, one array per layer ([batch, kv_heads, head_dim, slots]
    and [batch, kv_heads, slots, head_dim]), for the unrolled decode step (`Decoder.decode_unrolled`):
    each layer then writes its new token into its own buffer in place."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: DecoderConfig, batch: int, slots: int) -> "LayerKVCache":
        stacked = KVCache.zeros(dataclasses.replace(config, num_layers=1), batch, slots)
        return cls((stacked.k[0],) * config.num_layers, (stacked.v[0],) * config.num_layers)

    @classmethod
    def from_stacked(cls, cache: KVCache) -> "LayerKVCache":
        layers = range(cache.k.shape[0])
        return cls(tuple(cache.k[i] for i in layers), tuple(cache.v[i] for i in layers))

    def repeat(self, times: int) -> "LayerKVCache":
        """Each row repeated `times` times (row i becomes rows i*times ... i*times + times - 1)."""
        return LayerKVCache(tuple(jnp.repeat(k, times, axis=0) for k in self.k), tuple(jnp.repeat(v, times, axis=0) for v in self.v))

    def grow(self, slots: int) -> "LayerKVCache":
        """The same cache with empty slots appended up to `slots`."""
        extra = slots - self.slots
        return LayerKVCache(
            tuple(jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, extra))) for k in self.k),
            tuple(jnp.pad(v, ((0, 0), (0, 0), (0, extra), (0, 0))) for v in self.v),
        )

    @property
    def slots(self) -> int:
        return self.v[0].shape[2]


# ------------------------------------------------------------------------- building blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a weight projection, e.g. "btd,df->btf". The same math as
    autodiff's, but the backward is written as two einsums whose operands keep their forward
    layouts: from autodiff's own transpose rule, XLA CPU wrote each activation gradient
    transposed before the weight-gradient matmul (the SiLU-gate backward as [384, 6144]: 23% of
    bench.step's update; with this, the update 0.72 -> 0.62 s)."""
    return jnp.einsum(spec, x, w)


def _project_fwd(spec, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def _project_bwd(spec, residuals, grad):
    x, w = residuals
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    return jnp.einsum(f"{out},{w_axes}->{x_axes}", grad, w), jnp.einsum(f"{x_axes},{out}->{w_axes}", x, grad)


project.defvjp(_project_fwd, _project_bwd)


# ------------------------------------------------------------- layer weights, one per layer
#
# An unrolled layer loop (CPU) slices every stacked weight once per layer. XLA CPU compiles each
# fused kernel on its own, ~20-30 ms of LLVM whatever its size, and a static slice's offset is part
# of its kernel: one kernel per weight per layer, 44 of the rollout's 164 kernels and 41 of the
# update's 231 on bench.step's 4-layer model. Sliced at indices XLA cannot see (`layer_index`,
# passed into the jitted function as arguments), the slices of one shape share one kernel.


def layer_index(num_layers: int) -> tuple[np.ndarray, ...]:
    """0 ... num_layers - 1 as separate int32 scalars: pass them into a jitted function as an
    argument (one parameter each: an array of them would be sliced at constant offsets again)
    and on to `unstack_tree` or `indexed_layers`."""
    return tuple(np.int32(i) for i in range(num_layers))


def stacked_layer_count(state) -> int:
    """The number of layers of a Decoder's split state (nnx.split(decoder)[1])."""
    return jax.tree.leaves(state["layers"])[0].shape[0]


@jax.custom_vjp
def _unstack(stacked: jax.Array, index: tuple) -> list[jax.Array]:
    return [jax.lax.dynamic_index_in_dim(stacked, i, keepdims=False) for i in index]


def _unstack_fwd(stacked, index):
    return _unstack(stacked, index), None


def _unstack_bwd(_, cotangents):
    # index[i] is i (layer_index): the slices' cotangents stacked, one concatenate that XLA fuses
    # into the optimizer's kernels, not autodiff's zero-filled update of the whole stack per layer.
    return jnp.stack(cotangents), None


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


def unstack_tree(tree, length: int, index: Optional[tuple] = None) -> list:
    """The `length` trees of every leaf's slices along its leading (layers) axis: at the traced
    `layer_index` scalars `index` where given, else at static offsets."""
    if index is None:
        return [jax.tree.map(lambda stacked: stacked[i], tree) for i in range(length)]
    if len(index) != length:
        raise ValueError(f"layer_index has {len(index)} entries for {length} layers")
    leaves, treedef = jax.tree.flatten(tree)
    sliced = [_unstack(leaf, tuple(index)) for leaf in leaves]
    return [treedef.unflatten([s[i] for s in sliced]) for i in range(length)]


_LAYER_INDEX: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("layer_index", default=None)


@contextlib.contextmanager
def indexed_layers(index: Optional[tuple]):
    """While a jitted function that took `layer_index(...)` as an argument traces inside this,
    the unrolled training passes (`run_layers`) slice the stacked weights at those indices."""
    token = _LAYER_INDEX.set(index)
    try:
        yield
    finally:
        _LAYER_INDEX.reset(token)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Normalise in float32 whatever the compute dtype, as the HF reference does.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(config: DecoderConfig) -> jax.Array:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling[0] == "linear":
        return inv_freq / scaling[1]
    _, factor, low_freq_factor, high_freq_factor, original_len = scaling
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, T, heads, head_dim]; positions: [B, T]. HF's rotate-half layout."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


attention = attention_lib.dense_attention  # grouped-query attention over a [B, T, S] mask


def queries_as_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, KV, T * G, D]: each KV head's queries as the rows (t, g) of one
    batched matmul (for T = 1 a plain matrix-vector product over the cache)."""
    batch, length, heads, dim = q.shape
    return q.reshape(batch, length, kv_heads, heads // kv_heads, dim).transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, dim)


def rows_as_queries(out: jax.Array, length: int) -> jax.Array:
    """The inverse of `queries_as_rows`: [B, KV, T * G, D] -> [B, T, H, D]."""
    batch, kv_heads, rows, dim = out.shape
    group = rows // length
    return out.reshape(batch, kv_heads, length, group, dim).transpose(0, 2, 1, 3, 4).reshape(batch, length, kv_heads * group, dim)


def cached_attention(q, cache_k, cache_v, k, v, cache_mask, own_mask, scale):
    """Attention of this call's queries over the cache as it was before the call plus this call's
    own keys/values, without writing them into the cache first (the caller writes every layer's
    new keys once, after the layer scan: writing inside the scan made XLA copy the whole cache).
    q: [B,T,H,D]; cache_k: [B,KV,D,S] (keys stored transposed: one query's scores are then a plain
    matrix product over the slots, 1.6-2.4x faster than [B,KV,S,D] on CPU); cache_v: [B,KV,S,D];
    k, v: [B,KV,T,D]; cache_mask: [B,S] (old slots a query may see); own_mask: [B,T,T] (causal,
    over real tokens among the new ones)."""
    length = q.shape[1]
    group = q.shape[2] // cache_k.shape[1]
    q = queries_as_rows(q, cache_k.shape[1])
    neg = jnp.finfo(jnp.float32).min
    old = jnp.einsum("bkqd,bkds->bkqs", q, cache_k, preferred_element_type=jnp.float32) * scale
    old = jnp.where(cache_mask[:, None, None, :], old, neg)
    if length == 1:
        # Against its own single key a query's score is a multiply-add; as a batched matmul over
        # [B, KV] it cost more than the scores over the whole cache (CPU, SmolLM2 batch 32).
        own = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1, keepdims=True) * scale
    else:
        own = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32) * scale
    own = jnp.where(jnp.repeat(own_mask, group, axis=1)[:, None], own, neg)
    # One softmax over [old slots, own keys] without concatenating them (a copy of the scores),
    # normalised after the value products (a pass over [B, KV, Q, D] instead of [B, KV, Q, S]).
    top = jnp.maximum(jnp.max(old, axis=-1, keepdims=True), jnp.max(own, axis=-1, keepdims=True))
    old, own = jnp.exp(old - top), jnp.exp(own - top)
    total = jnp.sum(old, axis=-1, keepdims=True) + jnp.sum(own, axis=-1, keepdims=True)
    out = jnp.einsum("bkqs,bksd->bkqd", old.astype(v.dtype), cache_v, preferred_element_type=jnp.float32)
    if length == 1:
        out = out + own * v.astype(jnp.float32)
    else:
        out = out + jnp.einsum("bkqt,bktd->bkqd", own.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return rows_as_queries((out / total).astype(v.dtype), length)


def attention_over_cache(q, cache_k, cache_v, mask, scale):
    """Attention over a cache that already holds this call's keys and values. q: [B,T,H,D];
    cache_k: [B,KV,D,S]; cache_v: [B,KV,S,D]; mask: [B,T,S] (which slots each query sees)."""
    length = q.shape[1]
    group = q.shape[2] // cache_k.shape[1]
    q = queries_as_rows(q, cache_k.shape[1])
    scores = jnp.einsum("bkqd,bkds->bkqs", q, cache_k, preferred_element_type=jnp.float32) * scale
    mask = jnp.repeat(mask, group, axis=1)[:, None]  # query rows are (t, g)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    # Normalised after the value product: a pass over [B, KV, Q, D] instead of [B, KV, Q, S].
    out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(cache_v.dtype), cache_v, preferred_element_type=jnp.float32)
    return rows_as_queries((out / jnp.sum(weights, axis=-1, keepdims=True)).astype(cache_v.dtype), length)


def decoder_layer(config: DecoderConfig, params: dict, x, positions, inv_freq, attend):
    """One transformer block. `attend(q [B,T,H,D], k, v [B,KV,T,D])` is the attention (over the
    sequence itself, or over a KV cache and the new tokens); it returns (output [B,T,H,D], aux),
    where aux is whatever the caller needs back (the new keys and values, or the updated cache).
    Returns (x, aux)."""
    dtype = x.dtype
    h = rms_norm(x, params["attn_norm"], config.rms_norm_eps)
    q = project("btd,dhk->bthk", h, params["q_proj"].astype(dtype))
    k = project("btd,dhk->bthk", h, params["k_proj"].astype(dtype))
    v = project("btd,dhk->bthk", h, params["v_proj"].astype(dtype))
    if config.qkv_bias:
        q = q + params["q_bias"].astype(dtype)
        k = k + params["k_bias"].astype(dtype)
        v = v + params["v_bias"].astype(dtype)
    if config.qk_norm:
        q = rms_norm(q, params["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, params["k_norm"], config.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    k = k.transpose(0, 2, 1, 3)  # [B, KV, T, D]
    v = v.transpose(0, 2, 1, 3)
    attn, aux = attend(q, k, v)
    out = project("bthk,hkd->btd", attn, params["o_proj"].astype(dtype))
    if config.o_bias:
        out = out + params["o_bias"].astype(dtype)
    x = x + out
    h = rms_norm(x, params["mlp_norm"], config.rms_norm_eps)
    gate = project("btd,df->btf", h, params["gate_proj"].astype(dtype))
    up = project("btd,df->btf", h, params["up_proj"].astype(dtype))
    x = x + project("btf,fd->btd", jax.nn.silu(gate) * up, params["down_proj"].astype(dtype))
    return x, aux


def run_layers(config: DecoderConfig, body, carry, xs, unrolled: bool):
    """`lax.scan(body, carry, xs)` over the stacked layers, with the configured remat. `unrolled`:
    a Python loop over the layers instead (then body's per-layer outputs must be None). XLA CPU
    fills a zeroed stack per saved activation and copies each layer in and out of it around a
    scan; the loop keeps them as separate buffers (bench.step's update 0.62 -> 0.57 s), at the cost
    of compile time that grows with depth."""
    if config.remat == "full":
        body = jax.checkpoint(body, prevent_cse=False)
    elif config.remat == "dots":
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if not unrolled:
        return jax.lax.scan(body, carry, xs)
    for layer in unstack_tree(xs, config.num_layers, _LAYER_INDEX.get()):
        carry, out = body(carry, layer)
        if out is not None:
            raise ValueError("run_layers(unrolled=True) takes a body without per-layer outputs")
    return carry, None


# ----------------------------------------------------------------------------- the module


def layer_param_shapes(config: DecoderConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (shape without the layers axis, logical axis names)."""
    d, f, h, kv, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads, config.head_dim
    shapes = {
        "attn_norm": ((d,), ("embed",)),
        "q_proj": ((d, h, hd), ("embed", "heads", "head_dim")),
        "k_proj": ((d, kv, hd), ("embed", "kv_heads", "head_dim")),
        "v_proj": ((d, kv, hd), ("embed", "kv_heads", "head_dim")),
        "o_proj": ((h, hd, d), ("heads", "head_dim", "embed")),
        "mlp_norm": ((d,), ("embed",)),
        "gate_proj": ((d, f), ("embed", "mlp")),
        "up_proj": ((d, f), ("embed", "mlp")),
        "down_proj": ((f, d), ("mlp", "embed")),
    }
    if config.qkv_bias:
        shapes["q_bias"] = ((h, hd), ("heads", "head_dim"))
        shapes["k_bias"] = ((kv, hd), ("kv_heads", "head_dim"))
        shapes["v_bias"] = ((kv, hd), ("kv_heads", "head_dim"))
    if config.o_bias:
        shapes["o_bias"] = ((d,), ("embed",))
    if config.qk_norm:
        shapes["q_norm"] = ((hd,), ("head_dim",))
        shapes["k_norm"] = ((hd,), ("head_dim",))
    return shapes


def token_positions(attention_mask: jax.Array, start: jax.Array | int, length: int) -> jax.Array:
    """RoPE positions of `length` tokens from slot `start`: the count of real tokens before each
    one, so left padding does not shift them. attention_mask [B, S] bool."""
    seen = jnp.cumsum(attention_mask, axis=1) - 1
    return jnp.maximum(jax.lax.dynamic_slice_in_dim(seen, start, length, axis=1), 0)


class Layers(nnx.Module):
    """All decoder blocks' weights, stacked along a leading `layers` axis."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        dtype = resolve_dtype(config.param_dtype, "model.param_dtype")
        init = nnx.initializers.normal(0.02)
        for name, (shape, axes) in layer_param_shapes(config).items():
            full = (config.num_layers, *shape)
            if name.endswith("norm"):
                value = jnp.ones(full, dtype)
            elif name.endswith("bias"):
                value = jnp.zeros(full, dtype)
            else:
                value = init(rngs.params(), full, dtype)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))


class Decoder(nnx.Module):
    """Causal LM. `model(ids)` -> float32 logits [B, T, V]; with a cache it also returns the cache."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = resolve_dtype(config.param_dtype, "model.param_dtype")
        resolve_dtype(config.compute_dtype, "model.compute_dtype")
        if config.remat not in ("none", "full", "dots"):
            raise ValueError(f"model.remat {config.remat!r} is not one of ['none', 'full', 'dots']")
        if config.train_layers not in ("auto", "scan", "unrolled"):
            raise ValueError(f"model.train_layers {config.train_layers!r} is not one of ['auto', 'scan', 'unrolled']")
        if config.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(f"model.attention {config.attention!r} is not one of {list(attention_lib.IMPLEMENTATIONS)}")
        if config.attention_block < 1:
            raise ValueError(f"model.attention_block must be a positive number of tokens, got {config.attention_block}")
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), dtype), logical_axes=("vocab", "embed"))
        self.layers = Layers(config, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype), logical_axes=("embed",))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (config.hidden_size, config.vocab_size), dtype), logical_axes=("embed", "vocab"))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
        cache: Optional[KVCache] = None,
        cache_index: jax.Array | int = 0,
        return_hidden: bool = False,
        visible_slots: Optional[int] = None,
        segment_ids: Optional[jax.Array] = None,
    ):
        """input_ids [B, T] int32. Returns logits (or final hidden states with `return_hidden`),
        plus the updated cache when one is given. attention_mask [B, T] (or [B, S] with a cache: which cache slots
        hold real tokens) with 0 on left padding. positions default to the count of real tokens
        before each one, so left padding does not shift RoPE. `visible_slots` (static): with a
        cache, read only its first slots, which must hold every slot before `cache_index`
        (the sampler's decode segments use it to skip slots not yet written). `segment_ids` [B, T]
        (no cache; pass `positions` too): packed rows holding several sequences back to back, each
        attending causally within its own segment only (pacs_jax.packing)."""
        config = self.config
        compute = resolve_dtype(config.compute_dtype)
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length if cache is None else cache.slots), jnp.int32)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = token_positions(attention_mask, 0 if cache is None else cache_index, length)

        if segment_ids is not None and (cache is not None or positions is None):
            raise ValueError("segment_ids (packed rows) need explicit positions and no cache")
        scale = 1.0 / math.sqrt(config.head_dim)
        # This call's tokens attend causally to the real ones among themselves (and, in packed rows,
        # within their own segment: segments are contiguous, so causal over columns and equal
        # segment = causal within it). As segments (config.attend never builds a [T, T] mask): a
        # padding key's is -1; a query's is its segment, 0 in unpacked rows.
        new_real = attention_mask if cache is None else jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, length, axis=1)
        q_segments = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        kv_segments = jnp.where(new_real, q_segments, -1)
        # A prefill into an empty cache (index 0, known when tracing) attends to its own tokens only:
        # also scoring every empty slot made the SmolLM2 prefill 1.06x slower on CPU.
        fills_empty_cache = cache is not None and isinstance(cache_index, int) and cache_index == 0

        x = self.embed[...].astype(compute)[input_ids]
        # Without a cache (training / log-prob passes) and in the prefill, keep rows on the data axes
        # between layers: 2x faster updates on a (1, 4, 2) mesh, and a Qwen2.5-7B rollout of 1024
        # prompts on v5p-64 needs 80 GiB per chip instead of 106 (`python -m pacs_jax compile`).
        # Single-token decode is left to XLA, which keeps FSDP weights in place and reduces its few
        # activations instead (constraining it was 2-4x slower). A no-op unless under jax.set_mesh.
        rows_constrained = cache is None or length > 1
        constrain_rows = (lambda h: constrain(h, ACTIVATION_AXES)) if rows_constrained else (lambda h: h)
        x = constrain_rows(x)
        inv_freq = rope_inverse_frequencies(config)
        layer_params = self.stacked_layers()

        if cache is None or fills_empty_cache:

            def body(x, params):
                attend = lambda q, k, v: (config.attend(q, k, v, q_segments, kv_segments), (k, v))
                x, new_kv = decoder_layer(config, params, x, positions, inv_freq, attend)
                return constrain_rows(x), None if cache is None else new_kv

            xs = layer_params
        else:
            # Old slots: real tokens written before this call, among the first `visible` slots.
            visible = cache.slots if visible_slots is None else visible_slots
            cache_mask = (attention_mask & (jnp.arange(cache.slots) < cache_index)[None])[:, :visible]
            own_mask = jnp.tril(jnp.ones((length, length), bool))[None] & new_real[:, None, :]

            # The cache is read-only inside the scan (as xs); each layer returns its new keys/values
            # and all layers' are written with one in-place update after the scan.
            def body(x, layer_inputs):
                params, cache_k, cache_v = layer_inputs
                cache_k, cache_v = cache_k[..., :visible], cache_v[:, :, :visible]
                attend = lambda q, k, v: (cached_attention(q, cache_k, cache_v, k, v, cache_mask, own_mask, scale), (k, v))
                x, new_kv = decoder_layer(config, params, x, positions, inv_freq, attend)
                return constrain_rows(x), new_kv

            xs = (layer_params, cache.k, cache.v)
        x, new_kv = run_layers(config, body, x, xs, unrolled=cache is None and config.unrolled_training_layers())
        out = rms_norm(x, self.final_norm[...], config.rms_norm_eps)
        if not return_hidden:
            out = self.logits(out)
        if cache is None:
            return out
        new_k, new_v = new_kv  # [L, B, KV, T, D]
        new_k = new_k.transpose(0, 1, 2, 4, 3)
        return out, KVCache(
            jax.lax.dynamic_update_slice(cache.k, new_k.astype(cache.k.dtype), (0, 0, 0, 0, cache_index)),
            jax.lax.dynamic_update_slice(cache.v, new_v.astype(cache.v.dtype), (0, 0, 0, cache_index, 0)),
        )

    def stacked_layers(self) -> dict:
        """Every layer's weights as arrays with a leading layers axis, by name (what the layer loop reads)."""
        return {name: getattr(self.layers, name)[...] for name in layer_param_shapes(self.config)}

    def unstacked_layers(self, index: Optional[tuple] = None) -> list[dict]:
        """Each layer's weights as arrays of their own, for `decode_unrolled` (split them once,
        outside the decode loop: a split inside it would copy every weight per step), sliced at
        the traced `layer_index` scalars `index` where given (`unstack_tree`)."""
        return unstack_tree(self.stacked_layers(), self.config.num_layers, index)

    def decode_unrolled(
        self,
        input_ids: jax.Array,
        layers: list[dict],
        cache: LayerKVCache,
        attention_mask: jax.Array,
        cache_index: jax.Array | int,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, LayerKVCache]:
        """The cached forward pass of `__call__`, with the layers unrolled over per-layer weights
        (`unstacked_layers()`) and a LayerKVCache. Each layer first writes this call's keys and
        values into its cache at `cache_index`, in place, then attends over the cache. On XLA CPU
        this is 1.3-1.45x faster per decode step than the scan, which copies each layer's weights
        and cache out of the stacks before a matmul reads them (SmolLM2, batch 32-64, 384-768
        slots; bench.decode_profile). (Attending before the write instead makes XLA copy every
        layer's cache.) attention_mask [B, S]: which slots hold real tokens, this call's included."""
        config = self.config
        compute = resolve_dtype(config.compute_dtype)
        length = input_ids.shape[1]
        attention_mask = attention_mask.astype(bool)
        positions = token_positions(attention_mask, cache_index, length)
        # Query t (at slot cache_index + t) sees the real slots up to its own.
        query_slots = cache_index + jnp.arange(length)
        mask = attention_mask[:, None, :] & (jnp.arange(cache.slots)[None, None, :] <= query_slots[None, :, None])
        scale = 1.0 / math.sqrt(config.head_dim)
        inv_freq = rope_inverse_frequencies(config)

        def write_then_attend(old_k, old_v):
            def attend(q, k, v):
                cache_k = jax.lax.dynamic_update_slice(old_k, k.transpose(0, 1, 3, 2).astype(old_k.dtype), (0, 0, 0, cache_index))
                cache_v = jax.lax.dynamic_update_slice(old_v, v.astype(old_v.dtype), (0, 0, cache_index, 0))
                return attention_over_cache(q, cache_k, cache_v, mask, scale), (cache_k, cache_v)

            return attend

        x = self.embed[...].astype(compute)[input_ids]
        new_k, new_v = [], []
        for params, cache_k, cache_v in zip(layers, cache.k, cache.v, strict=True):
            x, (cache_k, cache_v) = decoder_layer(config, params, x, positions, inv_freq, write_then_attend(cache_k, cache_v))
            new_k.append(cache_k)
            new_v.append(cache_v)
        out = rms_norm(x, self.final_norm[...], config.rms_norm_eps)
        return (out if return_hidden else self.logits(out)), LayerKVCache(tuple(new_k), tuple(new_v))

    def logits(self, hidden: jax.Array) -> jax.Array:
        compute = resolve_dtype(self.config.compute_dtype)
        if self.config.tie_word_embeddings:
            head = self.embed[...].astype(compute).T
        else:
            head = self.lm_head[...].astype(compute)
        return jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)


def init_decoder(config: DecoderConfig, seed: int = 0) -> Decoder:
    return Decoder(config, rngs=nnx.Rngs(params=seed))
