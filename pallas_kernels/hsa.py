"""HSA attention: the public op.

`hsa_attention` is the one entry point the models call. `impl` picks the backend:
  "xla"        the pure-jnp reference (pallas_kernels/reference.py), differentiable by jax.grad;
  "pallas"     the Pallas GPU kernels (Triton lowering) with a custom VJP;
  "interpret"  the same Pallas kernels in interpret mode (CPU tests);
  "auto"       "pallas" on GPU, "xla" elsewhere.
"""

from __future__ import annotations

import jax

from pallas_kernels.reference import hsa_attention_reference

IMPLS = ("auto", "xla", "pallas", "interpret")


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"hsa_attention: impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def hsa_attention(q, k, v, weights, indices, *, chunk_size: int, sm_n: float = 0.0,
                  scale: float | None = None, impl: str = "xla"):
    """Chunked retrieval attention. q (N, Lq, HQ, D); k, v (N, Lkv, H, D); weights (N, Lq/Q, H, K) float;
    indices (N, Lq/Q, H, K) int chunk ids (chunk c = kv rows [c*S, (c+1)*S)). Query head h reads kv head
    h // (HQ/H); Q consecutive queries share one retrieval row. Returns (N, Lq, HQ, D) in q's dtype."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return hsa_attention_reference(q, k, v, weights, indices, chunk_size=chunk_size, sm_n=sm_n, scale=scale)
    raise NotImplementedError(f"hsa_attention: impl={impl!r} is not available yet")
