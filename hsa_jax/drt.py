"""The DRT causal language model (grouped cross attention, drt_spec.md §1), in Flax NNX.

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

import dataclasses
import pathlib
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.decode import CacheCapacityError, check_prefill_args
from hsa_jax.drt_config import ENCODER_NORM_EPS, ENCODER_ROPE_THETA, DRTConfig
from hsa_jax.drt_layers import DRTAttention, GroupCrossAttention, UpperDecoderLayer, gather_chunks, select_chunks
from hsa_jax.interop import CheckpointMismatchError, export_state_dict, load_state_dict
from hsa_jax.layers import Dense, Embed, RMSNorm, SwiGLU, TransformerBlock, rope_cos_sin, scan_blocks

if TYPE_CHECKING:  # hsa_jax.compare imports this module
    from hsa_jax.compare import Report

EMBED_KEY = "model.embed_tokens.weight"
TIED_HEAD_KEY = "lm_head.weight"


def _attention(cfg: DRTConfig, rngs, dtype, *, kv_heads: int, alibi: bool) -> DRTAttention:
    slopes = tuple(cfg.alibi_slopes()) if alibi else None
    return DRTAttention(cfg.hidden_size, cfg.num_attention_heads, kv_heads, std=cfg.initializer_range, rngs=rngs,
                        dtype=dtype, alibi_slopes=slopes)


def _mlp(cfg: DRTConfig, rngs, dtype) -> SwiGLU:
    return SwiGLU(cfg.hidden_size, cfg.intermediate_size, std=cfg.initializer_range, rngs=rngs, dtype=dtype)


def _decoder_attention(cfg: DRTConfig, rngs, dtype) -> DRTAttention:
    # ALiBi acts only on the flash path; the eager path has no positional signal at all (spec §1.4).
    return _attention(cfg, rngs, dtype, kv_heads=cfg.num_key_value_heads, alibi=cfg._flash_attn_2_enabled)


class ChunkEncoder(nnx.Module):
    """The original's `encoder`: Llama layers (MHA, norms eps 1e-6) and a final norm."""

    def __init__(self, cfg: DRTConfig, rngs, dtype):
        self.layers = nnx.List([
            TransformerBlock(_attention(cfg, rngs, dtype, kv_heads=cfg.num_attention_heads, alibi=False),
                             _mlp(cfg, rngs, dtype), cfg.hidden_size, ENCODER_NORM_EPS, dtype=dtype)
            for _ in range(cfg.encoder_layers)])
        self.norm = RMSNorm(cfg.hidden_size, ENCODER_NORM_EPS, dtype=dtype)

    def __call__(self, x_BxPxD, cos, sin):
        for layer in self.layers:
            x_BxPxD = layer(x_BxPxD, cos, sin, None)
        return self.norm(x_BxPxD)


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
        self.encoder = ChunkEncoder(cfg, rngs, dtype)
        self.chunk_k_proj = Dense(D, D, axes=("embed", "heads"), std=std, rngs=rngs, dtype=dtype)
        self.chunk_v_proj = Dense(D, D, axes=("embed", "heads"), std=std, rngs=rngs, dtype=dtype)
        self.norm = RMSNorm(D, eps, dtype=dtype)


