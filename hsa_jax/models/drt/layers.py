"""DRT building blocks (docs/model_math.md "DRT"): Llama self-attention in its three flavours, chunk
retrieval by landmarks, grouped cross attention (GCA) and the upper decoder layer.

Attribute names follow the original modules (`self_attn.q_proj`, `gca.pre_norm`, ...), so interop is
the mechanical rename of hsa_jax/interop.py. Norms, projections and the MLP come from hsa_jax/layers.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hsa_jax.common.layers import Dense, RMSNorm, SwiGLU, apply_rope, attention_backend, sliding_window_attention
from hsa_jax.common.topk import top_k_indices
from pallas_kernels.gca import gca_attention

ALIBI_BLOCK = 256  # query rows per block of the banded ALiBi attention


class DRTAttention(nnx.Module):
    """Llama attention without q/k norms or biases, called like layers.Attention: (u, cos, sin, window).

    cos/sin None: no rotary embedding (the decoder). window None: bidirectional (the chunk encoder);
    window W: causal, query t sees keys t-W..t, and with `alibi_slopes` the flash-attn ALiBi bias
    -m_h (t - j) is added to the scaled logits. Query head h reads kv head h // (heads / kv_heads).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, *, std: float, rngs: nnx.Rngs, dtype,
                 alibi_slopes: tuple[float, ...] | None = None):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        hd = self.head_dim
        self.q_proj = Dense(dim, heads * hd, axes=("embed", "heads"), std=std, rngs=rngs, dtype=dtype)
        self.k_proj = Dense(dim, kv_heads * hd, axes=("embed", "kv_heads"), std=std, rngs=rngs, dtype=dtype)
        self.v_proj = Dense(dim, kv_heads * hd, axes=("embed", "kv_heads"), std=std, rngs=rngs, dtype=dtype)
        self.o_proj = Dense(heads * hd, dim, axes=("heads", "embed"), std=std, rngs=rngs, dtype=dtype)
        self.alibi_slopes = alibi_slopes

    def __call__(self, u_NxTxD, cos, sin, window: int | None):
        N, T, _ = u_NxTxD.shape
        q = self.q_proj(u_NxTxD).reshape(N, T, self.heads, self.head_dim)
        k = self.k_proj(u_NxTxD).reshape(N, T, self.kv_heads, self.head_dim)
        v = self.v_proj(u_NxTxD).reshape(N, T, self.kv_heads, self.head_dim)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        backend = attention_backend(q.dtype, self.head_dim, T)  # cuDNN flash for 16-bit on GPU
        with jax.named_scope("attn_core"):
            if window is None:
                a = jax.nn.dot_product_attention(q, k, v, implementation=backend)
            elif self.alibi_slopes is not None:
                a = sliding_window_attention(q, k, v, window, slopes_H=jnp.asarray(self.alibi_slopes, jnp.float32),
                                             block=ALIBI_BLOCK)
            else:
                a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=backend,
                                                 local_window_size=None if window >= T - 1 else (window, 0))
        return self.o_proj(a.reshape(N, T, self.heads * self.head_dim))


