"""Helpers shared by the Pallas-Triton kernels of hsa.py and gca.py.

Backend choice (`IMPLS`, `resolve_impl`), the static tiling every kernel uses (`KernelDims`,
`block_rows`, `padded`), fp32-accumulating matmuls (`dot`), masked gathers / scatters of rows of a
flat (rows, D) array (`load_rows`, `store_rows`), and the `pallas_call` wrapper that plans Triton's
pipelining depth against shared memory (`compiler_params`, `kernel_call`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Backends of the public ops:
#   "xla"        the pure-jnp reference (pallas_kernels/reference.py), differentiable by jax.grad;
#   "pallas"     the Pallas GPU kernels (Triton lowering) with a custom VJP;
#   "interpret"  the same Pallas kernels in interpret mode (CPU tests);
#   "auto"       "pallas" on GPU, "xla" elsewhere.
IMPLS = ("auto", "xla", "pallas", "interpret")
LOG2E = math.log2(math.e)

# Shared memory we plan tiles for: Hopper gives a block 227 KiB, and Triton adds scratch for layout
# conversions on top of the pipelined tiles.
SMEM_BUDGET = 160 * 1024

# Smallest tile side of a Triton dot (the matrix units' minimum).
MIN_TILE = 16


def resolve_impl(impl: str, op: str = "hsa_attention") -> str:
    """The backend `impl` names ("auto" resolved for the default backend); ValueError naming `op`
    when impl is not one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def padded(n: int) -> int:
    """A length padded for Triton shapes: the next power of two, at least MIN_TILE."""
    return max(MIN_TILE, pl.next_power_of_2(n))


def block_rows(n: int, cap: int) -> int:
    """Rows of a tile holding n rows: a power of two covering n, at most `cap` (several tiles then),
    at least MIN_TILE."""
    return max(MIN_TILE, min(cap, pl.next_power_of_2(n)))