class DRTForCausalLM(nnx.Module):
    def __init__(self, cfg: DRTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = DRT(cfg, rngs, jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids_NxL, *, train: bool = False, rng=None, remat: bool = False,
                 return_aux: bool = False, scan_layers: bool = True):
        """Batch forward over whole chunks (L % S == 0). -> logits (N, L, V) fp32 at the real tokens.

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
        cos, sin = rope_cos_sin(jnp.arange(P)[None], D // H, ENCODER_ROPE_THETA, dtype)
        z_BxPxD = checkpoint(lambda enc, x: enc(x, cos, sin))(m.encoder, m.enc_prenorm(h).reshape(N * C, P, D))
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
                idx, w, scores = select_chunks(q_NxCxD, lmk_NxCxD, cfg.chunk_topk, noise)
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
        logits = m.embed_tokens.attend(h[:, :, :S].reshape(N, L, D)).astype(jnp.float32)
        if not return_aux:
            return logits
        aux["logits_lmk"] = m.embed_tokens.attend(h[:, :, S]).astype(jnp.float32)
        return logits, aux

    def make_decoder(self, **kwargs) -> "DRTDecoder":
        """The decoder of hsa_jax/generate.py and hsa-eval (hsa_jax.decode.make_decoder dispatches here)."""
        return DRTDecoder(self)


# ----------------------------------------------------------------------------- decoding (decode = forward)

@dataclasses.dataclass(frozen=True)
class DRTCache:
    ids: np.ndarray  # (N, capacity rounded up to S) tokens consumed so far, right-padded with pad_id
    pos: int  # tokens consumed


class DRTDecoder:
    """The prefill/step interface of hsa_jax/decode.py with decode = forward: the cache is the token
    history, and each call reruns the batch forward over it, right-padded to the capacity rounded up to
    S (one compile per capacity). Exact because every logit depends only on earlier tokens
    (tests/test_drt.py checks it); costs a full forward per step. Chunk boundaries sit at multiples of S
    from the first prompt token: the original instead left-pads a prompt to a multiple of S, and its
    incremental path drops lmk_norms[g] from the retrieval query (spec §5); this follows the batch path."""

    def __init__(self, model: DRTForCausalLM):
        self.cfg = model.cfg
        graphdef, self._params = nnx.split(model)  # passed as arguments: not baked into the programs
        run = lambda p, ids: nnx.merge(graphdef, p)(ids)
        self._last = jax.jit(lambda p, ids, i: run(p, ids)[:, i])
        self._all = jax.jit(run)

        def log_probs(p, ids, labels):
            logp = jax.nn.log_softmax(run(p, ids), axis=-1)
            lp = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
            return jnp.where(labels >= 0, lp, 0.0)
        self._log_probs = jax.jit(log_probs)

    def init_cache(self, batch: int, capacity: int) -> DRTCache:
        S = self.cfg.enc_chunk_size
        return DRTCache(np.full((batch, -(-capacity // S) * S), self.cfg.pad_id, np.int32), 0)

    def prefill(self, ids, cache: DRTCache | None = None, *, logits: str = "last", capacity: int | None = None,
                labels=None):
        """Consumes ids (N, T) after `cache`. logits: "last" -> (N, V); "all" -> (N, T, V); "none" -> None.
        With labels (N, T) (-1 = ignore): the per-token log-probabilities of the labels (N, T) instead."""
        ids = check_prefill_args(ids, logits)
        N, T = ids.shape
        if cache is None:
            cache = self.init_cache(N, capacity if capacity is not None else T)
        if cache.ids.shape[0] != N or cache.pos + T > cache.ids.shape[1]:
            raise CacheCapacityError(
                f"prefill: {T} tokens for batch {N} do not fit a cache of batch {cache.ids.shape[0]} at position "
                f"{cache.pos} of {cache.ids.shape[1]}; pass a larger capacity")
        hist = cache.ids.copy()
        hist[:, cache.pos:cache.pos + T] = ids
        new = DRTCache(hist, cache.pos + T)
        span = slice(cache.pos, cache.pos + T)
        if labels is not None:
            full = np.full(hist.shape, -1, np.int32)
            full[:, span] = np.asarray(labels)
            return self._log_probs(self._params, hist, full)[:, span], new
        if logits == "none":
            return None, new
        if logits == "last":
            return self._last(self._params, hist, new.pos - 1), new
        return self._all(self._params, hist)[:, span], new  # "all" (check_prefill_args allows no other)

    def step(self, tokens, cache: DRTCache):
        """One token per row: tokens (N,) -> logits (N, V) fp32 and the updated cache."""
        return self.prefill(np.asarray(tokens).reshape(-1, 1), cache)


# ----------------------------------------------------------------------------- PyTorch interop

def _alibi_buffer_keys(cfg: DRTConfig) -> list[str]:
    keys = [f"model.lower_layers.{i}.self_attn.m" for i in range(cfg.num_lower_layers)]
    keys += [f"model.upper_layers.{g}.{i}.self_attn.m"
             for g, n in enumerate(cfg.upper_group_layers) for i in range(n)]
    return keys


def strip_buffers(cfg: DRTConfig, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original state_dict without what is not a parameter here, after checking it: the tied
    `lm_head.weight` must equal the embedding, and each ALiBi buffer must hold the slopes the
    config implies (they are recomputed, never loaded)."""
    sd = dict(state_dict)
    problems = []
    head = sd.pop(TIED_HEAD_KEY, None)
    if head is not None and EMBED_KEY in sd and not np.array_equal(head, sd[EMBED_KEY]):
        problems.append(f"{TIED_HEAD_KEY} differs from {EMBED_KEY}, but DRT ties them")
    slopes = np.asarray(cfg.alibi_slopes(), np.float32)
    for key in _alibi_buffer_keys(cfg):
        if key in sd:
            m = np.asarray(sd.pop(key), np.float32)
            if m.shape != slopes.shape or not np.allclose(m, slopes, rtol=1e-6, atol=0):
                problems.append(f"{key} = {m.tolist()} is not the ALiBi slopes 2^(-8(h+1)/H) = {slopes.tolist()}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the model:\n" + "\n".join(f"  {p}" for p in problems))
    return sd


def load_original_state_dict(model: DRTForCausalLM, state_dict: dict[str, np.ndarray]) -> None:
    """Copies an original DRT state_dict into the model in place (interop.load_state_dict rules)."""
    load_state_dict(model, strip_buffers(model.cfg, state_dict))


def export_original_state_dict(model: DRTForCausalLM) -> dict[str, np.ndarray]:
    """The original state_dict: parameters, the tied head and the ALiBi buffers, float32."""
    sd = export_state_dict(model)
    sd[TIED_HEAD_KEY] = sd[EMBED_KEY]
    if model.cfg.enable_alibi:
        slopes = np.asarray(model.cfg.alibi_slopes(), np.float32)
        sd.update({k: slopes.copy() for k in _alibi_buffer_keys(model.cfg)})
    return sd


# ----------------------------------------------------------------------------- hsa-compare

def original_loss(logits_NxLxV, input_ids_NxL):
    """The original's training loss: mean next-token CE over the N*(L-1) real targets (labels =
    input_ids; landmark slots predict nothing, and the logits here are already at real tokens)."""
    logp = jax.nn.log_softmax(logits_NxLxV[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids_NxL[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll)


def _masked_scores_pair(ours, ref):
    """Masked scores made comparable: the -inf entries must coincide (else an infinite error) and
    count as 0."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if not np.array_equal(np.isfinite(ours), np.isfinite(ref)):
        return np.zeros(1), np.full(1, np.inf)
    return np.where(np.isfinite(ours), ours, 0), np.where(np.isfinite(ref), ref, 0)


def compare_drt_reference(cfg: DRTConfig, ref: dict[str, np.ndarray], *, atol: float = 1e-4) -> Report:
    """Runs our fp32 forward on ref's weights and input_ids; compares logits, loss and every `inter/*`
    intermediate ref holds (names as in the DRT golden fixtures)."""
    # Imported here: hsa_jax/compare.py imports this module to register the "drt" model type.
    from hsa_jax.compare import Report, _row, build_model, dense_chunk_weights

    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    params = strip_buffers(cfg, {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")})
    model = build_model(cfg, params, DRTForCausalLM)
    ids = jnp.asarray(ref["input_ids"])
    with jax.default_matmul_precision("highest"):
        logits, aux = model(ids, return_aux=True)
    N, C = ids.shape[0], ids.shape[1] // cfg.enc_chunk_size
    rows = [_row("logits", logits, ref["logits"])]
    if "loss" in ref:
        rows.append(_row("loss", original_loss(logits, ids), ref["loss"]))
    if "logits_lmk_slots" in ref:
        rows.append(_row("logits_lmk_slots", aux["logits_lmk"], ref["logits_lmk_slots"]))
    ours = {"inter/lower_out": aux["lower_out"], "inter/enc_out": aux["enc_out"],
            "inter/chunk_k_lmkslot": aux["chunk_k"][:, :, -1], "inter/chunk_v_lmkslot": aux["chunk_v"][:, :, -1]}
    for g, r in enumerate(aux["retrieval"]):
        ours[f"inter/retr{g}_query"] = r["query"]
        ours[f"inter/retr{g}_keys"] = r["keys"]
        ours[f"inter/retr{g}_gca_weights"] = r["weights"][:, :-1].reshape(N * (C - 1), -1)
        ours[f"inter/group{g}_layer0_gca_out"] = aux["gca_out"][g][0]
    for key in sorted(k for k in ours if k in ref):
        rows.append(_row(key, ours[key], ref[key]))
    for g, r in enumerate(aux["retrieval"]):
        if f"inter/retr{g}_scores_masked" in ref:
            key = f"inter/retr{g}_scores_masked"
            rows.append(_row(key, *_masked_scores_pair(r["scores"], ref[key])))
        if f"inter/retr{g}_indices" in ref and f"inter/retr{g}_gca_weights" in ref:
            # Chunk -> weight maps: independent of the order of zero-weight (masked) slots.
            ref_w = ref[f"inter/retr{g}_gca_weights"].reshape(N, C - 1, 1, -1)
            ref_dense = dense_chunk_weights(ref_w, ref[f"inter/retr{g}_indices"][:, :-1, None], C)
            our_dense = dense_chunk_weights(r["weights"][:, :-1, None], r["indices"][:, :-1, None], C)
            rows.append(_row(f"inter/retr{g}_dense_weights", our_dense, ref_dense))
    return Report(rows, atol)


def compare_drt(config_path: pathlib.Path, ref: dict[str, np.ndarray], *, atol: float, impl: str) -> Report:
    return compare_drt_reference(DRTConfig.from_json(config_path, gca_impl=impl), ref, atol=atol)


# ----------------------------------------------------------------------------- FLOPs

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
