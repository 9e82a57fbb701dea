"""The DRT causal language model (grouped cross attention, docs/model_math.md "DRT"), in Flax NNX.

    ids (N, L) -> landmark token after every S tokens -> stream (N, T = C*P)
    model.lower_layers      Llow x Llama block (ALiBi + sliding window, or eager full-causal NoPE)
    model.enc_prenorm, model.encoder, model.chunk_{k,v}_proj
                            bidirectional chunk encoder (RoPE 0..P-1) -> landmarks, chunk keys/values
    per group g: model.lmk_norms[g] + retrieval, then model.upper_layers[g]: self-attn, GCA, MLP
    model.norm, tied LM head -> logits at the L real positions (N, L, V)

Attribute names mirror the original state_dict keys; `load_original_state_dict` and
`export_original_state_dict` add the two things hsa_jax/interop.py does not know: the tied
`lm_head.weight` under a DRT key and the ALiBi buffers `...self_attn.m`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hsa_jax.common.decoding import check_token_ids
from hsa_jax.common.layers import (ENCODER_NORM_EPS, ChunkEncoder, Dense, Embed, RMSNorm, SwiGLU, TransformerBlock,
                                   scan_blocks, scoped)
from hsa_jax.common.losses import head_logprobs
from hsa_jax.models.drt.config import DRTConfig
from hsa_jax.models.drt.layers import DRTAttention, GroupCrossAttention, UpperDecoderLayer, gather_chunks, select_chunks

EMBED_KEY = "model.embed_tokens.weight"  # original key of the (tied) token embedding



def _attention(cfg: DRTConfig, rngs, dtype, *, kv_heads: int, alibi: bool) -> DRTAttention:
    slopes = tuple(cfg.alibi_slopes()) if alibi else None
    return DRTAttention(cfg.hidden_size, cfg.num_attention_heads, kv_heads, std=cfg.initializer_range, rngs=rngs,
                        dtype=dtype, alibi_slopes=slopes)


def _mlp(cfg: DRTConfig, rngs, dtype) -> SwiGLU:
    return SwiGLU(cfg.hidden_size, cfg.intermediate_size, std=cfg.initializer_range, rngs=rngs, dtype=dtype)


def _decoder_attention(cfg: DRTConfig, rngs, dtype) -> DRTAttention:
    # ALiBi acts only on the flash path; the eager path has no positional signal at all
    # (docs/model_math.md "DRT self-attention").
    return _attention(cfg, rngs, dtype, kv_heads=cfg.num_key_value_heads, alibi=cfg._flash_attn_2_enabled)


def chunk_encoder(cfg: DRTConfig, rngs, dtype) -> ChunkEncoder:
    """The original's `encoder`: Llama layers (MHA, no q/k norms or biases)."""
    blocks = [TransformerBlock(_attention(cfg, rngs, dtype, kv_heads=cfg.num_attention_heads, alibi=False),
                               _mlp(cfg, rngs, dtype), cfg.hidden_size, ENCODER_NORM_EPS, dtype=dtype)
              for _ in range(cfg.encoder_layers)]
    return ChunkEncoder(blocks, cfg.hidden_size, cfg.head_dim, dtype=dtype)


class DRT(nnx.Module):
    """The original's `model.*` parameters."""

    def __init__(self, cfg: DRTConfig, rngs: nnx.Rngs, dtype):
        D, eps, std = cfg.hidden_size, cfg.rms_norm_eps, cfg.initializer_range
        self.embed_tokens = Embed(cfg.vocab_size, D, std=std, rngs=rngs, dtype=dtype)
        # nn.Embedding(padding_idx=pad_id) starts that row at zero.
        self.embed_tokens.embedding.set_value(self.embed_tokens.embedding[...].at[cfg.pad_id].set(0))
        self.lower_layers = nnx.List([
            TransformerBlock(_decoder_attention(cfg, rngs, dtype), _mlp(cfg, rngs, dtype), D, eps, dtype=dtype)
            for _ in range(cfg.num_lower_layers)])
        self.upper_layers = nnx.List([
            nnx.List([UpperDecoderLayer(
                _decoder_attention(cfg, rngs, dtype),
                GroupCrossAttention(D, cfg.num_attention_heads, eps, std=std, rngs=rngs, dtype=dtype),
                _mlp(cfg, rngs, dtype), D, eps, dtype=dtype) for _ in range(n)])
            for n in cfg.upper_group_layers])
        self.lmk_norms = nnx.List([RMSNorm(D, eps, dtype=dtype) for _ in range(cfg.num_groups)])
        self.enc_prenorm = RMSNorm(D, eps, dtype=dtype)
        self.encoder = chunk_encoder(cfg, rngs, dtype)
        self.chunk_k_proj = Dense(D, D, axes=("embed", "heads"), std=std, rngs=rngs, dtype=dtype)
        self.chunk_v_proj = Dense(D, D, axes=("embed", "heads"), std=std, rngs=rngs, dtype=dtype)
        self.norm = RMSNorm(D, eps, dtype=dtype)


