"""Token ids are checked where they enter: the models' eager forward, every decoder's prefill (so
generate(), hsa-generate and hsa-eval), with a one-line error naming the id and its position. Negative
ids in the training forward are padding (documented); anywhere else they are errors too."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsa_jax.registry import FAMILIES, family, make_decoder


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request):
    fam = family(request.param)
    cfg = fam.config_cls.from_dict(fam.tiny)
    return cfg, fam.model_cls(cfg, rngs=nnx.Rngs(0))


def test_forward_rejects_ids_past_the_vocabulary(tiny):
    cfg, model = tiny
    ids = np.random.default_rng(1).integers(0, 50, (2, 2 * cfg.chunk_size))
    ids[1, 5] = cfg.vocab_size
    with pytest.raises(ValueError, match=rf"input ids: id {cfg.vocab_size} at position \(1, 5\) is outside "
                                         rf"the model's vocabulary \[0, {cfg.vocab_size}\)"):
        model(jnp.asarray(ids, jnp.int32))
    ids[1, 5] = -100  # padding, as the original pads: embedded as the pad token, no error
    pad = ids.copy()
    pad[1, 5] = getattr(cfg, "pad_token_id", getattr(cfg, "pad_id", 0))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), np.asarray(model(jnp.asarray(pad))), atol=1e-6)


def test_decoder_prefill_rejects_out_of_vocabulary_and_negative_ids(tiny):
    cfg, model = tiny
    dec = make_decoder(model, segment_len=16)
    for bad in (-1, cfg.vocab_size, cfg.vocab_size + 1000):
        ids = np.zeros((1, 10), np.int64)
        ids[0, 7] = bad
        with pytest.raises(ValueError, match=rf"prefill ids: id {bad} at position \(0, 7\)"):
            dec.prefill(ids, capacity=16)
