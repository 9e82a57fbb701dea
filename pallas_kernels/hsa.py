"""HSA attention: the public op and its Pallas GPU kernels (Triton lowering).

`hsa_attention` is the one entry point the models call. `impl` picks the backend (common.IMPLS):
  "xla"        the pure-jnp reference (pallas_kernels/reference.py), differentiable by jax.grad;
  "pallas"     the Pallas GPU kernels (Triton lowering) with a custom VJP;
  "interpret"  the same Pallas kernels in interpret mode (CPU tests);
  "auto"       "pallas" on GPU, "xla" elsewhere.
Chunk ids outside [0, Lkv/S) contribute nothing (weight 0) on every backend; concrete ones raise
ValueError (reference.py's module docstring, docs/kernels.md).

Kernel design (notation of reference.py: R = Q*G query rows share one retrieval row (n, b, e); a
"pair" is one (retrieval row, slot)). The Q*G rows of a retrieval row are packed into a tile of BM >= 16
rows (zero-padded up to BM), so any G or Q fills a matrix-unit tile.
  forward  q-major, grid (row tiles, N*H). For each of the K slots of a retrieval row it gathers the
           chunk's (S, D) keys/values, runs one softmax over the chunk (sm_n in the denominator) and
           accumulates w * P V; it stores the per-(row, slot) base-2 log-sum-exp for the backward.
  dq       q-major, grid (row tiles, N*H): per slot gathers the chunk, recomputes P from the LSE,
           Di = rowsum(P * dP) (= dO . O_k, also d(weight) once summed over the R rows),
           dS = w P (dP - Di), dq += dS K.
  dk/dv    chunk-major, grid (C, N*H, splits): a reverse index (for each (n, e, chunk) the pairs that
           selected it, CSR via one sort) lets the program of chunk c visit only its own pairs, so the work
           is O(N * Lq * HQ * K * S * D), linear in L, with no atomics. Each split takes every
           `splits`-th step of a chunk's pairs and writes an fp32 partial; partials are summed in a
           fixed order, so results are bit-identical across runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (IMPLS, SMEM_BUDGET, KernelDims, block_rows, chunk_dkv, chunk_dq,
                                   chunk_forward, default_scale, flat_rows, kernel_call,
                                   load_rows, logits2, resolve_impl, store_rows)
from pallas_kernels.reference import check_hsa_args, hsa_attention_reference, mask_out_of_range

__all__ = ["IMPLS", "KernelParams", "hsa_attention", "hsa_attention_pallas", "make_dims"]


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """Tuning knobs of the Pallas kernels (defaults: H200 measurements in docs/benchmarks.md)."""
    max_tile_rows: int = 128   # BM cap: rows per retrieval-row tile
    fwd_rows: int = 1          # forward / dq: retrieval rows per program (looped)
    fwd_warps: int = 1
    fwd_stages: int = 2
    unroll_slots: bool = False  # forward / dq: unroll the K-slot loop
    dq_warps: int = 1
    dq_stages: int = 2
    dkv_rows: int = 128        # dk/dv: target matrix rows (pairs x tile rows) per step
    dkv_splits: int = 0        # dk/dv programs per chunk; 0: from the grid size (_dkv_splits)
    dkv_warps: int = 4
    dkv_stages: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Dims(KernelDims):
    """Static shapes and derived tiling of one call (params: KernelParams)."""
    N: int
    L: int
    Lkv: int
    B: int
    K: int
    S: int
    sm_n: float

    @property
    def Q(self): return self.L // self.B

    @property
    def R(self): return self.Q * self.G  # query rows per retrieval row

    @property
    def C(self): return self.Lkv // self.S

    @property
    def BM(self): return block_rows(self.R, self.params.max_tile_rows)  # tile rows

    @property
    def NR(self): return pl.cdiv(self.R, self.BM)  # tiles per retrieval row


# --------------------------------------------------------------------------------------------------
# Shared index arithmetic. All arrays are passed flat: q/o/dO/dq as (N*L*HQ, D) rows, k/v as
# (N*Lkv*H, D) rows, weights/indices as (N*B*H*K,), LSE and Di as (N*H*B*K*R,).

def _tile_rows(dims: _Dims, r0):
    """Rows r0 + [0, BM) of a retrieval row: (r, in_range, token offset in the row, head in group).
    Rows past R are masked; their addresses point at other rows (or past the end), never at a row of
    the same tile, so a masked store never aliases a live element (interpret mode scatters them)."""
    r_BM = r0 + jnp.arange(dims.BM)
    return r_BM, r_BM < dims.R, r_BM // dims.G, r_BM % dims.G


def _chunk_rows(dims: _Dims, n, e, c):
    """Rows of k/v holding chunk c of kv head e: (S,)."""
    return (n * dims.Lkv + c * dims.S + jnp.arange(dims.S)) * dims.H + e


# --------------------------------------------------------------------------------------------------
# Forward and dq: q-major. Grid (cdiv(B, fwd_rows) * NR, N*H).

def _row_tile_loop(dims: _Dims, body):
    """Runs body(n, e, ok_BM, qrow_BM, slot0, lseoff_BM) for each retrieval row of this program's tile.
    slot0: flat offset of slot 0 of (n, b, e) in weights/indices; lseoff_BM: flat offsets of the tile's
    rows for slot 0 in the (N, H, B, K, R) LSE / Di arrays (add k*R for slot k)."""
    pid, ne = pl.program_id(0), pl.program_id(1)
    n, e = ne // dims.H, ne % dims.H
    rc, b0 = pid % dims.NR, (pid // dims.NR) * dims.params.fwd_rows
    r_BM, ok_BM, tok_BM, g_BM = _tile_rows(dims, rc * dims.BM)

    def one_row(i, carry):
        b = b0 + i
        ok = ok_BM & (b < dims.B)
        b = jnp.minimum(b, dims.B - 1)
        qrow_BM = (n * dims.L + b * dims.Q + tok_BM) * dims.HQ + e * dims.G + g_BM
        slot0 = ((n * dims.B + b) * dims.H + e) * dims.K
        lseoff_BM = ((ne * dims.B + b) * dims.K) * dims.R + r_BM
        body(n, e, ok, qrow_BM, slot0, lseoff_BM)
        return carry

    lax.fori_loop(0, dims.params.fwd_rows, one_row, 0)


def _slot_loop(dims: _Dims, one_slot, init):
    """Folds one_slot(k, carry) over the K slots."""
    if not dims.params.unroll_slots:
        return lax.fori_loop(0, dims.K, one_slot, init)
    carry = init
    for kk in range(dims.K):
        carry = one_slot(kk, carry)
    return carry


def _load_slot(dims: _Dims, idx_ref, w_ref, k_ref, v_ref, n, e, slot):
    """Weight and the chunk's keys, values (S, Dp) of flat slot `slot` of weights/indices."""
    kvrow_S = _chunk_rows(dims, n, e, idx_ref[slot])
    return w_ref[slot], load_rows(k_ref, kvrow_S, dims), load_rows(v_ref, kvrow_S, dims)


