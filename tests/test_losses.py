"""The chunked LM head + log-softmax (hsa_jax.common.losses.head_logprobs) against the whole-logits
computation (token_logprobs of h @ w): values and gradients, inside both model families too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsa_jax.common.losses import head_logprobs, token_logprobs
from hsa_jax.registry import family
from train.config import load_config


def whole(h_NxTxD, w_DxV, labels_NxT):
    logits = jnp.einsum("ntd,dv->ntv", h_NxTxD, w_DxV.astype(h_NxTxD.dtype), preferred_element_type=jnp.float32)
    return token_logprobs(logits, labels_NxT)


def test_token_logprobs_equals_log_softmax_gather(rng):
    """The fused form (label logit - logsumexp) against the textbook log-softmax + gather, with its
    gradient, ignored labels included."""
    N, T, V = 3, 11, 37
    logits = jnp.asarray(rng.normal(size=(N, T, V)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (N, T)), jnp.int32).at[1, 4].set(-100)
    g = jnp.asarray(rng.normal(size=(N, T)), jnp.float32)

    def textbook(x):
        logp = jax.nn.log_softmax(x, axis=-1)
        lp = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(labels >= 0, lp, 0.0)
    lp, valid = token_logprobs(logits, labels)
    np.testing.assert_allclose(lp, textbook(logits), rtol=1e-6, atol=1e-6)
    assert not bool(valid[1, 4]) and float(lp[1, 4]) == 0.0
    d = jax.grad(lambda x: jnp.sum(token_logprobs(x, labels)[0] * g))(logits)
    np.testing.assert_allclose(d, jax.grad(lambda x: jnp.sum(textbook(x) * g))(logits), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(d[1, 4]).max()) == 0.0


@pytest.mark.parametrize("T,chunk", [(37, 8), (32, 8), (5, 64)])
def test_head_logprobs_values_and_gradients_equal_whole_logits(rng, T, chunk):
    N, D, V = 2, 16, 53
    h = jnp.asarray(rng.normal(size=(N, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (N, T)), jnp.int32).at[0, 1].set(-100).at[1, T - 1].set(-100)
    g = jnp.asarray(rng.normal(size=(N, T)), jnp.float32)  # a random cotangent: every position matters

    lp, valid = jax.jit(lambda h, w: head_logprobs(h, w, labels, chunk=chunk))(h, w)
    lp_ref, valid_ref = whole(h, w, labels)
    np.testing.assert_array_equal(valid, valid_ref)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-5)
    assert float(lp[0, 1]) == 0.0 and float(lp[1, T - 1]) == 0.0

    loss = lambda f: (lambda h, w: jnp.sum(f(h, w)[0] * g))
    dh, dw = jax.jit(jax.grad(loss(lambda h, w: head_logprobs(h, w, labels, chunk=chunk)), (0, 1)))(h, w)
    dh_ref, dw_ref = jax.grad(loss(lambda h, w: whole(h, w, labels)), (0, 1))(h, w)
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(dh[0, 1]).max()) == 0.0  # an ignored label sends no gradient


def test_head_logprobs_bf16_activations_keep_fp32_weight_gradient(rng):
    """bf16 activations (training): logits and the weight gradient are accumulated in fp32."""
    N, T, D, V = 2, 64, 32, 301
    h = jnp.asarray(rng.normal(size=(N, T, D)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (N, T)), jnp.int32)
    f = lambda w, fn: jnp.sum(fn(h, w, labels)[0])
    lp = head_logprobs(h, w, labels, chunk=16)[0]
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, whole(h, w, labels)[0], rtol=2e-3, atol=2e-3)
    dw = jax.grad(f)(w, lambda h, w, l: head_logprobs(h, w, l, chunk=16))
    dw_ref = jax.grad(f)(w, whole)
    assert dw.dtype == jnp.float32
    np.testing.assert_allclose(dw, dw_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("config,changes", [("configs/tiny.yaml", {}),
                                            ("configs/tiny.yaml", {"tie_word_embeddings": False}),
                                            ("configs/drt_tiny.yaml", {})])
@pytest.mark.parametrize("loss_chunk", [0, 24])
def test_model_labels_mode_equals_log_softmax_of_logits(rng, config, changes, loss_chunk):
    """model(ids, labels=) (what hsa-train's loss calls) equals token_logprobs(model(ids), labels), and so
    do the parameter gradients of its sum (tied and untied heads, both families, whole and chunked)."""
    cfg = load_config(config, [f"model.{k}={str(v).lower()}" for k, v in changes.items()])
    fam = family(cfg.model_type)
    model = fam.model_cls(cfg.model, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    graphdef, params = nnx.split(model, nnx.Param)
    T = cfg.data.seq_len
    ids = jnp.asarray(rng.integers(0, 256, (2, T + 1)), jnp.int32)
    labels = ids[:, 1:].at[0, 3].set(-100)

    def fused(p):
        lp, _ = nnx.merge(graphdef, p)(ids[:, :-1], labels=labels, loss_chunk=loss_chunk)
        return jnp.sum(lp), lp

    def reference(p):
        lp, _ = token_logprobs(nnx.merge(graphdef, p)(ids[:, :-1]), labels)
        return jnp.sum(lp), lp

    (s, lp), grads = jax.value_and_grad(fused, has_aux=True)(params)
    (s_ref, lp_ref), grads_ref = jax.value_and_grad(reference, has_aux=True)(params)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        # fp32 sums in another order: judged against each gradient's scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()) + 1e-7)
