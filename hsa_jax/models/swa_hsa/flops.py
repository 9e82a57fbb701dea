"""SWA+HSA model FLOPs per trained token (for MFU), attention included.

Per token, forward: 2 x (matmul parameters it passes through) + attention:
    SWA:      4 * HQ * head_dim * mean keys per query (min(t+1, W+1) averaged over t)
    encoder:  4 * HQ * hd * (S+1) per chunk token (CLS adds one token per chunk)
    HSA:      4 * HQ * hd * K' * S            (K' retrieved chunks of S keys)
    retrieval scores: 2 * retrieval_dim * mean visible chunks
Training = 3 x forward (backward = 2 x forward).
"""

from __future__ import annotations

import numpy as np

from hsa_jax.models.swa_hsa.config import SWAHSAConfig


def swa_hsa_flops_per_token(cfg: SWAHSAConfig, seq_len: int) -> float:
    D, HQ, hd, S = cfg.hidden_size, cfg.num_attention_heads, cfg.hsa_head_dim, cfg.chunk_size
    C = seq_len // S
    t = np.arange(seq_len)
    swa_keys = float(np.minimum(t + 1, cfg.sliding_window + 1).mean())
    q_swa, kv_swa = HQ * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn_proj = D * (2 * q_swa + 2 * kv_swa)
    mlp = 3 * D * cfg.intermediate_size
    swa_block = 2 * (attn_proj + mlp) + 4 * HQ * cfg.head_dim * swa_keys
    n_swa = cfg.num_lower_layers + cfg.num_upper_layers
    flops = n_swa * swa_block
    # Chunking layer: encoder over S+1 tokens per chunk, memory projections, landmark once per chunk.
    P = S + (1 if cfg.enable_enc_cls else 0)
    kv_enc = cfg.num_key_value_heads * hd
    enc_layer = 2 * (D * (2 * D + 2 * kv_enc) + 3 * D * cfg.encoder_intermediate_size) + 4 * HQ * hd * P
    flops += cfg.encoder_layers * enc_layer * P / S
    flops += 2 * (2 * D * cfg.num_kv_heads * hd) + 2 * D * cfg.retrieval_dim / S
    # Per group: retrieval projection and scores; HSA q/o projections, attention, MLP, own SWA.
    visible = float(np.minimum(t // S, C).mean())
    k_eff = min(cfg.chunk_topk, C)
    group = 2 * D * cfg.retrieval_dim + 2 * cfg.retrieval_dim * visible
    group += 2 * (2 * D * D + mlp) + 4 * HQ * hd * k_eff * S
    if not cfg.hsa_only:
        group += 2 * attn_proj + 4 * HQ * cfg.head_dim * swa_keys
    flops += cfg.num_upper_groups * group
    flops += 2 * D * cfg.vocab_size  # LM head
    return 3.0 * flops