def select_chunks(q_NxCxD, lmk_NxCxD, topk: int, noise_rng=None):
    """Chunk retrieval by landmarks (docs/model_math.md "DRT retrieval"). Row c (the landmark of chunk c)
    scores every chunk j < c by q_c . lmk_j / sqrt(D) (fp32), picks the top K = min(C, topk) (by score +
    Gumbel noise when noise_rng is given) and weighs them by a softmax of their clean scores. Slots beyond the
    visible chunks carry weight 0; a row with nothing visible has all-zero weights (the original's NaN -> 0)
    and no NaN gradients.
    Returns weights (N, C, K) fp32, indices (N, C, K) int32 (the order of every family's select_chunks)
    and the masked scores (N, C, C)."""
    N, C, D = q_NxCxD.shape
    K = min(C, topk)
    s_NxCxC = jnp.einsum("ncd,njd->ncj", q_NxCxD.astype(jnp.float32), lmk_NxCxD.astype(jnp.float32)) / math.sqrt(D)
    visible_CxC = jnp.arange(C)[None, :] < jnp.arange(C)[:, None]
    masked = jnp.where(visible_CxC, s_NxCxC, -jnp.inf)
    rank = masked if noise_rng is None else masked + jax.random.gumbel(noise_rng, masked.shape)
    idx_NxCxK = top_k_indices(rank, K)
    ok = idx_NxCxK < jnp.arange(C)[None, :, None]
    g = jnp.where(ok, jnp.take_along_axis(s_NxCxC, idx_NxCxK, axis=-1), 0.0)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(ok, g, -jnp.inf), axis=-1, keepdims=True))
    e = jnp.where(ok, jnp.exp(g - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0), idx_NxCxK.astype(jnp.int32), masked


def gather_chunks(mem_NxCxLkxD, idx_NxRxK, heads: int):
    """mem[n, idx[n, r, k]] split into heads: (N*R, heads, K, Lk, D/heads), the GCA op's layout."""
    N, C, Lk, D = mem_NxCxLkxD.shape
    _, R, K = idx_NxRxK.shape
    mem_NxCxHxLkxd = mem_NxCxLkxD.reshape(N, C, Lk, heads, D // heads).transpose(0, 1, 3, 2, 4)
    g = jax.vmap(lambda m, i: m[i])(mem_NxCxHxLkxd, idx_NxRxK)  # (N, R, K, H, Lk, d)
    return g.transpose(0, 1, 3, 2, 4, 5).reshape(N * R, heads, K, Lk, D // heads)


class GroupCrossAttention(nnx.Module):
    """GCA (docs/model_math.md "Grouped cross attention"): every position of chunk c >= 1, landmark
    included, attends to the K chunks retrieved by the landmark of chunk c-1; chunk 0 gets zeros."""

    def __init__(self, dim: int, heads: int, norm_eps: float, *, std: float, rngs: nnx.Rngs, dtype):
        self.heads = heads
        self.pre_norm = RMSNorm(dim, norm_eps, dtype=dtype)
        self.q_proj = Dense(dim, dim, axes=("embed", "heads"), std=std, rngs=rngs, dtype=dtype)
        self.o_proj = Dense(dim, dim, axes=("heads", "embed"), std=std, rngs=rngs, dtype=dtype)

    def __call__(self, a_NxTxD, k_RxHxKxLkxd, v_RxHxKxLkxd, w_RxK, P: int, impl: str):
        """impl: the GCA backend (cfg.gca_impl, read at call time so that it can change after loading)."""
        N, T, D = a_NxTxD.shape
        C, H, d = T // P, self.heads, D // self.heads
        q = self.q_proj(self.pre_norm(a_NxTxD[:, P:]))  # chunks 1..C-1 only: chunk 0 retrieves nothing
        q_RxHxPxd = q.reshape(N, C - 1, P, H, d).transpose(0, 1, 3, 2, 4).reshape(N * (C - 1), H, P, d)
        with jax.named_scope("gca_core"):
            o = gca_attention(q_RxHxPxd, k_RxHxKxLkxd.astype(q.dtype), v_RxHxKxLkxd.astype(q.dtype), w_RxK,
                              impl=impl)
        o = self.o_proj(o.reshape(N, C - 1, H, P, d).transpose(0, 1, 3, 2, 4).reshape(N, T - P, D))
        return jnp.concatenate([jnp.zeros((N, P, D), o.dtype), o], axis=1)


class UpperDecoderLayer(nnx.Module):
    """a = h + SelfAttn(RMS(h));  h' = a + MLP(RMS(a + GCA(a))): the GCA output reaches the stream only
    through the MLP input (the original's "DO NOT RESET RESIDUAL")."""

    def __init__(self, attn: DRTAttention, gca: GroupCrossAttention, mlp: SwiGLU, dim: int, norm_eps: float,
                 *, dtype):
        self.self_attn = attn
        self.gca = gca
        self.mlp = mlp
        self.input_layernorm = RMSNorm(dim, norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps, dtype=dtype)

    def __call__(self, h_NxTxD, window: int, P: int, memory=None, gca_impl: str = "auto"):
        """memory: (k, v, w) of the group's retrieval, or None when there is a single chunk.
        Returns (h', GCA output (N, T, D))."""
        a = h_NxTxD + self.self_attn(self.input_layernorm(h_NxTxD), None, None, window)
        g = jnp.zeros_like(a) if memory is None else self.gca(a, *memory, P, gca_impl)
        return a + self.mlp(self.post_attention_layernorm(a + g)), g
