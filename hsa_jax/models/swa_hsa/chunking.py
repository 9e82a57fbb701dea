"""Chunking layer: turns the lower layers' hidden states into the chunk memory shared by all groups.

Per chunk of S tokens (docs/model_math.md "Chunk encoder and landmarks"): an optional bidirectional
encoder (with a learned CLS appended at position S) gives Z; the landmark is lmk_ln(Z[CLS]) or lmk_ln(mean_j
Z[j]); the memory keys/values are proj_k/proj_v(Z[:S]). Chunk c depends on all S of its tokens, so retrieval
only offers it to tokens t >= (c+1)*S.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.common.layers import (ENCODER_NORM_EPS, Attention, ChunkEncoder, Dense, RMSNorm, SwiGLU, scoped,
                                   TransformerBlock, param)

MEMORY_EPS = 1e-6  # Liger's default: the original passes no eps to the chunking/retrieval/HSA norms


def chunk_encoder(cfg: SWAHSAConfig, rngs: nnx.Rngs, dtype) -> ChunkEncoder:
    """The original's encoder: Qwen2-style blocks (q/k/v biases, per-head q/k norms, MLP-input dropout)."""
    D, std = cfg.hidden_size, cfg.initializer_range

    def block():
        attn = Attention(D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hsa_head_dim,
                         norm_eps=ENCODER_NORM_EPS, qkv_bias=True, o_bias=False, std=std, rngs=rngs, dtype=dtype)
        mlp = SwiGLU(D, cfg.encoder_intermediate_size, std=std, rngs=rngs, dtype=dtype)
        return TransformerBlock(attn, mlp, D, ENCODER_NORM_EPS, dropout=cfg.encoder_dropout, dtype=dtype)

    return ChunkEncoder([block() for _ in range(cfg.encoder_layers)], D, cfg.hsa_head_dim, dtype=dtype)


class ChunkingLayer(nnx.Module):
    def __init__(self, cfg: SWAHSAConfig, rngs: nnx.Rngs, dtype):
        D, std, H, hd = cfg.hidden_size, cfg.initializer_range, cfg.num_kv_heads, cfg.hsa_head_dim
        self.cfg = cfg
        self.cls_emb = param(rngs, (1, 1, D), std, axes=(None, None, "embed"), dtype=dtype) if cfg.enable_enc_cls else None
        self.encoder = chunk_encoder(cfg, rngs, dtype) if cfg.encoder_layers > 0 else None
        self.enc_prenorm = RMSNorm(D, MEMORY_EPS, dtype=dtype) if cfg.enc_prenorm else None
        self.norm = RMSNorm(D, MEMORY_EPS, dtype=dtype) if cfg.encoder_layers == 0 else None
        self.proj_k = Dense(D, H * hd, axes=("embed", "kv_heads"), std=std, rngs=rngs, dtype=dtype)
        self.proj_v = Dense(D, H * hd, axes=("embed", "kv_heads"), std=std, rngs=rngs, dtype=dtype)
        self.k_rmsnorm = RMSNorm(hd, MEMORY_EPS, dtype=dtype, axis_name="head_dim") if cfg.enable_qk_norm else None
        self.lmk_ln = Dense(D, cfg.retrieval_dim, axes=("embed", "retrieval"), std=std, rngs=rngs, dtype=dtype)

    def encode_chunks(self, x_BxSxD, dropout_rng=None):
        """Encodes independent chunks. x (B, S, D) -> mem_k, mem_v (B, S, H, hd), landmarks (B, h_r, dr)."""
        cfg = self.cfg
        B, S, D = x_BxSxD.shape
        x = x_BxSxD
        if self.cls_emb is not None:  # CLS goes last: position S
            x = jnp.concatenate([x, jnp.broadcast_to(self.cls_emb[...].astype(x.dtype), (B, 1, D))], axis=1)
        if self.enc_prenorm is not None:
            x = self.enc_prenorm(x)
        z_BxPxD = self.encoder(x, dropout_rng) if self.encoder is not None else self.norm(x)
        if self.cls_emb is not None:
            lmk_BxR = self.lmk_ln(z_BxPxD[:, S])
        else:
            lmk_BxR = self.lmk_ln(jnp.mean(z_BxPxD[:, :S], axis=1))
        z_BxSxD = z_BxPxD[:, :S]
        H, hd, hr = cfg.num_kv_heads, cfg.hsa_head_dim, cfg.retrieval_heads
        mem_k = self.proj_k(z_BxSxD).reshape(B, S, H, hd)
        if self.k_rmsnorm is not None:
            mem_k = self.k_rmsnorm(mem_k)
        mem_v = self.proj_v(z_BxSxD).reshape(B, S, H, hd)
        return mem_k, mem_v, lmk_BxR.reshape(B, hr, cfg.retrieval_dim // hr)

    @scoped("chunking")
    def __call__(self, h_NxTxD, dropout_rng=None):
        """-> mem_k, mem_v (N, T, H, hd) and landmarks (N, C, h_r, dr), C = T / S."""
        N, T, D = h_NxTxD.shape
        S = self.cfg.chunk_size
        C = T // S
        k, v, lmk = self.encode_chunks(h_NxTxD.reshape(N * C, S, D), dropout_rng)
        H, hd = k.shape[-2:]
        return (k.reshape(N, T, H, hd), v.reshape(N, T, H, hd), lmk.reshape(N, C, *lmk.shape[1:]))
