"""Exact two-stage replacement for `jax.lax.top_k(x, k)[1]` over a long last axis (indices only).

Order: descending value, ties by lower index first (lax.top_k's rule). Split the last axis into G blocks
of `block` entries, rank blocks by their max (ties by lower block id) and keep the top kb = min(k, G).
Exactness: let e be in the global top-k, in block b. If b were not kept, kb = k blocks b' rank ahead of b,
and each block's max m' beats e: m' = max(b') >= max(b) >= e, and when m' == e then max(b') == max(b)
with b' < b, so m' has the lower index. That is k elements beating e, so e is not in the top-k: a
contradiction (when kb = G < k every block is kept). Kept blocks are laid out in ascending block id, so a
candidate's position is monotone in its original index and lax.top_k's tie rule on the candidates is the
tie rule on x.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


MIN_ROWS = 256  # fewer rows (decoding: one query per sequence) are launch-bound: one TopK beats five kernels


def top_k_indices(x_NxC, k: int, block: int = 128, min_rows: int = MIN_ROWS) -> jax.Array:
    """int32 indices (..., k) equal to `jax.lax.top_k(x_NxC, k)[1]`; any leading dims, -inf allowed, no NaN.

    Stage 1: block maxima bmax = max over each block of `block` entries, top min(k, G) block ids.
    Stage 2: exact lax.top_k over the kept blocks' kb*block entries, mapped back to global indices.
    Costs two small top_k's instead of one over C; falls back to lax.top_k when C <= 4*block, k > block
    or there are fewer than min_rows rows (no gain there; benchmarks/topk.py measures both).
    """
    x_NxC = jax.lax.stop_gradient(x_NxC)  # indices carry no gradient
    C = x_NxC.shape[-1]
    if C <= 4 * block or k > block or math.prod(x_NxC.shape[:-1]) < min_rows:
        return jax.lax.top_k(x_NxC, k)[1].astype(jnp.int32)
    lead = x_NxC.shape[:-1]
    G = -(-C // block)
    # Pads sit at higher indices than every real entry, so (k <= C) they never beat a real entry,
    # not even a real -inf; the last block always holds a real entry, so its max is a real value.
    if jnp.issubdtype(x_NxC.dtype, jnp.floating):
        pad_value = -jnp.inf
    else:
        pad_value = jnp.iinfo(x_NxC.dtype).min
    x_NxCp = jnp.pad(x_NxC, [(0, 0)] * len(lead) + [(0, G * block - C)], constant_values=pad_value)
    x_NxGxB = x_NxCp.reshape(*lead, G, block)
    bmax_NxG = jnp.max(x_NxGxB, axis=-1)
    kb = min(k, G)
    # Ascending block ids: candidate order follows original index order (tie rule preserved).
    bid_NxKb = jnp.sort(jax.lax.top_k(bmax_NxG, kb)[1], axis=-1)
    cand_NxKbxB = jnp.take_along_axis(x_NxGxB, bid_NxKb[..., None], axis=-2)
    j_NxK = jax.lax.top_k(cand_NxKbxB.reshape(*lead, kb * block), k)[1]
    idx_NxK = jnp.take_along_axis(bid_NxKb, j_NxK // block, axis=-1) * block + j_NxK % block
    return idx_NxK.astype(jnp.int32)
