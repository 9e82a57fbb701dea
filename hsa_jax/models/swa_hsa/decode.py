"""Incremental (cached) decoding for SWA+HSA: segmented prefill and a one-token step, both jit-compiled.

The cache of one batch (all rows at the same position P = number of tokens consumed) holds

    pos                         int32 ()                      P
    attn[<layer index>]         k, v (N, W_l, Hs, hd)         ring buffer of the last W_l keys/values of
                                                              every sliding-window attention: each SWA
                                                              block, and the HSA layer's own SWA when
                                                              hsa_only is false (W_l its window). Slot s
                                                              holds position p with p % W_l == s (post
                                                              q/k-norm, post-RoPE at absolute positions)
    buf                         (N, S, D)                     the unfinished chunk: lower-layer states of
                                                              positions (P//S)*S .. P-1 in slots 0..P%S-1
    mem_k, mem_v                (N, C_alloc*S, H, hd)         chunk memory; chunk c in rows [cS, cS+S)
    lmk                         (N, C_alloc, h_r, dr)         chunk landmarks

C_alloc = capacity // S + (the chunks one segment can complete): the tail is scratch that keeps every
dynamic update in bounds. A segment of L tokens (static shape; the last one padded and masked) runs
every layer once over the segment:
  * SWA: queries at P..P+L-1 attend to [ring ++ segment] keys with the window mask (p-W <= key <= p);
    the ring is then refreshed with the newest W keys;
  * chunking: [buf ++ segment] is cut into S-token chunks; those completed in this segment are encoded
    (ChunkingLayer.encode_chunks, the training encoder) and written into the memory at their chunk ids;
  * retrieval: scores against every landmark slot, `select_chunks` with absolute positions, so chunk c
    is visible to positions >= (c+1)S only: the token that completes a chunk does not see it;
  * HSA: queries against the whole chunk memory (Lq != Lkv).
The logits equal the training forward's (`SWAHSAForCausalLM.__call__`) for every position, whatever
the segmentation. docs/decoding.md describes the differences from the original inference path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.common.decoding import DEFAULT_SEGMENT, CacheCapacityError, check_prefill_args
from hsa_jax.common.losses import token_logprobs
from hsa_jax.models.swa_hsa.chunking import ChunkingLayer
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.swa_hsa.hsa_layer import HSALayer
from hsa_jax.common.layers import TransformerBlock, attention_backend, rope_cos_sin, sliding_window_attention
from hsa_jax.models.swa_hsa.retrieval import RetrievalLayer

@dataclasses.dataclass
class DecodeCache:
    """Cache arrays (a pytree, donated to the jitted calls) plus host-side bookkeeping."""
    arrays: dict
    pos: int  # tokens consumed so far (host copy of arrays["pos"])
    capacity: int  # tokens the chunk memory can hold
    batch: int

    @property
    def remaining(self) -> int:
        return self.capacity - self.pos

    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.arrays)))


def _attn_layers(model) -> dict[int, tuple]:
    """{backbone layer index: (Attention module, window)} of every sliding-window attention."""
    cfg = model.cfg
    out = {}
    for i, layer in enumerate(model.backbone.layers):
        if isinstance(layer, TransformerBlock):
            out[i] = (layer.self_attn, cfg.sliding_window)
        elif isinstance(layer, HSALayer) and layer.attn is not None:
            out[i] = (layer.attn, layer.swa_window)
    return out


def _cached_swa(attn, u_NxLxD, cos, sin, ring, P, window: int, block: int = 0, ring_state: str = "partial"):
    """Sliding-window attention of the segment's queries (positions P..P+L-1) over [ring ++ segment] keys.
    -> (output (N, L, D), (k, v) of the segment). Query at p sees keys p-window..p (window+1 keys).

    ring_state (known on the host from the cache position): "empty" (P = 0: no ring entry is a real
    key), "full" (P >= ring size: every entry is) or "partial". Empty or full, the attention is one
    flash-attention call where cuDNN takes the shapes (`swa_over_ring`); otherwise, and for the one-token
    step, the banded attention (hsa_jax/common/layers.py sliding_window_attention, which DRT's decoder
    uses too): queries in blocks of `block` (> 0), each against its own window+block keys, so memory is
    O(L * (window + block)) instead of O(L * (window + L))."""
    N, L, _ = u_NxLxD.shape
    q, k, v = attn.project_qkv(u_NxLxD, cos, sin)
    ring_k, ring_v = ring["k"], ring["v"]
    Wc = ring_k.shape[1]
    # the ring in chronological order: entry j holds position P - Wc + j (ignored when negative)
    order = jnp.mod(P - Wc + jnp.arange(Wc), Wc)
    keys = jnp.concatenate([jnp.take(ring_k, order, axis=1), k.astype(ring_k.dtype)], axis=1).astype(q.dtype)
    vals = jnp.concatenate([jnp.take(ring_v, order, axis=1), v.astype(ring_v.dtype)], axis=1).astype(q.dtype)
    backend = attention_backend(q.dtype, attn.head_dim, Wc + L)
    if ring_state in ("empty", "full") and backend is not None and window <= Wc:
        a = swa_over_ring(q, keys, vals, window, ring_state, implementation=backend)
    else:
        a = sliding_window_attention(q, keys, vals, window, start=P, block=block)
    out = attn.o_proj(a.reshape(N, L, attn.heads * attn.head_dim))
    return out, (k, v)


def swa_over_ring(q_NxLxHxD, keys_NxMxHkvxD, vals_NxMxHkvxD, window: int, ring_state: str, *, implementation=None):
    """sliding_window_attention(q, keys, vals, window, start=P) for a ring that is all real keys ("full":
    M - L >= window earlier keys) or none ("empty": P = 0), as one causal local-window attention call.
    Full: the queries are front-padded by the ring's length, so that query row r = ring + i sits on the
    diagonal of its own key row and sees rows r-window..r; the pad rows' outputs are dropped."""
    L = q_NxLxHxD.shape[1]
    Wc = keys_NxMxHkvxD.shape[1] - L
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window, 0),
                                                          implementation=implementation)
    if ring_state == "empty":
        return attend(q_NxLxHxD, keys_NxMxHkvxD[:, Wc:], vals_NxMxHkvxD[:, Wc:])
    q_pad = jnp.pad(q_NxLxHxD, ((0, 0), (Wc, 0), (0, 0), (0, 0)))
    return attend(q_pad, keys_NxMxHkvxD, vals_NxMxHkvxD)[:, Wc:]


