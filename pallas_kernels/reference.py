"""Pure-jnp reference of the HSA (hierarchical sparse attention) op: the oracle for every kernel test.

Math (docs/model_math.md "HSA op"), for query token l, query head h, retrieval row b = l // Q,
kv head e = h // G, slot k:
    c = indices[n, b, e, k],  w = weights[n, b, e, k]
    x_j = scale * q[n, l, h] . key[n, c*S + j, e]            j = 0..S-1
    O_k = sum_j exp(x_j) val[n, c*S + j, e] / (sm_n + sum_j exp(x_j))
    out[n, l, h] = sum_k w * O_k
Each chunk gets its own softmax (with `sm_n` added to the denominator: softmax-off-by-one when 1), and
the K per-chunk results are mixed linearly by the retrieval weights.

Out-of-range chunk ids (the contract of every HSA backend, defined here): a slot whose index c lies
outside [0, C), C = Lkv / S, negative ids included, contributes nothing: it is treated as weight 0
(and its d(weight) is 0). When `indices` is concrete (eager calls, numpy inputs: not a tracer under
jit / vmap) such an id is a ValueError naming the value, its position and [0, C) instead; under
tracing a data-dependent error is impossible, so the masking applies (`mask_out_of_range`).
Padding slots should carry weight 0 and a valid id (conventionally 0).

Memory: the op scans over the K slots and gathers one chunk per (query row, kv head) at a time, so it
never materialises anything of size Lq x Lkv; the scan body is rematerialised under `jax.grad`, so
the backward keeps only O(K * Lq * H) residuals besides the inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def check_hsa_args(q, k, v, weights, indices, chunk_size: int) -> tuple[int, int, int]:
    """Validates shapes of the HSA op's arguments; returns (G, Q, C): heads per kv head, queries per
    retrieval row, chunks in the kv sequence. Raises ValueError naming the offending argument."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"hsa_attention: q, k, v must be rank 4 (N, L, heads, D); got q{q.shape}, k{k.shape}, v{v.shape}")
    n, lq, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"hsa_attention: k{k.shape} and v{v.shape} must have the same shape")
    nk, lkv, h, dk = k.shape
    if nk != n or dk != d:
        raise ValueError(f"hsa_attention: k{k.shape} must match q{q.shape} in batch and head_dim")
    if hq % h:
        raise ValueError(f"hsa_attention: query heads {hq} must be a multiple of kv heads {h}")
    if chunk_size <= 0 or lkv % chunk_size:
        raise ValueError(
            f"hsa_attention: kv length {lkv} must be a positive multiple of chunk_size={chunk_size}")
    if weights.shape != indices.shape or weights.ndim != 4:
        raise ValueError(
            f"hsa_attention: weights{weights.shape} and indices{indices.shape} must both be (N, Lq/Q, H, K)")
    nw, nb, hw, _ = weights.shape
    if nw != n or hw != h or nb == 0 or lq % nb:
        raise ValueError(
            f"hsa_attention: weights/indices{weights.shape} must be (N={n}, Lq/Q, H={h}, K) "
            f"with Lq={lq} a multiple of the row count")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"hsa_attention: indices must be integers, got {indices.dtype}")
    check_chunk_ids(indices, lkv // chunk_size)
    return hq // h, lq // nb, lkv // chunk_size


def check_chunk_ids(indices, num_chunks: int) -> None:
    """Eager check of concrete chunk ids: ValueError naming the first id outside [0, num_chunks), its
    position and the allowed range. Does nothing for tracers (under jit / vmap / scan the values are
    unknown; `mask_out_of_range` gives such ids weight 0)."""
    if isinstance(indices, jax.core.Tracer) or (isinstance(indices, jax.Array) and not indices.is_fully_addressable):
        return
    idx = np.asarray(indices)
    bad = (idx < 0) | (idx >= num_chunks)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"hsa_attention: chunk id {int(idx[pos])} at indices{list(pos)} is out of range: chunk ids "
            f"must lie in [0, {num_chunks}) (kv length / chunk_size); {int(bad.sum())} of {idx.size} "
            f"ids are outside it. Under jax.jit such ids are masked to weight 0 instead.")


def mask_out_of_range(weights, indices, num_chunks: int):
    """(weights, indices) with every slot whose id lies outside [0, num_chunks) given weight 0 and id 0:
    the slot adds nothing to the output, and d(weight) of the slot is 0. Indices come back int32."""
    idx = indices.astype(jnp.int32)
    ok = (idx >= 0) & (idx < num_chunks)
    return jnp.where(ok, weights, jnp.zeros((), weights.dtype)), jnp.where(ok, idx, 0)


