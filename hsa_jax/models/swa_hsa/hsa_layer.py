"""Hierarchical sparse attention layer (docs/model_math.md "HSA layer"): every token attends to its K
retrieved chunks of the shared memory, one softmax per chunk, mixed by the retrieval weights.

    res = h   (or, when hsa_only is false: res = h = h + SWA(RMS(h)))
    o   = o_proj(HSA(q_norm(q_proj(RMS(h))), mem_k, mem_v, weights, indices))
    out = res + MLP(RMS(res + o))          (+ o as well when reset_hsa_residual)
By default the HSA output reaches the residual stream only through the MLP input, as in the original.
"""

from __future__ import annotations

import jax
from flax import nnx

from hsa_jax.models.swa_hsa.chunking import MEMORY_EPS
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.common.layers import Attention, Dense, RMSNorm, SwiGLU
from pallas_kernels import hsa_attention


class HSALayer(nnx.Module):
    def __init__(self, cfg: SWAHSAConfig, rngs: nnx.Rngs, dtype):
        D, HQ, std = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range
        self.cfg = cfg
        self.pre_norm = RMSNorm(D, MEMORY_EPS, dtype=dtype)
        if not cfg.hsa_only:
            self.swa_prenorm = RMSNorm(D, MEMORY_EPS, dtype=dtype)
            self.attn = Attention(D, HQ, cfg.num_key_value_heads, cfg.head_dim, norm_eps=cfg.rms_norm_eps,
                                  qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, std=std,
                                  rngs=rngs, dtype=dtype)
        else:
            self.swa_prenorm = self.attn = None
        self.q_norm = RMSNorm(cfg.hsa_head_dim, MEMORY_EPS, dtype=dtype, axis_name="head_dim") if cfg.enable_qk_norm else None
        self._mlp_norm = RMSNorm(D, MEMORY_EPS, dtype=dtype)
        self._mlp = SwiGLU(D, cfg.intermediate_size, std=std, rngs=rngs, dtype=dtype)
        self.q_proj = Dense(D, D, axes=("embed", "heads"), std=std, rngs=rngs, dtype=dtype)
        self.o_proj = Dense(D, D, axes=("heads", "embed"), std=std, rngs=rngs, dtype=dtype)

    @property
    def swa_window(self) -> int:
        return self.cfg.hsa_sliding_window or self.cfg.sliding_window

    def __call__(self, h_NxTxD, mem_k_NxLxHxd, mem_v_NxLxHxd, w_NxTxHxK, idx_NxTxHxK, cos, sin, *, attend=None,
                 impl: str | None = None):
        """attend(attn, u): replaces the layer's own SWA attn(u, cos, sin, window) (the decoder's cached
        attention); impl: the HSA backend (default cfg.hsa_impl). Queries may be fewer than memory rows."""
        cfg = self.cfg
        if self.attn is not None:
            u = self.swa_prenorm(h_NxTxD)
            h_NxTxD = h_NxTxD + (self.attn(u, cos, sin, window=self.swa_window) if attend is None
                                 else attend(self.attn, u))
        if cfg.skip_hsa:
            return h_NxTxD
        N, T, D = h_NxTxD.shape
        q = self.q_proj(self.pre_norm(h_NxTxD)).reshape(N, T, cfg.num_attention_heads, cfg.hsa_head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        with jax.named_scope("hsa_core"):
            o = hsa_attention(q, mem_k_NxLxHxd.astype(q.dtype), mem_v_NxLxHxd.astype(q.dtype), w_NxTxHxK,
                              idx_NxTxHxK, chunk_size=cfg.chunk_size, sm_n=cfg.sm_n, impl=impl or cfg.hsa_impl)
        o = self.o_proj(o.reshape(N, T, D))
        m = self._mlp(self._mlp_norm(h_NxTxD + o))
        return h_NxTxD + o + m if cfg.reset_hsa_residual else h_NxTxD + m
