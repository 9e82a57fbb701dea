"""The SWA+HSA causal language model: the original's layer list, in Flax NNX
(docs/model_math.md "SWA+HSA layer list").

backbone.layers, in order:
    num_lower_layers x SWA block            (sliding-window attention + SwiGLU, pre-norm)
    ChunkingLayer                           (chunk memory: keys, values, landmarks; shared by all groups)
    per group: RetrievalLayer, HSALayer, (num_upper_layers / num_upper_groups) x SWA block
then norm_f and the LM head. Attribute names mirror the original state_dict keys (hsa_jax/interop.py).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from hsa_jax.models.swa_hsa.chunking import ChunkingLayer
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.swa_hsa.hsa_layer import HSALayer
from hsa_jax.common.losses import head_logprobs
from hsa_jax.common.decoding import check_token_ids
from hsa_jax.common.layers import (Attention, Dense, Embed, RMSNorm, SwiGLU, TransformerBlock, rope_cos_sin, scan_blocks,
                                   scoped)
from hsa_jax.models.swa_hsa.retrieval import RetrievalLayer


def swa_block(cfg: SWAHSAConfig, rngs: nnx.Rngs, dtype) -> TransformerBlock:
    D, std, bias = cfg.hidden_size, cfg.initializer_range, cfg.attention_bias
    attn = Attention(D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     norm_eps=cfg.rms_norm_eps, qkv_bias=bias, o_bias=bias, std=std, rngs=rngs, dtype=dtype)
    return TransformerBlock(attn, SwiGLU(D, cfg.intermediate_size, std=std, rngs=rngs, dtype=dtype), D,
                            cfg.rms_norm_eps, dtype=dtype)


class Backbone(nnx.Module):
    def __init__(self, cfg: SWAHSAConfig, rngs: nnx.Rngs, dtype):
        make = {"swa": swa_block, "chunking": ChunkingLayer, "retrieval": RetrievalLayer, "hsa": HSALayer}
        self.embeddings = Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([make[kind](cfg, rngs, dtype) for kind in cfg.layer_kinds()])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=dtype)


class SWAHSAForCausalLM(nnx.Module):
    EMBED_KEY = "backbone.embeddings.weight"  # original key of the token embedding

    def __init__(self, cfg: SWAHSAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.backbone = Backbone(cfg, rngs, param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), std=cfg.initializer_range, rngs=rngs,
            dtype=param_dtype)

    def __call__(self, input_ids_NxT, *, train: bool = False, rng=None, return_hidden: bool = False,
                 remat: bool = False, scan_layers: bool = True, labels=None,
                 loss_chunk: int = 0):
        """Training-mode forward over whole chunks (T % chunk_size == 0). -> logits (N, T, V) fp32; with
        `labels` (N, T), -> (log p(label) per token, valid mask) from the LM head + log-softmax
        (hsa_jax.common.losses.head_logprobs; loss_chunk > 0: over that many positions at a time).

        train: enables the stochastic parts the config asks for (Gumbel retrieval noise, encoder
        dropout); they draw from `rng`, which must then be given. With return_hidden, also returns a
        dict: "hidden_states" (the output of every backbone layer, then norm_f's), "chunking"
        (mem_k, mem_v, landmarks) and "retrieval" (per group: weights, indices). remat: recompute
        each SWA block and HSA layer in the backward pass instead of keeping its activations.
        Consecutive SWA blocks run as one jax.lax.scan (layers.scan_blocks): compile time does not
        grow with their number (scan_layers=False unrolls them).
        """
        cfg = self.cfg
        N, T = input_ids_NxT.shape
        cfg.check_length(T)
        needs_rng = train and (cfg.enable_gumbel_noise or cfg.encoder_dropout > 0)
        if needs_rng and rng is None:
            raise ValueError("train=True with enable_gumbel_noise or encoder_dropout needs an explicit `rng`")
        layer_rng = (lambda i: jax.random.fold_in(rng, i)) if needs_rng else (lambda i: None)

        dtype = jnp.dtype(cfg.dtype)
        if not isinstance(input_ids_NxT, jax.core.Tracer):  # eager call: ids past the vocabulary are an error
            check_token_ids(input_ids_NxT, cfg.vocab_size, "input ids", padding_ok=True)
        # Negative ids are padding (the original pads with -100); they embed as the pad token.
        ids = jnp.where(input_ids_NxT < 0, cfg.pad_token_id, input_ids_NxT)
        h = self.backbone.embeddings(ids, dtype)
        positions_T = jnp.arange(T)
        cos, sin = rope_cos_sin(positions_T[None], cfg.head_dim, cfg.rope_theta, dtype)
        hidden, captured, retrievals = [], {}, []
        checkpoint = nnx.remat if remat else (lambda f: f)

        def swa(block, h_NxTxD):  # -> (h', h'): the block's output is also what return_hidden collects
            h_NxTxD = block(h_NxTxD, cos, sin, window=cfg.sliding_window)
            return h_NxTxD, h_NxTxD

        layers = enumerate(self.backbone.layers)
        for is_swa, run in itertools.groupby(layers, key=lambda il: isinstance(il[1], TransformerBlock)):
            if is_swa:  # consecutive SWA blocks: one scan, whatever their number
                h, h_LxNxTxD = scan_blocks([layer for _, layer in run], h, swa, scan=scan_layers, remat=remat, collect=return_hidden)
                if return_hidden:
                    hidden.extend(h_LxNxTxD)
                continue
            for i, layer in run:
                if isinstance(layer, ChunkingLayer):
                    mem_k, mem_v, lmk = layer(h, dropout_rng=layer_rng(i) if cfg.encoder_dropout else None)
                    captured["chunking"] = {"mem_k": mem_k, "mem_v": mem_v, "landmarks": lmk}
                elif isinstance(layer, RetrievalLayer):
                    noise = layer_rng(i) if cfg.enable_gumbel_noise else None
                    weights, indices = layer(h, lmk, positions_T, noise_rng=noise)
                    retrievals.append({"chunk_weights": weights, "indices": indices})
                else:
                    h = checkpoint(lambda lyr, h, *mem: lyr(h, *mem, cos, sin))(layer, h, mem_k, mem_v, weights, indices)
                hidden.append(h)
        h = self.backbone.norm_f(h)
        hidden.append(h)
        if labels is not None and not return_hidden:
            w_DxV = self.backbone.embeddings.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
            return scoped("lm_head")(head_logprobs)(h, w_DxV, labels, chunk=loss_chunk)
        logits = (self.backbone.embeddings.attend(h) if self.lm_head is None
                  else scoped("lm_head")(self.lm_head)(h))
        logits = logits.astype(jnp.float32)
        if not return_hidden:
            return logits
        return logits, {"hidden_states": hidden, "retrieval": retrievals, **captured}
