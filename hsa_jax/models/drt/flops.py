"""DRT model FLOPs per trained token (the conventions of hsa_jax/models/swa_hsa/flops.py)."""

from __future__ import annotations

import numpy as np

from hsa_jax.models.drt.config import DRTConfig


def drt_flops_per_token(cfg: DRTConfig, seq_len: int) -> float:
    """Training FLOPs per real token (3 x forward; matmuls and attention, train/flops.py conventions).
    Per stream token (P/S of them per real token): decoder layers (self-attention over min(t+1, W+1)
    keys, or t+1 on the eager path), the encoder over P keys, the chunk K/V projections, and per upper
    layer the GCA projections and attention over K chunks of Lk keys; then the LM head per real token."""
    D, F, S, P = cfg.hidden_size, cfg.intermediate_size, cfg.enc_chunk_size, cfg.lmk_chunk_size
    hd, C = cfg.head_dim, seq_len // S
    T = C * P
    t = np.arange(T)
    keys = float(np.minimum(t + 1, (cfg.window if cfg.window is not None else T) + 1).mean())
    kv = cfg.num_key_value_heads * hd
    mlp = 3 * D * F
    dec_layer = 2 * (D * (2 * D + 2 * kv) + mlp) + 4 * D * keys
    enc_layer = 2 * (4 * D * D + mlp) + 4 * D * P
    n_upper = sum(cfg.upper_group_layers)
    K = min(C, cfg.chunk_topk)
    gca = 2 * 2 * D * D + 4 * D * K * cfg.chunk_kv_len
    per_stream = (cfg.num_lower_layers + n_upper) * dec_layer + cfg.encoder_layers * enc_layer + 2 * 2 * D * D
    per_stream += n_upper * gca * (C - 1) / C + cfg.num_groups * 2 * D * (C - 1) / 2 / P
    return 3.0 * (per_stream * P / S + 2 * D * cfg.vocab_size)
