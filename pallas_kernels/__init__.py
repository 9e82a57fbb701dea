"""Attention ops for chunked retrieval attention: pure-jnp references and Pallas GPU kernels.

hsa_attention (hsa.py) and gca_attention (gca.py) are the public ops; `impl` picks one of IMPLS (the same
backends for both).
reference.py holds the pure-jnp oracles, common.py the helpers both kernels share.
"""

from pallas_kernels.common import IMPLS
from pallas_kernels.gca import GCAParams, gca_attention, gca_attention_pallas
from pallas_kernels.hsa import KernelParams, hsa_attention, hsa_attention_pallas

__all__ = ["IMPLS", "hsa_attention", "hsa_attention_pallas", "KernelParams",
           "gca_attention", "gca_attention_pallas", "GCAParams"]
