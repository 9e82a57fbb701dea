"""Every registered model family works through hsa_jax.registry alone: a new family is one folder under
hsa_jax/models/ plus one registry entry, and this test covers it without naming it."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsa_jax.registry import FAMILIES, family, family_of, make_decoder


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_through_registry(name):
    fam = family(name)
    cfg = fam.config_cls.from_dict(fam.tiny)
    assert fam.config_cls.from_dict(cfg.to_dict()) == cfg
    model = fam.model_cls(cfg, rngs=nnx.Rngs(0))
    assert family_of(model) is fam
    S = cfg.chunk_size
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 2 * S)), jnp.int32)
    logits = np.asarray(model(ids))
    assert logits.shape == (1, 2 * S, cfg.vocab_size) and np.isfinite(logits).all()

    # decode = forward: prefill a prompt, then a few one-token steps
    P = S + 3
    dec = make_decoder(model, segment_len=16)
    out, cache = dec.prefill(ids[:, :P], logits="all", capacity=P + 3)
    np.testing.assert_allclose(np.asarray(out), logits[:, :P], atol=2e-4)
    for t in range(P, P + 3):
        step, cache = dec.step(ids[:, t], cache)
        np.testing.assert_allclose(np.asarray(step), logits[:, t], atol=2e-4)

    # greedy: feeds ids[P], then its own argmaxes; each equals the forward's argmax over what was fed
    _, cache = dec.prefill(ids[:, :P], capacity=P + 2)
    toks, cache = dec.greedy(ids[:, P], cache, 2)
    assert np.asarray(toks).shape == (1, 2) and cache.pos == P + 2
    fed = np.asarray(ids).copy()
    fed[:, P + 1] = np.asarray(toks)[:, 0]
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(model(jnp.asarray(fed)))[:, P:P + 2].argmax(-1))

    assert fam.flops_per_token(cfg, 2 * S) > 0
    assert set(fam.inference_fields) <= {f for f in cfg.to_dict()}

    # the parity hooks, against our own model's outputs under the original keys
    params = fam.to_original(model)
    ref = {"input_ids": np.asarray(ids), "logits": logits, **{f"param/{k}": v for k, v in params.items()}}
    assert fam.compare(cfg, ref, atol=1e-4).ok
    if fam.compare_decode is not None:
        decode = {"prompt_ids": np.asarray(ids[:, :P]), "prompt_logits": logits[:, :P],
                  "fed_tokens": np.asarray(ids[:, P:P + 3]), "step_logits": logits[:, P:P + 3]}
        assert fam.compare_decode(cfg, fam.from_original(cfg, params), decode, atol=2e-4, segment=16).ok