class DRTForCausalLM(nnx.Module):
    EMBED_KEY = EMBED_KEY

    def __init__(self, cfg: DRTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = DRT(cfg, rngs, jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids_NxL, *, train: bool = False, rng=None, remat: bool = False,
                 return_aux: bool = False, scan_layers: bool = True, labels=None,
                 loss_chunk: int = 0):
        """Batch forward over whole chunks (L % S == 0). -> logits (N, L, V) fp32 at the real tokens; with
        `labels` (N, L), -> (log p(label) per token, valid mask) from the LM head + log-softmax
        (hsa_jax.common.losses.head_logprobs; loss_chunk > 0: over that many positions at a time).

        train: Gumbel top-k chunk selection (the original's training mode), drawn from `rng`.
        remat: recompute each decoder layer in the backward pass. return_aux: also returns a dict of
        intermediates named like the golden fixtures' `inter/*` arrays (see compare_drt). The lower
        layers, and each group's upper layers, run as one jax.lax.scan (layers.scan_blocks): compile
        time does not grow with their number (scan_layers=False unrolls them)."""
        cfg, m = self.cfg, self.model
        N, L = input_ids_NxL.shape
        cfg.check_length(L)
        if train and rng is None:
            raise ValueError("train=True draws Gumbel retrieval noise: pass an explicit `rng`")
        S, P, D, H = cfg.enc_chunk_size, cfg.lmk_chunk_size, cfg.hidden_size, cfg.num_attention_heads
        C, T = L // S, L // S * P
        dtype = jnp.dtype(cfg.dtype)
        checkpoint = nnx.remat if remat else (lambda f: f)

        if not isinstance(input_ids_NxL, jax.core.Tracer):  # eager call: ids past the vocabulary are an error
            check_token_ids(input_ids_NxL, cfg.vocab_size, "input ids", padding_ok=True)
        # Negative ids are padding (the original pads with -100); they embed as the pad token.
        ids = jnp.where(input_ids_NxL < 0, cfg.pad_id, input_ids_NxL).reshape(N, C, S)
        x_NxT = jnp.concatenate([ids, jnp.full((N, C, 1), cfg.chunk_id, ids.dtype)], axis=-1).reshape(N, T)
        h = m.embed_tokens(x_NxT, dtype)
        # padding_idx: the pad row gets no gradient through the lookup (only through the tied head).
        h = jnp.where((x_NxT == cfg.pad_id)[..., None], jax.lax.stop_gradient(h), h)
        window = cfg.window if cfg.window is not None else T

        if len(m.lower_layers):  # identical blocks: one scan, whatever their number
            lower = lambda layer, h: (layer(h, None, None, window), None)
            h, _ = scan_blocks(list(m.lower_layers), h, lower, scan=scan_layers, remat=remat, collect=False)
        aux = {"lower_out": h}

        # Chunk encoder, once, on the lower-layer output (landmark included).
        z_BxPxD = checkpoint(lambda enc, x: enc(x))(m.encoder, m.enc_prenorm(h).reshape(N * C, P, D))
        z_NxCxPxD = z_BxPxD.reshape(N, C, P, D)
        lmk_NxCxD = z_NxCxPxD[:, :, P - 1]
        mem_in = z_NxCxPxD if cfg.zero_lmk_slot else z_NxCxPxD[:, :, :S]
        k_mem, v_mem = m.chunk_k_proj(mem_in), m.chunk_v_proj(mem_in)  # (N, C, Lk, D)
        if cfg.zero_lmk_slot:  # a score-0, value-0 key: the implicit softmax+1
            keep = (jnp.arange(P) < S)[None, None, :, None]
            k_mem, v_mem = jnp.where(keep, k_mem, 0), jnp.where(keep, v_mem, 0)
        aux.update(enc_out=z_BxPxD, chunk_k=k_mem, chunk_v=v_mem, retrieval=[], gca_out=[])

        for g, layers in enumerate(m.upper_layers):
            memory = None
            if C > 1:
                q_NxCxD = m.lmk_norms[g](h.reshape(N, C, P, D)[:, :, P - 1])
                noise = jax.random.fold_in(rng, g) if train else None
                w, idx, scores = select_chunks(q_NxCxD, lmk_NxCxD, cfg.chunk_topk, noise)
                # Row c serves chunk c+1: drop the last row.
                memory = (gather_chunks(k_mem, idx[:, :-1], H), gather_chunks(v_mem, idx[:, :-1], H),
                          w[:, :-1].reshape(N * (C - 1), -1))
                aux["retrieval"].append({"query": q_NxCxD, "keys": lmk_NxCxD, "indices": idx, "weights": w,
                                         "scores": scores})
            # The group's layers are identical blocks: one scan. Each returns (h', its GCA output).
            upper = lambda layer, h: layer(h, window, P, memory, cfg.gca_impl)
            h, gca_outs = scan_blocks(list(layers), h, upper, scan=scan_layers, remat=remat, collect=return_aux)  # (layers, N, T, D)
            aux["gca_out"].append(list(gca_outs) if return_aux else None)

        h = m.norm(h).reshape(N, C, P, D)
        if labels is not None and not return_aux:
            h_NxLxD = h[:, :, :S].reshape(N, L, D)
            return scoped("lm_head")(head_logprobs)(h_NxLxD, m.embed_tokens.embedding[...].T, labels, chunk=loss_chunk)
        logits = m.embed_tokens.attend(h[:, :, :S].reshape(N, L, D)).astype(jnp.float32)
        if not return_aux:
            return logits
        aux["logits_lmk"] = m.embed_tokens.attend(h[:, :, S]).astype(jnp.float32)
        return logits, aux
