"""Causal attention over a whole sequence (the training passes and an empty-cache prefill), by one
of four implementations (`model.attention`):

    dense      scores [B, H, T, S] in float32, one softmax: the reference, and fastest on CPU at
               the lengths a debug run uses; memory grows with T x S
    blockwise  online softmax over blocks of `attention_block` queries x keys in plain JAX, with a
               backward (custom_vjp) that recomputes each block from the saved log-sum-exp
               (FlashAttention-2's): neither pass holds more than one block's scores, so memory
               grows linearly with the length. Any backend.
    splash     the Pallas splash attention kernel on TPU (jax.experimental.pallas.ops.tpu), wrapped in
               jax.shard_map over the mesh (rows on data x fsdp, KV heads on tensor); elsewhere it
               runs in Pallas's interpret mode (tests only: slow)
    cudnn      cuDNN's fused flash attention on GPU (jax.nn.dot_product_attention); bfloat16 /
               float16 only. Our masks (left-padded prompts, packed segments, shared prompts) are
               not cuDNN's built-in padding, so the mask is passed as a [B, 1, T, S] boolean: the
               scores are never stored, but JAX makes that mask a bias in the compute dtype (2
               bytes per query-key pair per row).

`auto` picks by backend and compute dtype: splash on TPU, cudnn on GPU in bfloat16 (else
blockwise), dense on CPU.

Every implementation computes the same mask, given per position: query i (of T) may see key j (of
S) when j <= i + S - T (causal, the last query aligned with the last key: a shared prompt's
responses attend over [prompt, own response]) and q_segments[i] == kv_segments[j]. Callers mark
a padding key with segment -1 (a query's segment is >= 0), and packed rows give each sequence its
own segment. A query that sees no key (a left-padding position) gets some finite output, which
nothing reads: every implementation keeps it finite, so its zero cotangent stays zero.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "splash", "cudnn")
# Finite, so a query that sees no key never produces inf - inf (splash's DEFAULT_MASK_VALUE).
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_QUERY_PAD, _KEY_PAD = -3, -2  # segments of the rows / columns added to reach a block multiple


def resolve(implementation: str, backend: str, compute_dtype: str) -> str:
    """The implementation `auto` means on `backend` ("cpu", "gpu", "tpu") for `compute_dtype`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention {implementation!r} is not one of {list(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda", "rocm"):
        return "cudnn" if compute_dtype == "bfloat16" else "blockwise"
    return "dense"


def causal_attention(q, k, v, q_segments, kv_segments, scale: float, *, implementation: str, block: int = 512,
                     backend: Optional[str] = None):
    """q [B, T, H, D]; k, v [B, KV, S, D] (H a multiple of KV); q_segments [B, T], kv_segments
    [B, S] int32. Returns [B, T, H, D] in v's dtype. `implementation` is one of IMPLEMENTATIONS
    but "auto" (see `resolve`); `backend` (default: jax's) decides whether splash runs compiled."""
    if implementation == "dense":
        return dense_attention(q, k, v, segment_mask(q_segments, kv_segments), scale)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, q_segments, kv_segments, scale, block, block)
    if implementation == "splash":
        return splash_attention(q, k, v, q_segments, kv_segments, scale, block,
                                interpret=(backend or jax.default_backend()) != "tpu")
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, q_segments, kv_segments, scale)
    raise ValueError(f"unknown attention implementation {implementation!r}; one of {list(IMPLEMENTATIONS[1:])}")


def segment_mask(q_segments, kv_segments):
    """[B, T, S] bool: the mask every implementation applies (causal, bottom-right aligned, and
    equal segments)."""
    length, slots = q_segments.shape[1], kv_segments.shape[1]
    causal = jnp.arange(slots)[None, :] <= jnp.arange(length)[:, None] + (slots - length)
    return causal[None] & (q_segments[:, :, None] == kv_segments[:, None, :])


