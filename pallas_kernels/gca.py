"""GCA attention (DRT grouped cross attention): the public op and its Pallas GPU kernels.

    o[b, h, i] = sum_k w[b, k] * sum_j softmax_j(scale * q[b, h, i] . k[b, h//G, k, j]) v[b, h//G, k, j]

q (B, HQ, Lq, D); k, v (B, H, K, Lk, D): the K chunks retrieved for row b, already gathered (the
original's layout); w (B, K), shared by all heads. Every chunk has its own softmax over its Lk keys.
`impl` picks the backend as for hsa_attention: "xla" (pallas_kernels/reference.py), "pallas",
"interpret" (the Pallas kernels in interpret mode, CPU tests), "auto" ("pallas" on GPU, else "xla").

Kernels (Triton lowering; arrays passed flat as rows of D, the head dim padded to Dp and the chunk to
Lkp, both powers of two >= 16, masked):
  forward  grid (B*HQ, row tiles): for each of the K chunks, one softmax over its Lk keys, acc += w P V
           (fp32), and the base-2 log-sum-exp per (row, chunk) for the backward.
  dq       same grid: recomputes P from the LSE, Di = rowsum(P * dP) (= dO . O_k), stores Di,
           dS = w P (dP - Di), dq += dS K.
  dk/dv    grid (B*H*K,): the program of one retrieved chunk loads its k, v once and walks the G heads
           and query tiles that read it: dV += (w P)^T dO, dK += dS^T q. No atomics.
  dw       = sum over heads and rows of Di (outside the kernels, fp32).
Unlike the original Triton kernels, any K (not only divisors of 128), any Lq (65 included: every dq
row is written), any Lk and head dim, fp32 as well as bf16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (IMPLS, KernelDims, block_rows, chunk_dkv, chunk_dq, chunk_forward,
                                   default_scale, flat_rows, kernel_call, load_rows, logits2, padded,
                                   resolve_impl, store_rows)
from pallas_kernels.reference import check_gca_args, gca_attention_reference

__all__ = ["IMPLS", "GCAParams", "gca_attention", "gca_attention_pallas", "make_dims"]


@dataclasses.dataclass(frozen=True)
class GCAParams:
    """Tuning knobs of the GCA kernels."""
    block_q: int = 64  # query rows per tile (capped by next_power_of_2(Lq), at least 16)
    fwd_warps: int = 4
    fwd_stages: int = 2
    dq_warps: int = 4
    dq_stages: int = 2
    dkv_warps: int = 4
    dkv_stages: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Dims(KernelDims):
    """Static shapes and derived tiling of one call (params: GCAParams)."""
    B: int
    Lq: int
    K: int
    Lk: int

    @property
    def BM(self): return block_rows(self.Lq, self.params.block_q)  # query rows per tile

    @property
    def NT(self): return pl.cdiv(self.Lq, self.BM)  # query tiles per head

    @property
    def Lkp(self): return padded(self.Lk)  # keys per chunk, padded


# Flat layouts: q/o/dO/dq rows ((b*HQ + h)*Lq + i); k/v rows (((b*H + e)*K + k)*Lk + j);
# LSE and Di ((b*HQ + h)*K + k)*Lq + i; weights b*K + k.

def _divmod(x, d: int):
    """(x // d, x % d) for a non-negative traced int32 and a static divisor, as plain lax div/rem:
    jnp's floor-division wrappers do not lower through Pallas-Triton here."""
    d = jnp.int32(d)
    return lax.div(x, d), lax.rem(x, d)


def _q_tile(dims: _Dims, bh, t):
    """Query tile t of flat head bh = b*HQ + h: positions i (BM,), q rows (BM,), in range (BM,)."""
    i_BM = t * dims.BM + jnp.arange(dims.BM)
    return i_BM, bh * dims.Lq + i_BM, i_BM < dims.Lq


def _lse_pos(dims: _Dims, bh, kk, i_BM):
    """Positions of rows i_BM of head bh, chunk kk in the flat LSE / Di arrays."""
    return (bh * dims.K + kk) * dims.Lq + i_BM


def _chunk(dims: _Dims, k_ref, v_ref, bek):
    """Keys and values of retrieved chunk bek = (b*H + e)*K + k, (Lkp, Dp) with padding rows 0; the
    chunk's k/v rows and their validity (None when Lk needs no padding)."""
    j = jnp.arange(dims.Lkp)
    ok = None if dims.Lkp == dims.Lk else j < dims.Lk
    rows = bek * dims.Lk + j
    return load_rows(k_ref, rows, dims, ok), load_rows(v_ref, rows, dims, ok), rows, ok


def _q_program(dims: _Dims):
    """This q-major program's batch row b, kv head e, flat head bh and query tile (i, q rows, in range)."""
    bh, t = pl.program_id(0), pl.program_id(1)
    b, h = _divmod(bh, dims.HQ)
    return b, lax.div(h, jnp.int32(dims.G)), bh, _q_tile(dims, bh, t)


def _fwd_kernel(w_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, dims: _Dims):
    b, e, bh, (i_BM, qrow_BM, ok_BM) = _q_program(dims)
    q_BMxDp = load_rows(q_ref, qrow_BM, dims, ok_BM)

    def one_chunk(kk, acc_BMxDp):
        k_LxDp, v_LxDp, _, kv_ok = _chunk(dims, k_ref, v_ref, (b * dims.H + e) * dims.K + kk)
        o_BMxDp, lse_BM = chunk_forward(logits2(q_BMxDp, k_LxDp, dims, kv_ok), v_LxDp, w_ref[b * dims.K + kk])
        plgpu.store(lse_ref.at[_lse_pos(dims, bh, kk, i_BM)], lse_BM, mask=ok_BM)
        return acc_BMxDp + o_BMxDp

    acc = lax.fori_loop(0, dims.K, one_chunk, jnp.zeros((dims.BM, dims.Dp), jnp.float32))
    store_rows(o_ref, qrow_BM, acc, dims, ok_BM)


def _dq_kernel(w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dq_ref, di_ref, *, dims: _Dims):
    b, e, bh, (i_BM, qrow_BM, ok_BM) = _q_program(dims)
    q_BMxDp = load_rows(q_ref, qrow_BM, dims, ok_BM)
    do_BMxDp = load_rows(do_ref, qrow_BM, dims, ok_BM)

    def one_chunk(kk, dq_BMxDp):
        k_LxDp, v_LxDp, _, kv_ok = _chunk(dims, k_ref, v_ref, (b * dims.H + e) * dims.K + kk)
        pos_BM = _lse_pos(dims, bh, kk, i_BM)
        lse_BM = plgpu.load(lse_ref.at[pos_BM], mask=ok_BM, other=0.0)
        dq_part, di_BM = chunk_dq(logits2(q_BMxDp, k_LxDp, dims, kv_ok), lse_BM, do_BMxDp, k_LxDp, v_LxDp,
                                  w_ref[b * dims.K + kk])
        plgpu.store(di_ref.at[pos_BM], di_BM, mask=ok_BM)
        return dq_BMxDp + dq_part

    dq = lax.fori_loop(0, dims.K, one_chunk, jnp.zeros((dims.BM, dims.Dp), jnp.float32))
    store_rows(dq_ref, qrow_BM, dq * dims.scale, dims, ok_BM)


def _dkv_kernel(w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, *, dims: _Dims):
    bek = pl.program_id(0)
    be, kk = _divmod(bek, dims.K)
    b, e = _divmod(be, dims.H)
    w = w_ref[b * dims.K + kk]
    k_LxDp, v_LxDp, kvrow_L, kv_ok = _chunk(dims, k_ref, v_ref, bek)

    def one_tile(n, carry):
        g, t = _divmod(n, dims.NT)
        bh = b * dims.HQ + e * dims.G + g
        i_BM, qrow_BM, ok_BM = _q_tile(dims, bh, t)
        q_BMxDp = load_rows(q_ref, qrow_BM, dims, ok_BM)
        do_BMxDp = load_rows(do_ref, qrow_BM, dims, ok_BM)
        pos_BM = _lse_pos(dims, bh, kk, i_BM)
        lse_BM = plgpu.load(lse_ref.at[pos_BM], mask=ok_BM, other=0.0)
        di_BM = plgpu.load(di_ref.at[pos_BM], mask=ok_BM, other=0.0)
        w_BM = jnp.where(ok_BM, w, 0.0)  # rows past Lq contribute nothing
        return chunk_dkv(*carry, logits2(q_BMxDp, k_LxDp, dims, kv_ok), lse_BM, di_BM, q_BMxDp, do_BMxDp,
                         v_LxDp, w_BM)

    zeros = jnp.zeros((dims.Lkp, dims.Dp), jnp.float32)
    dk, dv = lax.fori_loop(0, dims.G * dims.NT, one_tile, (zeros, zeros))
    store_rows(dk_ref, kvrow_L, dk * dims.scale, dims, kv_ok)
    store_rows(dv_ref, kvrow_L, dv, dims, kv_ok)


def _call(kernel, dims: _Dims, grid, out_shape, warps, stages, name):
    return kernel_call(kernel, dims, grid=grid, out_shape=out_shape, warps=warps, stages=stages,
                       fixed_bytes=2 * dims.BM * dims.Dp * dims.itemsize,
                       stage_bytes=2 * dims.Lkp * dims.Dp * dims.itemsize, name=name)


def _lse_shapes(q, dims: _Dims):
    """Output shapes of the q-major kernels: rows of q's shape and one fp32 per (row, chunk)."""
    return (jax.ShapeDtypeStruct((dims.B * dims.HQ * dims.Lq, dims.D), q.dtype),
            jax.ShapeDtypeStruct((dims.B * dims.HQ * dims.K * dims.Lq,), jnp.float32))


def _forward(q, k, v, w, dims: _Dims):
    """-> o (B, HQ, Lq, D) in q's dtype, base-2 LSE (B*HQ*K*Lq,) fp32."""
    p = dims.params
    o, lse = _call(_fwd_kernel, dims, (dims.B * dims.HQ, dims.NT), _lse_shapes(q, dims), p.fwd_warps,
                   p.fwd_stages, "gca_fwd")(w.ravel(), flat_rows(q), flat_rows(k), flat_rows(v))
    return o.reshape(q.shape), lse


def _backward(q, k, v, w, lse, do, dims: _Dims):
    p = dims.params
    dq, di = _call(_dq_kernel, dims, (dims.B * dims.HQ, dims.NT), _lse_shapes(q, dims), p.dq_warps,
                   p.dq_stages, "gca_dq")(w.ravel(), flat_rows(q), flat_rows(k), flat_rows(v), flat_rows(do), lse)
    kv_rows = jax.ShapeDtypeStruct((dims.B * dims.H * dims.K * dims.Lk, dims.D), k.dtype)
    dk, dv = _call(_dkv_kernel, dims, (dims.B * dims.H * dims.K,), (kv_rows, kv_rows), p.dkv_warps,
                   p.dkv_stages, "gca_dkdv")(w.ravel(), flat_rows(q), flat_rows(k), flat_rows(v),
                                             flat_rows(do), lse, di)
    dw = di.reshape(dims.B, dims.HQ, dims.K, dims.Lq).sum(axis=(1, 3))
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), dw


