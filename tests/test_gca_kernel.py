"""The Pallas GCA kernels against the pure-jnp reference op, and both against the original's golden GCA
outputs: in interpret mode everywhere, and compiled (impl "pallas") as well when JAX's default backend
is a GPU (pallas_kernels.testing.KERNEL_IMPLS).

Interpret mode starts every pallas_call output as NaN (checked in test_hsa_kernel.py's
test_interpret_mode_poisons_unwritten_outputs), so an element a kernel forgets to write (the original
leaves dq row 64 unwritten at Lq = 65, and every row at K = 1) is a NaN in o / dq / dk / dv / dw and
fails the comparison. Random inputs come from the `rng` fixture: a fresh seed per test, printed, or
$KERNEL_TEST_SEED (pallas_kernels/testing.py).
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from conftest import fixture_names, load_npz, rel_err
from pallas_kernels import gca
from pallas_kernels.gca import GCAParams, gca_attention, gca_attention_pallas
from pallas_kernels.reference import gca_attention_reference, hsa_attention_reference
from pallas_kernels.testing import KERNEL_IMPLS

# o, dq, dk, dv: max |kernel - reference| / max |reference|, by dtype (q's). Measured in interpret mode,
# 6 seeds x the 11 GRID cases: fp32 <= 1.3e-6; bf16 <= 7.7e-3 (P and dS rounded to bf16 before the
# matmuls, outputs rounded to bf16).
TOL = {"float32": 5e-6, "bfloat16": 1e-2}
# dw (fp32 whatever q's dtype): dw[b, k] sums the terms dO . O_k over every head and row, and they cancel,
# so an fp32 rounding error is a fixed fraction of sum |dO . O_k|, not of |dw|; error / max |dw| was
# heavy-tailed (1.1e-5 on one seed of 100+). Measured against sum |terms| in interpret mode: <= 1.0e-6
# (9 seeds x the 11 GRID cases, 41 of GQA4_K7_bf16 and P64_K8); the worst-case bound of an fp32 sum of
# 256 terms is 256 eps = 3e-5.
DW_TOL = 1e-5
OUTPUTS = ("o", "dq", "dk", "dv", "dw")


# Fixtures `seed` and `rng`: tests/conftest.py.


def _inputs(rng, *, B, HQ, H, Lq, K, Lk, D, dtype, zero_last_key=False):
    q, do = (jnp.asarray(rng.standard_normal((B, HQ, Lq, D)), dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, H, K, Lk, D)) for _ in range(2))
    if zero_last_key:  # DRT at P % 64 == 0: the landmark slot's key and value are zero
        k[:, :, :, -1], v[:, :, :, -1] = 0, 0
    w = jax.nn.softmax(jnp.asarray(rng.standard_normal((B, K)), jnp.float32), axis=-1)
    return q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), w, do


def _value_and_grads(op, q, k, v, w, do):
    @jax.jit
    def run(q, k, v, w, do):
        o, vjp = jax.vjp(op, q, k, v, w)
        return (o, *vjp(do))
    return run(q, k, v, w, do)


def _case(B=1, HQ=2, H=2, Lq=64, K=2, Lk=64, D=32, dtype=jnp.float32):
    return dict(B=B, HQ=HQ, H=H, Lq=Lq, K=K, Lk=Lk, D=D, dtype=dtype)


GRID = {
    "P64_K8": _case(K=8, D=64),
    "P65_K4": _case(Lq=65, K=4, D=64),  # the S=64 configs: 65 query rows, one tile + 1 row
    "P65_K1": _case(B=2, Lq=65, K=1),  # K=1: the original writes no dq row at all
    "K3_batch3": _case(B=3, K=3),  # K not dividing 128 (the original asserts 128 % K == 0)
    "K5_GQA2": _case(HQ=4, H=2, K=5),
    "GQA4_K7_bf16": _case(HQ=4, H=1, K=7, D=64, dtype=jnp.bfloat16),
    "P64_K8_bf16": _case(B=2, K=8, D=64, dtype=jnp.bfloat16),
    "Lk48_D40": _case(Lq=40, K=3, Lk=48, D=40),  # padded key block and head dim
    "decode_Lq1": _case(Lq=1, K=3, D=64),
    "decode_Lq2_bf16": _case(Lq=2, K=8, D=32, dtype=jnp.bfloat16),
    "Lq130_3tiles": _case(Lq=130, K=2, Lk=32, D=16),
}


def _kernel_op(impl, params=GCAParams()):
    return functools.partial(gca_attention_pallas, params=params, interpret=impl == "interpret")


def _dw_terms(q, k, v, do):
    """(B, K): sum over heads and rows of |dO . O_k|, O_k the output of chunk k alone (weight one), in
    fp32: the size of the terms dw adds up."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    B, K = q.shape[0], k.shape[2]
    alone = lambda e_K: gca_attention_reference(f32(q), f32(k), f32(v), jnp.broadcast_to(e_K, (B, K)))  # noqa: E731
    o_KxBxHQxLqxD = jax.vmap(alone)(jnp.eye(K))
    return jnp.abs(jnp.einsum("kbhid,bhid->kbhi", o_KxBxHQxLqxD, f32(do))).sum(axis=(2, 3)).T