def dense_attention(q, k, v, mask, scale):
    """Grouped-query attention over a materialised mask. q: [B,T,H,D]; k, v: [B,KV,S,D]; mask: [B,T,S] bool."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(batch, length, heads, dim)


# ------------------------------------------------------------------------------ blockwise


def _pad_to(x, axis: int, size: int, value):
    extra = size - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, k, v, q_segments, kv_segments, scale: float, block_q: int = 512, block_kv: int = 512):
    """`dense_attention` with the mask of `segment_mask`, computed block by block (online softmax;
    the backward recomputes each block). Lengths need not be block multiples (padded inside)."""
    batch, length, heads, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk = min(block_q, length), min(block_kv, slots)
    nq, nk = -(-length // bq), -(-slots // bk)
    # Blocks lead, so each loop step reads one with a dynamic index: q [nq, B, KV, G, bq, D],
    # k, v [nk, B, KV, bk, D], segments [n, B, b].
    qb = _pad_to(q, 1, nq * bq, 0).reshape(batch, nq, bq, kv_heads, group, dim).transpose(1, 0, 3, 4, 2, 5)
    kb = _pad_to(k, 2, nk * bk, 0).reshape(batch, kv_heads, nk, bk, dim).transpose(2, 0, 1, 3, 4)
    vb = _pad_to(v, 2, nk * bk, 0).reshape(batch, kv_heads, nk, bk, dim).transpose(2, 0, 1, 3, 4)
    qs = _pad_to(q_segments.astype(jnp.int32), 1, nq * bq, _QUERY_PAD).reshape(batch, nq, bq).transpose(1, 0, 2)
    ks = _pad_to(kv_segments.astype(jnp.int32), 1, nk * bk, _KEY_PAD).reshape(batch, nk, bk).transpose(1, 0, 2)
    out = _flash(qb, kb, vb, qs, ks, float(scale), slots - length)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, nq * bq, heads, dim)
    return out[:, :length].astype(v.dtype)


def _block_mask(qs_i, ks_j, i, j, bq: int, bk: int, offset: int):
    """[B, 1, 1, bq, bk]: query block i against key block j."""
    q_pos = i * bq + jnp.arange(bq) + offset
    k_pos = j * bk + jnp.arange(bk)
    causal = k_pos[None, :] <= q_pos[:, None]
    return (causal[None] & (qs_i[:, :, None] == ks_j[:, None, :]))[:, None, None]


def _visible_blocks(i, bq: int, bk: int, offset: int, nk: int):
    """Key blocks 0 .. n - 1 hold every key query block i may see (the causal bound)."""
    return jnp.minimum(nk, ((i + 1) * bq - 1 + offset) // bk + 1)


def _first_query_block(j, bq: int, bk: int, offset: int):
    """The first query block that may see key block j."""
    return jnp.maximum(0, (j * bk - offset) // bq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qb, kb, vb, qs, ks, scale: float, offset: int):
    return _flash_forward(qb, kb, vb, qs, ks, scale, offset)[0]


def _flash_forward(qb, kb, vb, qs, ks, scale, offset):
    nq, batch, kv_heads, group, bq, dim = qb.shape
    nk, bk = kb.shape[0], kb.shape[3]

    def query_block(_, inputs):
        i, q_i, qs_i = inputs

        def key_block(j, carry):
            top, total, acc = carry
            s = jnp.einsum("bkgqd,bksd->bkgqs", q_i, kb[j], preferred_element_type=jnp.float32) * scale
            s = jnp.where(_block_mask(qs_i, ks[j], i, j, bq, bk, offset), s, _MASKED)
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            keep = jnp.exp(top - new_top)
            p = jnp.exp(s - new_top[..., None])
            acc = acc * keep[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb[j],
                                                     preferred_element_type=jnp.float32)
            return new_top, total * keep + jnp.sum(p, axis=-1), acc

        stats = (batch, kv_heads, group, bq)
        init = (jnp.full(stats, _MASKED, jnp.float32), jnp.zeros(stats, jnp.float32), jnp.zeros((*stats, dim), jnp.float32))
        # Only the key blocks the causal bound lets this query block see (block 0 always).
        top, total, acc = jax.lax.fori_loop(0, _visible_blocks(i, bq, bk, offset, nk), key_block, init)
        return None, ((acc / total[..., None]).astype(qb.dtype), top + jnp.log(total))

    _, (out, lse) = jax.lax.scan(query_block, None, (jnp.arange(nq), qb, qs))
    return out, (qb, kb, vb, qs, ks, out, lse)


def _flash_fwd(qb, kb, vb, qs, ks, scale, offset):
    return _flash_forward(qb, kb, vb, qs, ks, scale, offset)


def _flash_bwd(scale, offset, residuals, d_out):
    qb, kb, vb, qs, ks, out, lse = residuals
    nq, bq = qb.shape[0], qb.shape[4]
    bk = kb.shape[3]
    # D_i = rowsum(dO * O): the softmax's backward without the probabilities of a whole row.
    d_rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def key_block(dq, inputs):
        j, k_j, v_j, ks_j = inputs

        def query_block(i, carry):
            dq, dk, dv = carry
            q_i, do_i = qb[i], d_out[i]
            s = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
            s = jnp.where(_block_mask(qs[i], ks_j, i, j, bq, bk, offset), s, _MASKED)
            p = jnp.exp(s - lse[i][..., None])
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(v_j.dtype), do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - d_rows[i][..., None]) * scale
            dq = dq.at[i].add(jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32))
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        # Only the query blocks that may see this key block.
        dq, dk, dv = jax.lax.fori_loop(_first_query_block(j, bq, bk, offset), nq, query_block, (dq, zeros, zeros))
        return dq, (dk.astype(kb.dtype), dv.astype(vb.dtype))

    dq = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(key_block, dq, (jnp.arange(kb.shape[0]), kb, vb, ks))
    return dq.astype(qb.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------- splash


def _splash_blocks(length: int, block: int) -> tuple[int, int]:
    """(block, padded length): blocks of at most `block`, a multiple of 128 (the TPU's lane width)."""
    size = min(-(-block // 128) * 128, -(-length // 128) * 128)
    return size, -(-length // size) * size


def splash_attention(q, k, v, q_segments, kv_segments, scale: float, block: int = 512, *, interpret: bool = False):
    """The Pallas splash kernel (causal mask with the bottom-right offset, segment ids), one MQA
    kernel per KV head over its query heads, under jax.shard_map when a mesh is set."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    from pacs_jax.sharding import logical_to_spec

    batch, length, heads, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, padded_q = _splash_blocks(length, block)
    bk, padded_kv = _splash_blocks(slots, block)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                              block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    mask = splash.MultiHeadMask([splash.CausalMask((padded_q, padded_kv), offset=slots - length)] * group)
    kernel = splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    # The kernel takes no scale: scaled queries (in float32, then the compute dtype).
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(batch, length, kv_heads, group, dim)
    qh = _pad_to(qh.transpose(0, 2, 3, 1, 4), 3, padded_q, 0)  # [B, KV, G, T, D]
    kh, vh = _pad_to(k, 2, padded_kv, 0), _pad_to(v, 2, padded_kv, 0)
    qs = _pad_to(q_segments.astype(jnp.int32), 1, padded_q, _QUERY_PAD)
    ks = _pad_to(kv_segments.astype(jnp.int32), 1, padded_kv, _KEY_PAD)

    def local(qh, kh, vh, qs, ks):
        def one_row(q_row, k_row, v_row, qs_row, ks_row):  # [KV, G, T, D], [KV, S, D]
            ids = splash.SegmentIds(q=qs_row, kv=ks_row)
            return jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(q_row, k_row, v_row)

        return jax.vmap(one_row)(qh, kh, vh, qs, ks)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        out = local(qh, kh, vh, qs, ks)
    else:
        def spec(*names, shape):
            return logical_to_spec(names, shape=shape, mesh=mesh)

        q_spec = spec("batch", "activation_kv_heads", None, None, None, shape=qh.shape)
        kv_spec = spec("batch", "activation_kv_heads", None, None, shape=kh.shape)
        row_spec = jax.sharding.PartitionSpec(q_spec[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec), out_specs=q_spec,
                            check_vma=False)(qh, kh, vh, qs, ks)
    out = out[:, :, :, :length].transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)
    return out.astype(v.dtype)


# ---------------------------------------------------------------------------------- cuDNN


def cudnn_attention(q, k, v, q_segments, kv_segments, scale: float):
    """cuDNN's fused attention through jax.nn.dot_product_attention (GPU only), with our mask."""
    mask = segment_mask(q_segments, kv_segments)[:, None]  # [B, 1, T, S]: broadcast over heads
    out = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask, scale=scale,
                                       implementation="cudnn")
    return out.astype(v.dtype)