def _refresh_ring(ring, k_new, v_new, P, n):
    """Ring after consuming n new keys at positions P..P+n-1 (k_new (N, L, Hs, hd), rows >= n ignored)."""
    Wc = ring["k"].shape[1]
    L = k_new.shape[1]
    end = P + n
    slots = jnp.arange(Wc)
    want = end - 1 - jnp.mod(end - 1 - slots, Wc)  # newest position < end with p % Wc == slot
    from_new = want >= P
    src = jnp.clip(want - P, 0, L - 1)
    sel = lambda old, new: jnp.where(from_new[None, :, None, None], jnp.take(new, src, axis=1).astype(old.dtype), old)
    return {"k": sel(ring["k"], k_new), "v": sel(ring["v"], v_new)}


def _update_memory(layer: ChunkingLayer, cache, h_NxLxD, P, n, J: int):
    """Appends the chunks completed by the segment to the memory; -> new (buf, mem_k, mem_v, lmk)."""
    S = layer.cfg.chunk_size
    buf, mem_k, mem_v, lmk = cache["buf"], cache["mem_k"], cache["mem_v"], cache["lmk"]
    N, L, D = h_NxLxD.shape
    r0, c0 = jnp.mod(P, S), P // S
    X_len = (J + 1) * S
    r = jnp.arange(X_len)
    from_buf = r < r0
    X = jnp.where(from_buf[None, :, None], jnp.take(buf, jnp.clip(r, 0, S - 1), axis=1),
                  jnp.take(h_NxLxD.astype(buf.dtype), jnp.clip(r - r0, 0, L - 1), axis=1))
    done = (r0 + n) // S  # chunks completed in this segment (<= J)
    H, hd = mem_k.shape[-2:]
    Hr, Dr = lmk.shape[-2:]

    # Encoded unconditionally (a lax.cond on `done` would cost the one-token step a device->host sync):
    # the rows of chunks not completed yet are masked out below.
    k_new, v_new, l_new = layer.encode_chunks(X[:, :J * S].reshape(N * J, S, D))
    k_new = k_new.reshape(N, J * S, H, hd).astype(mem_k.dtype)
    v_new = v_new.reshape(N, J * S, H, hd).astype(mem_v.dtype)
    l_new = l_new.reshape(N, J, Hr, Dr).astype(lmk.dtype)
    row_ok = (jnp.arange(J * S) // S < done)[None, :, None, None]
    chunk_ok = (jnp.arange(J) < done)[None, :, None, None]
    old_k = jax.lax.dynamic_slice_in_dim(mem_k, c0 * S, J * S, axis=1)
    old_v = jax.lax.dynamic_slice_in_dim(mem_v, c0 * S, J * S, axis=1)
    old_l = jax.lax.dynamic_slice_in_dim(lmk, c0, J, axis=1)
    mem_k = jax.lax.dynamic_update_slice_in_dim(mem_k, jnp.where(row_ok, k_new, old_k), c0 * S, axis=1)
    mem_v = jax.lax.dynamic_update_slice_in_dim(mem_v, jnp.where(row_ok, v_new, old_v), c0 * S, axis=1)
    lmk = jax.lax.dynamic_update_slice_in_dim(lmk, jnp.where(chunk_ok, l_new, old_l), c0, axis=1)
    buf = jax.lax.dynamic_slice_in_dim(X, done * S, S, axis=1)
    return buf, mem_k, mem_v, lmk


def _chunks_per_segment(L: int, S: int) -> int:
    """Most chunks a segment of L tokens can complete (when it starts S-1 tokens into a chunk)."""
    return (S - 1 + L) // S


def _segment(graphdef, params, cache, ids_NxL, n, labels_NxL, *, mode: str, hsa_impl: str, swa_block: int = 0,
             ring_state: str = "partial"):
    """Runs one (padded) segment of L tokens, the first n real, through every layer with the cache.
    mode: "all" -> logits (N, L, V); "last" -> logits of row n-1 (N, V); "none" -> None;
    "nll" -> per-token log-probabilities of labels (N, L) (0 where label < 0)."""
    model = nnx.merge(graphdef, params)
    cfg: SWAHSAConfig = model.cfg
    N, L = ids_NxL.shape
    S = cfg.chunk_size
    J = _chunks_per_segment(L, S)
    dtype = jnp.dtype(cfg.dtype)
    P = cache["pos"]
    positions = P + jnp.arange(L, dtype=P.dtype)
    cos, sin = rope_cos_sin(positions[None], cfg.head_dim, cfg.rope_theta, dtype)
    ids = jnp.where(ids_NxL < 0, cfg.pad_token_id, ids_NxL)
    h = model.backbone.embeddings(ids, dtype)
    new_attn = {}

    def cached(key, window):  # the layers' `attend` hook: SWA over [ring ++ segment], ring refreshed
        def attend(attn, u):
            out, kv = _cached_swa(attn, u, cos, sin, cache["attn"][key], P, window, swa_block, ring_state)
            new_attn[key] = _refresh_ring(cache["attn"][key], *kv, P, n)
            return out
        return attend

    for i, layer in enumerate(model.backbone.layers):
        key = str(i)
        if isinstance(layer, TransformerBlock):
            h = layer(h, cos, sin, cfg.sliding_window, attend=cached(key, cfg.sliding_window))
        elif isinstance(layer, ChunkingLayer):
            buf, mem_k, mem_v, lmk = _update_memory(layer, cache, h, P, n, J)
        elif isinstance(layer, RetrievalLayer):
            weights, indices = layer(h, lmk, positions)
        elif isinstance(layer, HSALayer):
            h = layer(h, mem_k, mem_v, weights, indices, cos, sin, attend=cached(key, layer.swa_window), impl=hsa_impl)
        else:
            raise TypeError(f"unexpected backbone layer {type(layer).__name__}")
    new_cache = {"pos": P + n, "attn": new_attn, "buf": buf, "mem_k": mem_k, "mem_v": mem_v, "lmk": lmk}
    if mode == "none":
        return None, new_cache
    if mode == "last":
        h = jax.lax.dynamic_index_in_dim(h, n - 1, axis=1, keepdims=False)
    h = model.backbone.norm_f(h)
    head = model.backbone.embeddings.attend if model.lm_head is None else model.lm_head
    logits = head(h).astype(jnp.float32)
    if mode == "nll":
        return token_logprobs(logits, labels_NxL)[0], new_cache
    return logits, new_cache


@functools.lru_cache(maxsize=None)
def _segment_program(graphdef, treedef):
    """The jitted `_segment` of one model structure, shared by its decoders (one compile per segment
    length, mode and HSA backend). Parameters travel as a flat list of arrays: hashing the graphdef (a
    static argument) and flattening nnx Variables on every call cost milliseconds of host time per
    decode step, more than the step's GPU work."""
    def run(leaves, cache, ids_NxL, n, labels_NxL, *, mode, hsa_impl, swa_block, ring_state):
        return _segment(graphdef, jax.tree.unflatten(treedef, leaves), cache, ids_NxL, n, labels_NxL,
                        mode=mode, hsa_impl=hsa_impl, swa_block=swa_block, ring_state=ring_state)
    return jax.jit(run, static_argnames=("mode", "hsa_impl", "swa_block", "ring_state"), donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def _greedy_program(graphdef, treedef):
    """`steps` one-token segments with greedy feedback as one jitted scan: a decode step launches a few
    hundred small kernels, and driving each from Python costs more host time than the GPU spends."""
    def run(leaves, cache, tok_N, *, steps, hsa_impl, swa_block):
        params = jax.tree.unflatten(treedef, leaves)
        no_labels = jnp.full((tok_N.shape[0], 1), -1, jnp.int32)

        def one(carry, _):
            tok, cache = carry
            logits, cache = _segment(graphdef, params, cache, tok[:, None], 1, no_labels, mode="last",
                                     hsa_impl=hsa_impl, swa_block=swa_block)
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (nxt, cache), nxt
        (_, cache), toks_SxN = jax.lax.scan(one, (tok_N, cache), None, length=steps)
        return toks_SxN.T, cache
    return jax.jit(run, static_argnames=("steps", "hsa_impl", "swa_block"), donate_argnums=(1,))


class SWAHSADecoder:
    """Cached decoder of an SWA+HSA model (the generate()/hsa-eval decoder interface).

        dec = SWAHSADecoder(model, segment_len=4096)
        logits, cache = dec.prefill(ids)                 # (N, T) -> last-position logits (N, V)
        logits, cache = dec.step(next_tokens, cache)     # (N,) -> (N, V)
        logits, cache = dec.prefill(more_ids, cache, logits="all")   # continue: (N, T2, V)

    prefill runs in segments of `segment_len` tokens (the last one padded to a power-of-two bucket
    (>= 64, <= segment_len) and masked, so any length compiles to a handful of shapes). The cache is donated: a cache passed
    in must not be reused afterwards.
    """

    def __init__(self, model, *, segment_len: int = DEFAULT_SEGMENT, hsa_impl: str | None = None,
                 step_hsa_impl: str | None = None, swa_block: int = 512):
        cfg = model.cfg
        if segment_len < 1:
            raise ValueError(f"segment_len={segment_len} must be >= 1")
        self.cfg = cfg
        self.segment_len = int(segment_len)
        graphdef, params = nnx.split(model)
        self.param_leaves, treedef = jax.tree.flatten(params)
        self._program = _segment_program(graphdef, treedef)
        self._greedy = _greedy_program(graphdef, treedef)
        self.attn = {i: (a.kv_heads, a.head_dim, w) for i, (a, w) in _attn_layers(model).items()}
        self.ring_size = max((w for _, _, w in self.attn.values()), default=0)  # each SWA layer keeps its window
        self.hsa_impl = hsa_impl or cfg.hsa_impl
        self.step_hsa_impl = step_hsa_impl or self.hsa_impl
        self.swa_block = int(swa_block)
        self.vocab_size = cfg.vocab_size

    # ----- cache -----
    def init_cache(self, batch: int, capacity: int) -> DecodeCache:
        """An empty cache for `batch` rows and up to `capacity` tokens of context."""
        cfg = self.cfg
        if capacity < 1 or batch < 1:
            raise CacheCapacityError(f"init_cache: batch={batch} and capacity={capacity} must be >= 1")
        S, dtype = cfg.chunk_size, jnp.dtype(cfg.dtype)
        c_alloc = -(-capacity // S) + _chunks_per_segment(self.segment_len, S)
        H, hd, Hr = cfg.num_kv_heads, cfg.hsa_head_dim, cfg.retrieval_heads
        arrays = {
            "pos": jnp.zeros((), jnp.int32),
            "attn": {str(i): {"k": jnp.zeros((batch, w, kvh, d), dtype), "v": jnp.zeros((batch, w, kvh, d), dtype)}
                     for i, (kvh, d, w) in self.attn.items()},
            "buf": jnp.zeros((batch, S, cfg.hidden_size), dtype),
            "mem_k": jnp.zeros((batch, c_alloc * S, H, hd), dtype),
            "mem_v": jnp.zeros((batch, c_alloc * S, H, hd), dtype),
            "lmk": jnp.zeros((batch, c_alloc, Hr, cfg.retrieval_dim // Hr), dtype),
        }
        return DecodeCache(arrays, 0, int(capacity), int(batch))

    def _check(self, cache: DecodeCache, batch: int, n: int):
        if cache.batch != batch:
            raise CacheCapacityError(f"the cache was made for batch {cache.batch}, got {batch} rows")
        if cache.pos + n > cache.capacity:
            raise CacheCapacityError(
                f"decode cache capacity exceeded: {cache.pos} tokens cached + {n} new > capacity {cache.capacity} "
                f"tokens; create the cache with init_cache(batch, capacity>={cache.pos + n}) (prefill(..., "
                f"capacity=...)) or shorten the input")

    def _run(self, arrays, ids, n: int, labels, mode: str, impl: str, pos: int | None = None):
        """pos: the cache position before this segment, for the SWA ring's state (None: the one-token
        step, which always takes the banded attention)."""
        ring = "partial" if pos is None else "empty" if pos == 0 else "full" if pos >= self.ring_size else "partial"
        return self._program(self.param_leaves, arrays, ids, np.int32(n), labels, mode=mode, hsa_impl=impl,
                             swa_block=self.swa_block, ring_state=ring)

    def _bucket(self, n: int) -> int:
        """Padded length of a final segment of n tokens: the next power of two (>= 64), capped."""
        return min(self.segment_len, max(64, 1 << (n - 1).bit_length()))

    # ----- the decoder interface -----
    def prefill(self, ids, cache: DecodeCache | None = None, *, logits: str = "last",
                capacity: int | None = None, labels=None):
        """Consumes ids (N, T) (continuing `cache` when given). logits: "last" -> (N, V) at the last
        token; "all" -> (N, T, V); "none" -> None. With `labels` (N, T) int (-1 = ignore), returns
        instead the per-token log-probabilities of the labels (N, T) (for perplexity at any length
        without materialising T x V logits)."""
        ids = check_prefill_args(ids, logits, self.cfg.vocab_size)
        N, T = ids.shape
        if cache is None:
            cache = self.init_cache(N, capacity if capacity is not None else T)
        self._check(cache, N, T)
        mode = "nll" if labels is not None else logits
        outs, arrays, pos = [], cache.arrays, cache.pos
        for start in range(0, T, self.segment_len):
            n = min(self.segment_len, T - start)
            L = self.segment_len if n == self.segment_len else self._bucket(n)
            seg = np.zeros((N, L), np.int32)
            seg[:, :n] = ids[:, start:start + n]
            lab = np.full((N, L), -1, np.int32)
            if labels is not None:
                lab[:, :n] = np.asarray(labels)[:, start:start + n]
            last = start + n == T
            seg_mode = mode if mode in ("all", "nll") or (mode == "last" and last) else "none"
            out, arrays = self._run(arrays, seg, n, lab, seg_mode, self.hsa_impl, pos)
            pos += n
            if seg_mode in ("all", "nll"):
                outs.append(out[:, :n])
            elif seg_mode == "last":
                outs.append(out)
        cache = DecodeCache(arrays, pos, cache.capacity, N)
        if mode == "none":
            return None, cache
        if mode == "last":
            return outs[-1], cache
        return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], cache

    def step(self, tokens, cache: DecodeCache):
        """One token per row: tokens (N,) -> logits (N, V) fp32 and the updated cache."""
        tokens = jnp.asarray(tokens, jnp.int32).reshape(-1, 1)
        self._check(cache, tokens.shape[0], 1)
        out, arrays = self._run(cache.arrays, tokens, 1, np.full(tokens.shape, -1, np.int32), "last",
                                self.step_hsa_impl)
        return out, DecodeCache(arrays, cache.pos + 1, cache.capacity, cache.batch)

    def greedy(self, tokens, cache: DecodeCache, steps: int):
        """`steps` greedy tokens after feeding `tokens` (N,), in one device program (one compile per
        `steps`): -> (tokens (N, steps) int32, cache advanced by `steps`)."""
        tokens = jnp.asarray(tokens, jnp.int32).reshape(-1)
        if steps < 1:
            raise ValueError(f"greedy: steps={steps} must be >= 1")
        self._check(cache, tokens.shape[0], steps)
        toks, arrays = self._greedy(self.param_leaves, cache.arrays, tokens, steps=int(steps),
                                    hsa_impl=self.step_hsa_impl, swa_block=self.swa_block)
        return toks, DecodeCache(arrays, cache.pos + steps, cache.capacity, cache.batch)
