"""Attention ops for chunked retrieval attention: pure-jnp references and Pallas GPU kernels."""

from pallas_kernels.hsa import hsa_attention

__all__ = ["hsa_attention"]
