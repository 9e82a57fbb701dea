"""Retrieval layer: every token scores the landmarks of the chunks it may see and keeps the top K.

docs/model_math.md "Retrieval scores and visibility", "Chunk selection and slot order", "Chunk
weights". Scores s[n,t,e,c] = r[n,t,e] . lmk[n,c,e] / sqrt(dr), with r = ln(RMS(h)) split into h_r
retrieval heads. Token t may see chunk c iff (c+1)*S <= t (or c*S + W_r <= t with mask_slide_window).
The kept slots are ordered by descending chunk id (most recent first) and mixed by stick-breaking
weights in that order, or by a softmax over the slots.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hsa_jax.models.swa_hsa.chunking import MEMORY_EPS
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.common.layers import Dense, RMSNorm, scoped
from hsa_jax.common.topk import top_k_indices

SOFTPLUS_THRESHOLD = 15.0  # torch F.softplus(x, threshold=15) returns x above it
MASKED_SCORE = -1e7  # the original's stand-in for -inf before the slot softmax


def select_chunks(s_NxTxHrxC, positions_T, cfg: SWAHSAConfig, *, noise_rng=None, pos_decay=None):
    """Top-K chunk selection and weights from retrieval scores (fp32).

    positions_T: absolute token positions (chunk c covers positions [c*S, (c+1)*S)).
    noise_rng: if given, Gumbel noise perturbs the selection only; weights use the clean scores.
    Returns weights (N, T, H, K') fp32 and indices (N, T, H, K') int32, K' = min(C, chunk_topk),
    slots ordered by descending chunk id; slots with nothing to retrieve have index 0 and weight 0.
    """
    N, T, Hr, C = s_NxTxHrxC.shape
    S, K = cfg.chunk_size, min(C, cfg.chunk_topk)
    chunk_C = jnp.arange(C)
    t_Tx1 = positions_T[:, None]
    if cfg.mask_slide_window:
        visible_TxC = chunk_C * S + cfg.retrieval_window <= t_Tx1
    else:
        visible_TxC = (chunk_C + 1) * S <= t_Tx1
    s = jnp.where(visible_TxC[None, :, None, :], s_NxTxHrxC.astype(jnp.float32), -jnp.inf)
    sel = s if noise_rng is None else s + jax.random.gumbel(noise_rng, s.shape, s.dtype)
    idx_NxTxHrxK = top_k_indices(sel, K)  # no gradient through the indices
    # The original keeps floor(t/S) slots; a kept slot whose chunk is masked (only possible with
    # mask_slide_window) gets weight 0 there. We treat such slots as padding too, so the real chunks
    # always come first (the original's order of those padding slots depends on top-k tie-breaking).
    slots_K = jnp.arange(K)
    kept = (slots_K < (positions_T // S)[:, None])[None, :, None, :]
    finite = kept & jnp.isfinite(jnp.take_along_axis(s, idx_NxTxHrxK, axis=-1))
    key = jnp.where(finite, idx_NxTxHrxK, -1)
    key = -jnp.sort(-key, axis=-1)  # descending chunk id; padding (-1) last
    valid = key >= 0
    idx = jnp.where(valid, key, 0)
    s_hat = jnp.where(valid, jnp.take_along_axis(s, idx, axis=-1), 0.0)

    if cfg.enable_softmax:
        if pos_decay is not None:
            s_hat = s_hat + slots_K * pos_decay.astype(jnp.float32)
        w = jax.nn.softmax(jnp.where(valid, s_hat, MASKED_SCORE), axis=-1)
        w = jnp.where(jnp.any(valid, axis=-1, keepdims=True), w, 0.0)
    else:  # stick-breaking in slot (recency) order: w_k = sigma(s_k) prod_{j<k} (1 - sigma(s_j))
        softplus = jnp.where(s_hat > SOFTPLUS_THRESHOLD, s_hat, jax.nn.softplus(s_hat))
        w = jnp.where(valid, jnp.exp(s_hat - jnp.cumsum(jnp.where(valid, softplus, 0.0), axis=-1)), 0.0)

    H = cfg.num_kv_heads
    if Hr != H:  # single-head retrieval: every kv head uses the same chunks
        w, idx = jnp.repeat(w, H, axis=2), jnp.repeat(idx, H, axis=2)
    return w, idx.astype(jnp.int32)


class RetrievalLayer(nnx.Module):
    def __init__(self, cfg: SWAHSAConfig, rngs: nnx.Rngs, dtype):
        D, R, Hr = cfg.hidden_size, cfg.retrieval_dim, cfg.retrieval_heads
        self.cfg = cfg
        self.pos_decay = nnx.Param(jnp.zeros((1,), dtype), logical_axes=(None,)) if cfg.enable_pos_decay else None
        self.pre_norm = RMSNorm(D, MEMORY_EPS, dtype=dtype)
        self.ln = Dense(D, R, axes=("embed", "retrieval"), std=cfg.initializer_range, rngs=rngs, dtype=dtype)
        self.lmk_q_norm = RMSNorm(R // Hr, MEMORY_EPS, dtype=dtype) if cfg.enable_lmk_norm else None
        self.lmk_k_norm = RMSNorm(R // Hr, MEMORY_EPS, dtype=dtype) if cfg.enable_lmk_norm else None

    def scores(self, h_NxTxD, lmk_NxCxHrxDr):
        """-> s (N, T, h_r, C) fp32, unmasked."""
        N, T, _ = h_NxTxD.shape
        Hr, Dr = lmk_NxCxHrxDr.shape[-2:]
        r = self.ln(self.pre_norm(h_NxTxD)).reshape(N, T, Hr, Dr)
        if self.lmk_q_norm is not None:
            r, lmk_NxCxHrxDr = self.lmk_q_norm(r), self.lmk_k_norm(lmk_NxCxHrxDr)
        return jnp.einsum("nted,nced->ntec", r.astype(jnp.float32),
                          lmk_NxCxHrxDr.astype(jnp.float32)) / math.sqrt(Dr)

    @scoped("retrieval")
    def __call__(self, h_NxTxD, lmk_NxCxHrxDr, positions_T, noise_rng=None):
        pos_decay = None if self.pos_decay is None else self.pos_decay[...][0]
        return select_chunks(self.scores(h_NxTxD, lmk_NxCxHrxDr), positions_T, self.cfg,
                             noise_rng=noise_rng, pos_decay=pos_decay)
