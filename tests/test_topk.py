"""hsa_jax.common.topk.top_k_indices against jax.lax.top_k(x, k)[1]: exact equality, order and tie rule
included, on random rows, heavy ties, causally masked (-inf) rows, the fallback path, jit and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsa_jax.common.topk import top_k_indices

SEEDS = [0, 1, 2]


@jax.jit(static_argnums=(1, 2))
def both(x, k, block):
    return top_k_indices(x, k, block, min_rows=0), jax.lax.top_k(x, k)[1]  # min_rows=0: the two-stage path


def check(x, k, block=128):
    got, want = both(jnp.asarray(x), k, block)
    assert got.dtype == jnp.int32 and got.shape == x.shape[:-1] + (k,)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("k", [1, 8, 16])
@pytest.mark.parametrize("block", [128, 64])
@pytest.mark.parametrize("C", [1000, 777])
def test_random_rows(k, block, C):
    for seed in SEEDS:
        x = np.random.default_rng(seed).standard_normal((3, 5, 2, C)).astype(np.float32)
        check(x, k, block)


@pytest.mark.parametrize("k", [1, 8, 16])
@pytest.mark.parametrize("block", [128, 64])
def test_heavy_ties(k, block):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        check(rng.integers(0, 4, (4, 6, 1000)).astype(np.float32), k, block)
        check(rng.integers(0, 2, (4, 6, 777)).astype(np.float32), k, block)
        # Sparse large values: block maxima differ while the top-k still ties across blocks.
        check(rng.choice(4, (4, 6, 1000), p=[0.9, 0.07, 0.02, 0.01]).astype(np.float32), k, block)
    check(np.zeros((2, 1000), np.float32), k, block)  # all tied


@pytest.mark.parametrize("k", [1, 8, 16])
@pytest.mark.parametrize("block", [128, 64])
def test_causal_inf_rows(k, block):
    """Row t has only its first t entries finite: rows with zero, fewer than k and many finite entries."""
    C = 777
    causal_CxC = np.arange(C)[None, :] < np.arange(C)[:, None]
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        x = np.where(causal_CxC, rng.standard_normal((2, C, C)), -np.inf).astype(np.float32)
        check(x, k, block)
        ties = np.where(causal_CxC, rng.integers(0, 3, (2, C, C)), -np.inf).astype(np.float32)
        check(ties, k, block)


def test_fewer_blocks_than_k_and_dtypes():
    rng = np.random.default_rng(3)
    check(rng.standard_normal((4, 600)).astype(np.float32), 8, 128)  # G = 5 < k: every block kept
    check(rng.standard_normal((4, 1024)).astype(np.float32), 16, 128)  # C a multiple of block: no pad
    check(rng.standard_normal((4, 1000)).astype(jnp.bfloat16), 16, 64)  # bf16: many ties
    check(rng.integers(-5, 5, (4, 1000)).astype(np.int32), 16, 64)  # integer pad value


@pytest.mark.parametrize("C,k,block", [(512, 8, 128), (300, 16, 128), (1000, 16, 8)])
def test_fallback(C, k, block):
    """C <= 4*block or k > block: plain lax.top_k."""
    x = np.random.default_rng(4).standard_normal((3, 2, C)).astype(np.float32)
    check(x, k, block)


def test_few_rows_take_lax_top_k():
    """Below min_rows (decoding) the one TopK kernel is kept: the program holds no sort of block ids."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((8, 4096)).astype(np.float32))
    few = jax.jit(lambda x: top_k_indices(x, 8)).lower(x).as_text()
    many = jax.jit(lambda x: top_k_indices(x, 8, min_rows=8)).lower(x).as_text()
    assert "sort" not in few and "sort" in many
    np.testing.assert_array_equal(np.asarray(top_k_indices(x, 8)), np.asarray(jax.lax.top_k(x, 8)[1]))


def test_jit_and_grad():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 2000)).astype(np.float32)
    x[:, :2, 1500:] = -np.inf
    x = jnp.asarray(x)
    got = jax.jit(top_k_indices, static_argnums=(1, 2, 3))(x, 16, 128, 0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(x, 16)[1]))

    def loss(fn, x):
        idx = fn(jax.lax.stop_gradient(x))
        v = jnp.take_along_axis(jnp.where(jnp.isfinite(x), x, 0.0), idx, axis=-1)
        return jnp.sum(v * jnp.arange(1, 17))

    g_new = jax.jit(jax.grad(lambda x: loss(lambda y: top_k_indices(y, 16, min_rows=0), x)))(x)
    g_ref = jax.grad(lambda x: loss(lambda y: jax.lax.top_k(y, 16)[1], x))(x)
    np.testing.assert_array_equal(np.asarray(g_new), np.asarray(g_ref))