def hsa_attention_reference(q_NxLxHQxD, k_NxLkvxHxD, v_NxLkvxHxD, w_NxBxHxK, idx_NxBxHxK, *,
                            chunk_size: int, sm_n: float = 0.0, scale: float | None = None):
    """Reference HSA op in fp32. Returns (N, Lq, HQ, D) in q's dtype. A slot whose chunk id lies
    outside [0, Lkv/S) contributes nothing (weight 0); concrete out-of-range ids raise ValueError
    (module docstring)."""
    G, Q, C = check_hsa_args(q_NxLxHQxD, k_NxLkvxHxD, v_NxLkvxHxD, w_NxBxHxK, idx_NxBxHxK, chunk_size)
    N, Lq, HQ, D = q_NxLxHQxD.shape
    H, S = k_NxLkvxHxD.shape[2], chunk_size
    B = Lq // Q
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    sm_n = float(sm_n)
    f32 = jnp.float32

    q = q_NxLxHQxD.astype(f32).reshape(N, B, Q, H, G, D)
    k_NxCxSxHxD = k_NxLkvxHxD.astype(f32).reshape(N, C, S, H, D)
    v_NxCxSxHxD = v_NxLkvxHxD.astype(f32).reshape(N, C, S, H, D)
    # Slot axis first so that lax.scan walks the K retrieved chunks.
    w_NxBxHxK, idx_NxBxHxK = mask_out_of_range(w_NxBxHxK.astype(f32), idx_NxBxHxK, C)
    idx_KxNxBxH = jnp.moveaxis(idx_NxBxHxK, -1, 0)
    w_KxNxBxH = jnp.moveaxis(w_NxBxHxK, -1, 0)

    def gather_chunks(x_NxCxSxHxD, idx_NxBxH):
        # x[n, idx[n, b, h], :, h, :] -> (N, B, S, H, D)
        x_NxHxCxSxD = jnp.moveaxis(x_NxCxSxHxD, 3, 1)
        g_NxHxBxSxD = jax.vmap(jax.vmap(lambda xc, i: xc[i]))(x_NxHxCxSxD, jnp.moveaxis(idx_NxBxH, 2, 1))
        return jnp.moveaxis(g_NxHxBxSxD, 1, 3)

    @jax.checkpoint
    def one_slot(out, slot):
        idx_NxBxH, w_NxBxH = slot
        kc = gather_chunks(k_NxCxSxHxD, idx_NxBxH)  # (N, B, S, H, D)
        vc = gather_chunks(v_NxCxSxHxD, idx_NxBxH)
        x = jnp.einsum("nbqhgd,nbshd->nbqhgs", q, kc) * scale  # (N, B, Q, H, G, S)
        m = jnp.max(x, axis=-1, keepdims=True)
        if sm_n:  # the implicit extra logit 0 must take part in the max for stability
            m = jnp.maximum(m, 0.0)
        m = jax.lax.stop_gradient(m)
        p = jnp.exp(x - m)
        denom = jnp.sum(p, axis=-1, keepdims=True) + sm_n * jnp.exp(-m)
        o = jnp.einsum("nbqhgs,nbshd->nbqhgd", p / denom, vc)
        return out + w_NxBxH[:, :, None, :, None, None] * o, None

    out = jnp.zeros((N, B, Q, H, G, D), f32)
    out, _ = jax.lax.scan(one_slot, out, (idx_KxNxBxH, w_KxNxBxH))
    return out.reshape(N, Lq, HQ, D).astype(q_NxLxHQxD.dtype)


def check_gca_args(q, k, v, weights) -> int:
    """Validates shapes of the GCA op's arguments; returns G = query heads per kv head. Raises
    ValueError naming the offending argument."""
    if q.ndim != 4 or k.ndim != 5 or k.shape != v.shape:
        raise ValueError(f"gca_attention: q must be (B, HQ, Lq, D) and k, v (B, H, K, Lk, D) alike; "
                         f"got q{q.shape}, k{k.shape}, v{v.shape}")
    b, hq, _, d = q.shape
    bk, h, kk, _, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"gca_attention: k{k.shape} must match q{q.shape} in batch and head_dim")
    if hq % h:
        raise ValueError(f"gca_attention: query heads {hq} must be a multiple of kv heads {h}")
    if weights.shape != (b, kk):
        raise ValueError(f"gca_attention: weights{weights.shape} must be (B={b}, K={kk})")
    return hq // h


def gca_attention_reference(q_BxHQxLqxD, k_BxHxKxLkxD, v_BxHxKxLkxD, w_BxK, *, scale: float | None = None):
    """Reference GCA op (DRT grouped cross attention, docs/model_math.md "GCA op") in fp32:
        o[b, h, i] = sum_k w[b, k] * sum_j softmax_j(scale * q[b, h, i] . k[b, h//G, k, j]) v[b, h//G, k, j]
    Each of the K retrieved chunks has its own softmax over its Lk keys (no mask, no softmax+1); the
    results are mixed linearly by the weights, shared by all heads. Returns (B, HQ, Lq, D) in q's dtype."""
    G = check_gca_args(q_BxHQxLqxD, k_BxHxKxLkxD, v_BxHxKxLkxD, w_BxK)
    B, HQ, Lq, D = q_BxHQxLqxD.shape
    H = k_BxHxKxLkxD.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    f32 = jnp.float32
    q = q_BxHQxLqxD.astype(f32).reshape(B, H, G, Lq, D)
    x_BxHxGxKxLqxLk = jnp.einsum("begid,bekjd->begkij", q, k_BxHxKxLkxD.astype(f32)) * scale
    p = jax.nn.softmax(x_BxHxGxKxLqxLk, axis=-1)
    o_BxHxGxKxLqxD = jnp.einsum("begkij,bekjd->begkid", p, v_BxHxKxLkxD.astype(f32))
    o = jnp.einsum("begkid,bk->begid", o_BxHxGxKxLqxD, w_BxK.astype(f32))
    return o.reshape(B, HQ, Lq, D).astype(q_BxHQxLqxD.dtype)