def default_scale(D: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelDims:
    """Static configuration common to the kernels of both ops: head counts (HQ query heads packed G to
    a kv head), head dim D (padded to Dp in the kernels), softmax scale, element size of q/k/v,
    tuning knobs and interpret mode. Each op extends it with its own shapes."""
    HQ: int
    H: int
    D: int
    scale: float
    itemsize: int  # bytes per element of q/k/v
    params: object
    interpret: bool

    @property
    def G(self): return self.HQ // self.H  # query heads per kv head

    @property
    def Dp(self): return padded(self.D)  # head dim padded for Triton shapes


def precision(dtype):
    """Triton's default for an fp32 dot is TF32; fp32 inputs ask for IEEE fp32 products."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def dot(a, b, *, trans_a=False, trans_b=False):
    """a @ b (optionally transposed operands) with fp32 accumulation."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision(a.dtype), preferred_element_type=jnp.float32)


def compiler_params(warps: int, stages: int, fixed_bytes: int, stage_bytes: int):
    """Triton params; the pipelining depth is cut while fixed + stages * stage_bytes of tiles would
    overflow SMEM_BUDGET (large tiles, e.g. S=128 with D=256)."""
    while stages > 1 and fixed_bytes + stages * stage_bytes > SMEM_BUDGET:
        stages -= 1
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def kernel_call(kernel, dims: KernelDims, *, grid, out_shape, warps: int, stages: int, fixed_bytes: int,
                stage_bytes: int, name: str, **static):
    """pl.pallas_call of kernel(*refs, dims=dims, **static) with compiler_params for its tiles."""
    return pl.pallas_call(functools.partial(kernel, dims=dims, **static), grid=grid, out_shape=out_shape,
                          compiler_params=compiler_params(warps, stages, fixed_bytes, stage_bytes),
                          interpret=dims.interpret, name=name)


def flat_rows(x):
    """x as a (rows, last dim) matrix: the layout the kernels gather rows of."""
    return x.reshape(-1, x.shape[-1])


# --------------------------------------------------------------------------------------------------
# Rows of flat (rows, D) arrays, as (M, Dp) tiles.

def row_mask(ok_M, dims: KernelDims):
    """(M, Dp) mask of rows ok_M (all rows if None) and of the real head_dim columns; None if all-true."""
    col_ok = None if dims.Dp == dims.D else (jnp.arange(dims.Dp) < dims.D)[None, :]
    row_ok = None if ok_M is None else ok_M[:, None]
    if row_ok is None or col_ok is None:
        return row_ok if col_ok is None else col_ok
    return row_ok & col_ok


def at_rows(ref, row_M, dims: KernelDims):
    # Both axes as integer arrays: the form that both Triton lowering and interpret mode gather.
    return ref.at[row_M[:, None], jnp.arange(dims.Dp)[None, :]]


def load_rows(ref, row_M, dims: KernelDims, ok_M=None):
    """Gathers rows (M, Dp) of a (rows, D) array; masked rows / padded columns read 0."""
    mask = row_mask(ok_M, dims)
    if mask is None:
        return at_rows(ref, row_M, dims)[...]
    mask = jnp.broadcast_to(mask, (row_M.shape[0], dims.Dp))
    return plgpu.load(at_rows(ref, row_M, dims), mask=mask, other=0)


def store_rows(ref, row_M, x_MxDp, dims: KernelDims, ok_M=None):
    """Scatters x (M, Dp) into rows of a (rows, D) array; masked rows / padded columns are not written."""
    mask = row_mask(ok_M, dims)
    if mask is None:
        at_rows(ref, row_M, dims)[...] = x_MxDp.astype(ref.dtype)
    else:
        mask = jnp.broadcast_to(mask, (row_M.shape[0], dims.Dp))
        plgpu.store(at_rows(ref, row_M, dims), x_MxDp.astype(ref.dtype), mask=mask)


# --------------------------------------------------------------------------------------------------
# Per-chunk maths of the kernels (one chunk of L keys against M query rows; base-2 logits x).

def logits2(q_MxDp, k_LxDp, dims: KernelDims, kv_ok_L=None):
    """Base-2 logits scale * log2(e) * q k^T (M, L) fp32; keys outside kv_ok_L (if given) get -inf."""
    x_MxL = dot(q_MxDp, k_LxDp, trans_b=True) * (dims.scale * LOG2E)
    return x_MxL if kv_ok_L is None else jnp.where(kv_ok_L[None, :], x_MxL, -jnp.inf)


def chunk_forward(x_MxL, v_LxDp, w, sm_n: float = 0.0):
    """One chunk's softmax-attention output scaled by its weight, w * softmax(x) V (M, Dp) fp32, and
    the base-2 log-sum-exp (M,) the backward recomputes P from. sm_n adds sm_n * exp(0) to the
    denominator (softmax-off-by-one when 1)."""
    m_M = jnp.max(x_MxL, axis=1)
    if sm_n:  # softmax-off-by-one's implicit extra logit 0 takes part in the max
        m_M = jnp.maximum(m_M, 0.0)
    p_MxL = jnp.exp2(x_MxL - m_M[:, None])
    l_M = jnp.sum(p_MxL, axis=1)
    if sm_n:
        l_M += sm_n * jnp.exp2(-m_M)
    o_MxDp = dot(p_MxL.astype(v_LxDp.dtype), v_LxDp)
    return o_MxDp * (w / l_M)[:, None], m_M + jnp.log2(l_M)


def chunk_dq(x_MxL, lse_M, do_MxDp, k_LxDp, v_LxDp, w):
    """One chunk's part of dq / scale, dS K (M, Dp) fp32, with dS = w P (dP - Di), P = exp2(x - lse),
    dP = dO V^T; and Di = rowsum(P * dP) = dO . O_k (M,): the chunk's d(weight) per query row."""
    p_MxL = jnp.exp2(x_MxL - lse_M[:, None])
    dp_MxL = dot(do_MxDp, v_LxDp, trans_b=True)
    di_M = jnp.sum(p_MxL * dp_MxL, axis=1)
    ds_MxL = (w * p_MxL) * (dp_MxL - di_M[:, None])
    return dot(ds_MxL.astype(k_LxDp.dtype), k_LxDp), di_M


def chunk_dkv(dk_LxDp, dv_LxDp, x_MxL, lse_M, di_M, q_MxDp, do_MxDp, v_LxDp, w_M):
    """Adds M query rows' parts to a chunk's dk / scale and dv (L, Dp) fp32: with wP = w P,
    dV += wP^T dO and dK += (wP (dO V^T - Di))^T q. Rows with weight w_M = 0 add nothing."""
    wp_MxL = w_M[:, None] * jnp.exp2(x_MxL - lse_M[:, None])
    dv_LxDp += dot(wp_MxL.astype(do_MxDp.dtype), do_MxDp, trans_a=True)
    ds_MxL = wp_MxL * (dot(do_MxDp, v_LxDp, trans_b=True) - di_M[:, None])
    dk_LxDp += dot(ds_MxL.astype(q_MxDp.dtype), q_MxDp, trans_a=True)
    return dk_LxDp, dv_LxDp