def _gca_pallas(q, k, v, w, dims: _Dims):
    return _forward(q, k, v, w.astype(jnp.float32), dims)[0]


def _gca_pallas_fwd(q, k, v, w, dims: _Dims):
    o, lse = _forward(q, k, v, w.astype(jnp.float32), dims)
    return o, (q, k, v, w, lse)


def _gca_pallas_bwd(dims: _Dims, res, do):
    q, k, v, w, lse = res
    dq, dk, dv, dw = _backward(q, k, v, w.astype(jnp.float32), lse, do.astype(q.dtype), dims)
    return dq, dk, dv, dw.astype(w.dtype)


_gca_pallas = jax.custom_vjp(_gca_pallas, nondiff_argnums=(4,))
_gca_pallas.defvjp(_gca_pallas_fwd, _gca_pallas_bwd)


# --------------------------------------------------------------------------------------------------
# Public op.

def make_dims(q, k, *, scale: float | None = None, params: GCAParams = GCAParams(),
              interpret: bool = False) -> _Dims:
    """Static configuration of one Pallas call. q, k: arrays or anything with .shape / .dtype."""
    B, HQ, Lq, D = q.shape
    _, H, K, Lk, _ = k.shape
    return _Dims(B=B, HQ=HQ, H=H, Lq=Lq, K=K, Lk=Lk, D=D, scale=default_scale(D, scale),
                 itemsize=jnp.dtype(q.dtype).itemsize, params=params, interpret=interpret)


def gca_attention_pallas(q, k, v, weights, *, scale: float | None = None, params: GCAParams = GCAParams(),
                         interpret: bool = False):
    """The Pallas op with explicit tuning knobs (benchmarks sweep them; models use gca_attention)."""
    check_gca_args(q, k, v, weights)
    return _gca_pallas(q, k, v, weights, make_dims(q, k, scale=scale, params=params, interpret=interpret))


def gca_attention(q, k, v, weights, *, scale: float | None = None, impl: str = "xla"):
    """Grouped cross attention over K retrieved chunks. q (B, HQ, Lq, D); k, v (B, H, K, Lk, D);
    weights (B, K). Query head h reads kv head h // (HQ/H). Returns (B, HQ, Lq, D) in q's dtype.
    `impl`: one of IMPLS (pallas_kernels.common). The op takes the chunks already gathered, so it has
    no chunk ids to check: the caller's gather (hsa_jax's DRT layer) owns their range."""
    impl = resolve_impl(impl, "gca_attention")
    if impl == "xla":
        return gca_attention_reference(q, k, v, weights, scale=scale)
    return gca_attention_pallas(q, k, v, weights, scale=scale, interpret=impl == "interpret")
