"""The Pallas kernels lower to Triton for a Hopper GPU, checked on the CPU.

Interpret mode runs the kernels' maths but not the Pallas->Triton lowering, whose failures otherwise
show up only on a GPU. Exporting for CUDA under an abstract H100 runs that lowering here.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh

import pallas_kernels
from pallas_kernels import gca_attention, hsa_attention

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu"))
TRITON_CALL = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def lower_for_gpu(f, *shapes_dtypes):
    """Exports f's forward and backward for CUDA; returns the number of Triton kernels lowered."""
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes]
    loss = lambda *a: f(*a).astype(jnp.float32).sum()
    grad = jax.grad(loss, argnums=tuple(range(len(args) - (1 if args[-1].dtype == jnp.int32 else 0))))
    with jax.sharding.use_abstract_mesh(H100):
        exported = jax.export.export(jax.jit(lambda *a: (f(*a), grad(*a))), platforms=["cuda"],
                                     disabled_checks=[TRITON_CALL])(*args)
    return exported.mlir_module().count("xla.gpu.triton")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("G,Q,D,S", [(16, 1, 64, 64), (1, 1, 128, 32), (4, 2, 48, 128)])
def test_hsa_kernels_lower_to_triton(dtype, G, Q, D, S):
    N, L, H, K = 2, 320, 2, 3
    f = lambda q, k, v, w, i: hsa_attention(q, k, v, w, i, chunk_size=S, impl="pallas")
    n = lower_for_gpu(f, ((N, L, H * G, D), dtype), ((N, 2 * S * 2, H, D), dtype), ((N, 2 * S * 2, H, D), dtype),
                      ((N, L // Q, H, K), jnp.float32), ((N, L // Q, H, K), jnp.int32))
    assert n >= 3  # forward, dq, dk/dv


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("G,Lq,K", [(1, 64, 8), (2, 65, 3), (1, 2, 5)])
def test_gca_kernels_lower_to_triton(dtype, G, Lq, K):
    B, H, Lk, D = 3, 2, 64, 64
    f = lambda q, k, v, w: gca_attention(q, k, v, w, impl="pallas")
    n = lower_for_gpu(f, ((B, H * G, Lq, D), dtype), ((B, H, K, Lk, D), dtype), ((B, H, K, Lk, D), dtype),
                      ((B, K), jnp.float32))
    assert n >= 3


def test_package_exports_both_ops_and_no_module_reads_anothers_private_names():
    """hsa.py and gca.py share only common.py's (and reference.py's) public helpers."""
    for name in ("hsa_attention", "gca_attention", "hsa_attention_pallas", "gca_attention_pallas", "IMPLS"):
        assert name in pallas_kernels.__all__ and hasattr(pallas_kernels, name), name
    assert pallas_kernels.IMPLS == ("auto", "xla", "pallas", "interpret")
    for path in pathlib.Path(pallas_kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pallas_kernels"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