def _assert_close(got, want, seed, dw_terms):
    for label, g, x in zip(OUTPUTS, got, want):
        assert g.shape == x.shape and g.dtype == x.dtype, label
        assert bool(jnp.all(jnp.isfinite(g))), f"{label}: unwritten (NaN) elements (KERNEL_TEST_SEED={seed})"
        if label == "dw":
            err, tol = float(jnp.max(jnp.abs(g - x) / dw_terms)), DW_TOL
        else:
            err, tol = rel_err(g, x), TOL[str(g.dtype)]
        assert err <= tol, f"{label}: rel err {err:.3g} > {tol} (KERNEL_TEST_SEED={seed})"


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
class TestKernel:
    """The kernel tests, once per backend in KERNEL_IMPLS: interpret mode, and the compiled Triton
    kernels when a GPU is present."""

    @pytest.mark.parametrize("name", sorted(GRID))
    def test_matches_reference(self, rng, seed, impl, name):
        case = GRID[name]
        q, k, v, w, do = _inputs(rng, **case)
        got = _value_and_grads(_kernel_op(impl), q, k, v, w, do)
        want = _value_and_grads(functools.partial(gca_attention, impl="xla"), q, k, v, w, do)
        _assert_close(got, want, seed, _dw_terms(q, k, v, do))

    @pytest.mark.parametrize("block_q", [16, 32])
    def test_block_size_variants_match_reference(self, rng, seed, impl, block_q):
        """Smaller query tiles (several per head, the last one partial) give the same results."""
        q, k, v, w, do = _inputs(rng, **_case(HQ=4, H=2, Lq=65, K=3))
        want = _value_and_grads(functools.partial(gca_attention, impl="xla"), q, k, v, w, do)
        got = _value_and_grads(_kernel_op(impl, GCAParams(block_q=block_q)), q, k, v, w, do)
        _assert_close(got, want, seed, _dw_terms(q, k, v, do))

    def test_zero_landmark_slot_is_softmax_plus_one(self, rng, seed, impl):
        """A zero key/value in every chunk (DRT at P = 64) equals softmax-off-by-one over the other Lk-1
        keys: checked against the HSA reference op with sm_n = 1 and one retrieval row per batch entry."""
        B, HQ, Lq, K, Lk, D = 2, 2, 64, 3, 64, 32
        q, k, v, w, _ = _inputs(rng, **_case(B=B, HQ=HQ, H=HQ, Lq=Lq, K=K, Lk=Lk, D=D), zero_last_key=True)
        got = _kernel_op(impl)(q, k, v, w)
        to_hsa_kv = lambda x: x[:, :, :, :-1].transpose(0, 2, 3, 1, 4).reshape(B, K * (Lk - 1), HQ, D)  # noqa: E731
        w_hsa = jnp.broadcast_to(w[:, None, None, :], (B, 1, HQ, K))
        idx = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, 1, HQ, K))
        want = hsa_attention_reference(q.transpose(0, 2, 1, 3), to_hsa_kv(k), to_hsa_kv(v), w_hsa, idx,
                                       chunk_size=Lk - 1, sm_n=1.0).transpose(0, 2, 1, 3)
        assert rel_err(got, want) <= TOL["float32"], f"KERNEL_TEST_SEED={seed}"


@pytest.mark.parametrize("name", fixture_names("drt", "gca_kernel_*.npz"))
@pytest.mark.parametrize("impl", ["xla", *KERNEL_IMPLS])
def test_original_gca_fixture(name, impl):
    """o, dq, dk, dv, dw of the original GCA maths (torch autograd, fp32) for the given dO."""
    d = load_npz("drt", name)
    op = functools.partial(gca_attention, scale=float(d["sm_scale"]), impl=impl)
    got = _value_and_grads(op, *(jnp.asarray(d[x]) for x in ("q", "k", "v", "weights", "do")))
    for label, g in zip(("o", "dq", "dk", "dv", "dw"), got):
        assert rel_err(g, d[label]) <= 1e-5, (label, rel_err(g, d[label]))


def test_forward_lse_fully_written(rng):
    q, k, v, w, _ = _inputs(rng, **_case(B=2, HQ=4, H=2, Lq=65, K=3))
    dims = gca.make_dims(q, k, interpret=True)
    o, lse = gca._forward(q, k, v, w, dims)
    assert lse.shape == (2 * 4 * 3 * 65,)
    assert bool(jnp.all(jnp.isfinite(lse))) and bool(jnp.all(jnp.isfinite(o)))


def test_bad_shapes_raise_naming_the_argument():
    q = jnp.zeros((2, 4, 64, 32))
    kv = jnp.zeros((2, 2, 3, 64, 32))
    with pytest.raises(ValueError, match=r"weights\(2, 2\) must be \(B=2, K=3\)"):
        gca_attention(q, kv, kv, jnp.zeros((2, 2)), impl="interpret")
    with pytest.raises(ValueError, match="query heads 4 must be a multiple of kv heads 3"):
        gca_attention(q, jnp.zeros((2, 3, 3, 64, 32)), jnp.zeros((2, 3, 3, 64, 32)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="gca_attention: impl='cuda' is not one of"):
        gca_attention(q, kv, kv, jnp.zeros((2, 3)), impl="cuda")