def _fwd_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, dims: _Dims):
    def body(n, e, ok_BM, qrow_BM, slot0, lseoff_BM):
        q_BMxDp = load_rows(q_ref, qrow_BM, dims, ok_BM)

        def one_slot(kk, acc_BMxDp):
            w, k_SxDp, v_SxDp = _load_slot(dims, idx_ref, w_ref, k_ref, v_ref, n, e, slot0 + kk)
            o_BMxDp, lse_BM = chunk_forward(logits2(q_BMxDp, k_SxDp, dims), v_SxDp, w, dims.sm_n)
            plgpu.store(lse_ref.at[lseoff_BM + kk * dims.R], lse_BM, mask=ok_BM)
            return acc_BMxDp + o_BMxDp

        acc_BMxDp = _slot_loop(dims, one_slot, jnp.zeros((dims.BM, dims.Dp), jnp.float32))
        store_rows(o_ref, qrow_BM, acc_BMxDp, dims, ok_BM)

    _row_tile_loop(dims, body)


def _dq_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dq_ref, di_ref, *, dims: _Dims):
    def body(n, e, ok_BM, qrow_BM, slot0, lseoff_BM):
        q_BMxDp = load_rows(q_ref, qrow_BM, dims, ok_BM)
        do_BMxDp = load_rows(do_ref, qrow_BM, dims, ok_BM)

        def one_slot(kk, dq_BMxDp):
            w, k_SxDp, v_SxDp = _load_slot(dims, idx_ref, w_ref, k_ref, v_ref, n, e, slot0 + kk)
            pos_BM = lseoff_BM + kk * dims.R
            lse_BM = plgpu.load(lse_ref.at[pos_BM], mask=ok_BM, other=0.0)
            dq_part, di_BM = chunk_dq(logits2(q_BMxDp, k_SxDp, dims), lse_BM, do_BMxDp, k_SxDp, v_SxDp, w)
            plgpu.store(di_ref.at[pos_BM], di_BM, mask=ok_BM)
            return dq_BMxDp + dq_part

        dq_BMxDp = _slot_loop(dims, one_slot, jnp.zeros((dims.BM, dims.Dp), jnp.float32))
        store_rows(dq_ref, qrow_BM, dq_BMxDp * dims.scale, dims, ok_BM)

    _row_tile_loop(dims, body)


