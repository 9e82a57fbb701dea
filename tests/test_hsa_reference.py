"""The pure-jnp HSA reference against the original op's golden outputs, and its own invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import current_rng, fixture_names, load_npz, rel_err
from pallas_kernels import hsa_attention
from pallas_kernels.reference import hsa_attention_reference


@pytest.mark.parametrize("name", fixture_names("swa_hsa", "kernel_*.npz"))
def test_reference_matches_original_fixture(name):
    d = load_npz("swa_hsa", name)
    indices = jnp.asarray(d["indices"])
    S, sm_n = int(d["chunk_size"]), float(d["sm_n"])

    def op(q, k, v, w):
        return hsa_attention(q, k, v, w, indices, chunk_size=S, sm_n=sm_n, impl="xla")

    o, vjp = jax.vjp(op, *(jnp.asarray(d[x]) for x in ("q", "k", "v", "weights")))
    grads = vjp(jnp.asarray(d["do"]))
    for got, key in zip((o, *grads), ("o", "dq", "dk", "dv", "dw")):
        assert rel_err(got, d[key]) < 1e-5, key


def _dense_reference(q, k, v, w, idx, S, sm_n, scale):
    """Independent float64 numpy loop over (n, l, h, slot)."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    N, L, HQ, D = q.shape
    H = k.shape[2]
    G, Q = HQ // H, L // w.shape[1]
    out = np.zeros_like(q)
    for n in range(N):
        for t in range(L):
            for h in range(HQ):
                e, b = h // G, t // Q
                for s in range(w.shape[-1]):
                    c = idx[n, b, e, s]
                    x = scale * k[n, c * S:(c + 1) * S, e] @ q[n, t, h]
                    m = max(x.max(), 0.0) if sm_n else x.max()
                    p = np.exp(x - m) / (np.exp(x - m).sum() + sm_n * np.exp(-m))
                    out[n, t, h] += w[n, b, e, s] * (p @ v[n, c * S:(c + 1) * S, e])
    return out


@pytest.mark.parametrize("G,Q,sm_n", [(1, 1, 0.0), (4, 1, 1.0), (2, 4, 0.0)])
def test_reference_matches_float64_loop(G, Q, sm_n):
    rng = current_rng()
    N, L, H, D, S, K = 2, 32, 2, 8, 8, 3
    q = rng.standard_normal((N, L, H * G, D), np.float32)
    k, v = rng.standard_normal((2, N, L, H, D), np.float32)
    w = rng.random((N, L // Q, H, K), np.float32)
    idx = rng.integers(0, L // S, (N, L // Q, H, K)).astype(np.int32)
    got = hsa_attention_reference(q, k, v, w, idx, chunk_size=S, sm_n=sm_n, scale=0.3)
    np.testing.assert_allclose(got, _dense_reference(q, k, v, w, idx, S, sm_n, 0.3), rtol=1e-4, atol=1e-5)


def test_zero_weight_rows_give_zero_output_and_finite_grads():
    rng = current_rng()
    q = jnp.asarray(rng.standard_normal((1, 16, 4, 8), np.float32))
    k = jnp.asarray(rng.standard_normal((1, 16, 1, 8), np.float32))
    w = jnp.zeros((1, 16, 1, 2), jnp.float32)
    idx = jnp.zeros((1, 16, 1, 2), jnp.int32)
    f = lambda q, k, w: hsa_attention_reference(q, k, k, w, idx, chunk_size=8, sm_n=1.0).sum()
    assert float(jnp.abs(hsa_attention_reference(q, k, k, w, idx, chunk_size=8)).max()) == 0.0
    for g in jax.grad(f, argnums=(0, 1, 2))(q, k, w):
        assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("bad,match", [
    (dict(chunk_size=5), "multiple of chunk_size"),
    (dict(q=np.zeros((1, 16, 3, 8))), "multiple of kv heads"),
    (dict(w=np.zeros((1, 5, 2, 2))), "weights/indices"),
])
def test_bad_shapes_raise_clear_errors(bad, match):
    args = dict(q=np.zeros((1, 16, 4, 8)), k=np.zeros((1, 16, 2, 8)), w=np.zeros((1, 16, 2, 2)),
                chunk_size=8)
    args.update(bad)
    idx = np.zeros(args["w"].shape, np.int32)
    with pytest.raises(ValueError, match=match):
        hsa_attention_reference(args["q"], args["k"], args["k"], args["w"], idx, chunk_size=args["chunk_size"])