def _q_major_call(kernel, dims: _Dims, out_shape, warps, stages, name):
    return kernel_call(kernel, dims, grid=(pl.cdiv(dims.B, dims.params.fwd_rows) * dims.NR, dims.N * dims.H),
                       out_shape=out_shape, warps=warps, stages=stages,
                       fixed_bytes=2 * dims.BM * dims.Dp * dims.itemsize,
                       stage_bytes=2 * dims.S * dims.Dp * dims.itemsize, name=name)


# --------------------------------------------------------------------------------------------------
# dk/dv: chunk-major over a reverse index. Grid (C, N*H, splits).

def _dkv_pairs(dims: _Dims) -> int:
    """(row, slot) pairs per dk/dv step: BP pairs x BM tile rows ~ dkv_rows matrix rows, fewer if the
    step's q, dO tiles would not fit in shared memory next to the chunk's k, v."""
    bp = max(1, dims.params.dkv_rows // dims.BM)
    while bp > 1 and sum(_dkv_smem(dims, bp)) > SMEM_BUDGET:
        bp //= 2
    return bp


def _dkv_smem(dims: _Dims, bp: int) -> tuple[int, int]:
    """(fixed, per-stage) shared-memory bytes of the dk/dv kernel: the chunk's k, v; a step's q, dO."""
    return 2 * dims.S * dims.Dp * dims.itemsize, 2 * bp * dims.BM * dims.Dp * dims.itemsize


def _dkv_splits(dims: _Dims) -> int:
    """Programs per chunk. Causal retrieval picks early chunks far more often (chunk 0: ~S*K*ln(C)
    pairs vs S*K on average), so with few chunks the busiest chunk's program would outlast the rest.
    Each split costs an fp32 (Lkv, D) partial of dk and of dv; ~2048 programs measured best on H200
    (docs/benchmarks.md)."""
    if dims.params.dkv_splits:
        return dims.params.dkv_splits
    return max(2, min(16, 2048 // (dims.C * dims.N * dims.H)))


def _reverse_index(idx_NxBxHxK, w_NxBxHxK, dims: _Dims):
    """CSR of the (row, slot) pairs that selected each chunk. Returns (offsets (N*H*(C+1)+1,), pairs
    (N*H*B*K,)): the pairs of (n, e, c) are pairs[offsets[s]:offsets[s+1]], s = (n*H + e)*(C+1) + c, in
    (row, slot) order (a fixed summation order: bit-identical results), each the flat index
    ((n*H + e)*B + b)*K + k. Zero-weight pairs (invalid slots) add nothing to dk/dv: they go to the
    unvisited bucket c = C."""
    N, H, BK, C1 = dims.N, dims.H, dims.B * dims.K, dims.C + 1
    c_NHxBK = jnp.where(w_NxBxHxK != 0, idx_NxBxHxK, dims.C).transpose(0, 2, 1, 3).reshape(N * H, BK)
    seg_NHxBK = jnp.arange(N * H, dtype=jnp.int32)[:, None] * C1 + c_NHxBK
    if N * H * C1 * BK < 2**32:
        # One sort of unique uint32 keys (segment, pair) rather than argsort's key-value sort.
        key = (seg_NHxBK.astype(jnp.uint32) * BK + jnp.arange(BK, dtype=jnp.uint32)[None, :]).ravel()
        key = lax.sort(key)
        seg_P = (key // BK).astype(jnp.int32)
        pairs = (seg_P // C1 * BK + (key % BK).astype(jnp.int32))
    else:
        pairs = jnp.argsort(seg_NHxBK.ravel(), stable=True).astype(jnp.int32)
        seg_P = seg_NHxBK.ravel()[pairs]
    # offsets[s] = first sorted position with segment >= s: scatter each segment's first position
    # (unique targets, unlike a bincount's contended adds), then fill empty segments from the right.
    P, NS = seg_P.shape[0], N * H * C1
    starts = jnp.concatenate([jnp.ones((1,), bool), seg_P[1:] != seg_P[:-1]])
    first = jnp.full((NS + 1,), P, jnp.int32).at[jnp.where(starts, seg_P, NS + 1)].set(
        jnp.arange(P, dtype=jnp.int32), mode="drop")
    return lax.cummin(first, reverse=True), pairs


def _chunk_program(dims: _Dims, bp: int, splits: int, off_ref, pair_ref, w_ref, k_ref, v_ref,
                   tile_fn, init):
    """Body shared by the chunk-major kernels: loads chunk c's k, v once, then folds
    tile_fn(carry, k, v, ok_M, qrow_M, lpos_M, w_M) over this split's steps of bp pairs (x NR tiles).
    Rows M = (pair slot, tile row); qrow_M: q/dO rows; lpos_M: positions in the (N,H,B,K,R) LSE/Di.
    Returns (carry, kvrow_S) with kvrow_S the k/v rows of the chunk."""
    c, ne, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, e = ne // dims.H, ne % dims.H
    seg = ne * (dims.C + 1) + c
    start, end = off_ref[seg], off_ref[seg + 1]
    my_steps = pl.cdiv(jnp.maximum(pl.cdiv(end - start, bp) - s, 0), splits)
    kvrow_S = _chunk_rows(dims, n, e, c)
    k_SxDp = load_rows(k_ref, kvrow_S, dims)
    v_SxDp = load_rows(v_ref, kvrow_S, dims)
    m_M = jnp.arange(bp * dims.BM)
    slot_M, rr_M = m_M // dims.BM, m_M % dims.BM

    def one_step(i, carry):
        pos_M = start + (s + i * splits) * bp + slot_M
        pos_ok_M = pos_M < end
        pair_M = pair_ref[jnp.minimum(pos_M, end - 1)]
        b_M = (pair_M - ne * (dims.B * dims.K)) // dims.K
        w_M = w_ref[pair_M]
        for rc in range(dims.NR):  # tiles of a retrieval row (one unless Q*G > max_tile_rows)
            r_M = rc * dims.BM + rr_M
            ok_M = pos_ok_M & (r_M < dims.R)
            qrow_M = (n * dims.L + b_M * dims.Q + r_M // dims.G) * dims.HQ + e * dims.G + r_M % dims.G
            # Masked rows get distinct out-of-range positions: a masked store must not alias a live
            # row of the same store (interpret mode scatters masked lanes too).
            lpos_M = jnp.where(ok_M, pair_M * dims.R + r_M, dims.N * dims.H * dims.B * dims.K * dims.R + m_M)
            carry = tile_fn(carry, k_SxDp, v_SxDp, ok_M, qrow_M, lpos_M, jnp.where(ok_M, w_M, 0.0))
        return carry

    return lax.fori_loop(0, my_steps, one_step, init), kvrow_S


def _dkv_kernel(off_ref, pair_ref, w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref, *, dims: _Dims, bp: int, splits: int):
    """Accumulates chunk c's dk, dv over its pairs; writes split s's fp32 partial."""
    def tile(carry, k_SxDp, v_SxDp, ok_M, qrow_M, lpos_M, w_M):
        q_MxDp = load_rows(q_ref, qrow_M, dims, ok_M)
        do_MxDp = load_rows(do_ref, qrow_M, dims, ok_M)
        lse_M = plgpu.load(lse_ref.at[lpos_M], mask=ok_M, other=0.0)
        di_M = plgpu.load(di_ref.at[lpos_M], mask=ok_M, other=0.0)
        return chunk_dkv(*carry, logits2(q_MxDp, k_SxDp, dims), lse_M, di_M, q_MxDp, do_MxDp, v_SxDp, w_M)

    zeros = jnp.zeros((dims.S, dims.Dp), jnp.float32)
    (dk_SxDp, dv_SxDp), kvrow_S = _chunk_program(dims, bp, splits, off_ref, pair_ref, w_ref, k_ref,
                                                 v_ref, tile, (zeros, zeros))
    prow_S = pl.program_id(2) * (dims.N * dims.Lkv * dims.H) + kvrow_S  # partial of split s
    store_rows(dk_ref, prow_S, dk_SxDp * dims.scale, dims)
    store_rows(dv_ref, prow_S, dv_SxDp, dims)


# --------------------------------------------------------------------------------------------------
# Wrappers and custom VJP.

def _lse_shapes(q, dims: _Dims):
    """Output shapes of the q-major kernels: rows of q's shape and one fp32 per (row, slot)."""
    return (jax.ShapeDtypeStruct((dims.N * dims.L * dims.HQ, dims.D), q.dtype),
            jax.ShapeDtypeStruct((dims.N * dims.H * dims.B * dims.K * dims.R,), jnp.float32))


def _forward(q, k, v, w_NxBxHxK, idx_NxBxHxK, dims: _Dims):
    """Returns o (N, L, HQ, D) and the base-2 LSE per (row, slot), (N*H*B*K*R,) fp32."""
    p = dims.params
    o, lse = _q_major_call(_fwd_kernel, dims, _lse_shapes(q, dims), p.fwd_warps, p.fwd_stages, "hsa_fwd")(
        idx_NxBxHxK.ravel(), w_NxBxHxK.ravel(), flat_rows(q), flat_rows(k), flat_rows(v))
    return o.reshape(q.shape), lse


def _dq(q, k, v, w_NxBxHxK, idx_NxBxHxK, lse, do, dims: _Dims):
    """Returns dq (N, L, HQ, D) and Di = dO . O_k per (row, slot), (N*H*B*K*R,) fp32."""
    p = dims.params
    dq, di = _q_major_call(_dq_kernel, dims, _lse_shapes(q, dims), p.dq_warps, p.dq_stages, "hsa_dq")(
        idx_NxBxHxK.ravel(), w_NxBxHxK.ravel(), flat_rows(q), flat_rows(k), flat_rows(v), flat_rows(do), lse)
    return dq.reshape(q.shape), di


def _dkv(q, k, v, w_NxBxHxK, idx_NxBxHxK, lse, di, do, dims: _Dims):
    """Returns dk, dv (N, Lkv, H, D): chunk-major kernel over the reverse index, split partials summed."""
    p, bp, splits = dims.params, _dkv_pairs(dims), _dkv_splits(dims)
    fixed_bytes, stage_bytes = _dkv_smem(dims, bp)
    part = jax.ShapeDtypeStruct((splits * dims.N * dims.Lkv * dims.H, dims.D), jnp.float32)
    dk_part, dv_part = kernel_call(
        _dkv_kernel, dims, grid=(dims.C, dims.N * dims.H, splits), out_shape=(part, part), warps=p.dkv_warps,
        stages=p.dkv_stages, fixed_bytes=fixed_bytes, stage_bytes=stage_bytes, name="hsa_dkdv",
        bp=bp, splits=splits)(
        *_reverse_index(idx_NxBxHxK, w_NxBxHxK, dims), w_NxBxHxK.transpose(0, 2, 1, 3).ravel(),
        flat_rows(q), flat_rows(k), flat_rows(v), flat_rows(do), lse, di)
    dk = dk_part.reshape(splits, *k.shape).sum(axis=0).astype(k.dtype)
    dv = dv_part.reshape(splits, *v.shape).sum(axis=0).astype(v.dtype)
    return dk, dv


def _backward(q, k, v, w_NxBxHxK, idx_NxBxHxK, lse, do, dims: _Dims):
    dq, di = _dq(q, k, v, w_NxBxHxK, idx_NxBxHxK, lse, do, dims)
    dk, dv = _dkv(q, k, v, w_NxBxHxK, idx_NxBxHxK, lse, di, do, dims)
    dw_NxHxBxK = di.reshape(dims.N, dims.H, dims.B, dims.K, dims.R).sum(axis=-1)
    return dq, dk, dv, dw_NxHxBxK.transpose(0, 2, 1, 3)


def _hsa_pallas(q, k, v, w, idx, dims: _Dims):
    return _forward(q, k, v, w.astype(jnp.float32), idx, dims)[0]


def _hsa_pallas_fwd(q, k, v, w, idx, dims: _Dims):
    o, lse = _forward(q, k, v, w.astype(jnp.float32), idx, dims)
    return o, (q, k, v, w, idx, lse)


def _hsa_pallas_bwd(dims: _Dims, res, do):
    q, k, v, w, idx, lse = res
    dq, dk, dv, dw = _backward(q, k, v, w.astype(jnp.float32), idx, lse, do.astype(q.dtype), dims)
    return dq, dk, dv, dw.astype(w.dtype), None


_hsa_pallas = jax.custom_vjp(_hsa_pallas, nondiff_argnums=(5,))
_hsa_pallas.defvjp(_hsa_pallas_fwd, _hsa_pallas_bwd)


# --------------------------------------------------------------------------------------------------
# Public op.

def make_dims(q, k, weights, *, chunk_size: int, sm_n: float = 0.0, scale: float | None = None,
              params: KernelParams = KernelParams(), interpret: bool = False) -> _Dims:
    """Static configuration of one Pallas call (validated shapes, tiling, tuning knobs). q, k, weights:
    arrays or anything with .shape / .dtype."""
    N, L, HQ, D = q.shape
    _, Lkv, H, _ = k.shape
    _, B, _, K = weights.shape
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"hsa_attention(impl=pallas): chunk_size={chunk_size} must be a power of two >= 16")
    return _Dims(N=N, L=L, HQ=HQ, D=D, Lkv=Lkv, H=H, B=B, K=K, S=chunk_size, scale=default_scale(D, scale),
                 sm_n=float(sm_n), itemsize=jnp.dtype(q.dtype).itemsize, params=params, interpret=interpret)


def hsa_attention_pallas(q, k, v, weights, indices, *, chunk_size: int, sm_n: float = 0.0,
                         scale: float | None = None, params: KernelParams = KernelParams(),
                         interpret: bool = False):
    """The Pallas op with explicit tuning knobs (benchmarks sweep them; models use hsa_attention).
    Same contract as hsa_attention, out-of-range chunk ids included."""
    _, _, C = check_hsa_args(q, k, v, weights, indices, chunk_size)
    dims = make_dims(q, k, weights, chunk_size=chunk_size, sm_n=sm_n, scale=scale, params=params,
                     interpret=interpret)
    # Out-of-range slots become (weight 0, chunk 0) outside the custom VJP: the kernels never read past
    # the kv arrays, the forward adds nothing for them, the dk/dv reverse index skips them (zero
    # weight) and d(weight) of such a slot is 0 (the jnp.where's VJP).
    w, idx = mask_out_of_range(weights, indices, C)
    return _hsa_pallas(q, k, v, w, idx, dims)


def hsa_attention(q, k, v, weights, indices, *, chunk_size: int, sm_n: float = 0.0,
                  scale: float | None = None, impl: str = "xla"):
    """Chunked retrieval attention. q (N, Lq, HQ, D); k, v (N, Lkv, H, D); weights (N, Lq/Q, H, K) float;
    indices (N, Lq/Q, H, K) int chunk ids (chunk c = kv rows [c*S, (c+1)*S), S = chunk_size). Query head
    h reads kv head h // (HQ/H); Q consecutive queries share one retrieval row. Returns (N, Lq, HQ, D)
    in q's dtype. `impl`: one of IMPLS (pallas_kernels.common).

    Out-of-range chunk ids: a slot whose id lies outside [0, Lkv/S) (negative ids included) contributes
    nothing, as if its weight were 0, and gets d(weight) = 0, on every backend. When `indices` is
    concrete (an eager call: not a jit/vmap tracer) such an id raises ValueError naming the id, its
    position and the allowed range instead. Padding slots: weight 0 and a valid id (conventionally 0)."""
    impl = resolve_impl(impl, "hsa_attention")
    if impl == "xla":
        return hsa_attention_reference(q, k, v, weights, indices, chunk_size=chunk_size, sm_n=sm_n, scale=scale)
    return hsa_attention_pallas(q, k, v, weights, indices, chunk_size=chunk_size, sm_n=sm_n, scale=scale,
                                interpret=impl == "interpret")
