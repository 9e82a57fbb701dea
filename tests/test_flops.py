"""Each family's model-FLOPs count (the numerator of every MFU figure) against XLA's own cost analysis of
the compiled forward pass, on CPU with the layers unrolled (XLA counts a loop body once) and the XLA
attention paths. Model FLOPs count useful work: sliding-window attention over min(t+1, W+1) keys, where
the XLA path computes every key of its one L-key block (masked), so one more decoder layer must cost
what the count says plus 4 * heads * head_dim * (L - counted keys) per token, within 4% (softmax and
norms are elementwise work the count leaves out; a missing projection is >= 6%). The LM head must
agree exactly and the totals within 15% (the same masked-block difference, for every layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsa_jax.registry import family

L = 256  # one attention block: the XLA SWA path computes L keys per query, the count min(t+1, W+1)
CONFIGS = {
    "swa_hsa": dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                    num_key_value_heads=2, num_kv_heads=1, num_lower_layers=2, num_upper_layers=2,
                    num_upper_groups=1, chunk_size=32, chunk_topk=2, retrieval_dim=256, encoder_layers=1,
                    sliding_window=32, hsa_impl="xla"),
    "drt": dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                num_key_value_heads=2, decoder_layers=[2, 1, 1], encoder_layers=1, enc_chunk_size=63,
                chunk_topk=2, chunk_id=2000, pad_id=2001, slide_window=32, gca_impl="xla"),
}
ONE_MORE_LAYER = {"swa_hsa": dict(num_lower_layers=3), "drt": dict(decoder_layers=[3, 1, 1])}
SEQ = {"swa_hsa": L, "drt": 4 * 63}  # whole chunks; DRT's stream adds a landmark per chunk: 4 * 64 = L


def masked_keys_per_token(name) -> float:
    """Attention FLOPs per real token that XLA computes beyond the counted window keys, one layer."""
    c, t = CONFIGS[name], np.arange(L)
    window = c["sliding_window"] if name == "swa_hsa" else c["slide_window"]
    stream_per_token = 1.0 if name == "swa_hsa" else (c["enc_chunk_size"] + 1) / c["enc_chunk_size"]
    width = c["hidden_size"]  # heads x head_dim
    return 4 * width * (L - np.minimum(t + 1, window + 1).mean()) * stream_per_token


def per_token(name, **changes):
    """-> (XLA's forward FLOPs per token, the family's forward count = training count / 3)."""
    fam = family(name)
    cfg = fam.config_cls(**{**CONFIGS[name], **changes})
    graphdef, params = nnx.split(fam.model_cls(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.ones((1, SEQ[name]), jnp.int32)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids, scan_layers=False))
    cost = forward.lower(params, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / SEQ[name], fam.flops_per_token(cfg, SEQ[name]) / 3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_flops_agree_with_xla_cost_analysis(name):
    xla, counted = per_token(name)
    assert counted == pytest.approx(xla, rel=0.15), (xla, counted)
    xla_layer, counted_layer = per_token(name, **ONE_MORE_LAYER[name])
    # one more decoder layer: its matmuls (2 FLOPs per weight) plus attention
    assert counted_layer - counted + masked_keys_per_token(name) == pytest.approx(xla_layer - xla, rel=0.04)
    xla_vocab, counted_vocab = per_token(name, vocab_size=4096)
    assert counted_vocab - counted == pytest.approx(xla_vocab - xla, rel=1e-3)  # the LM head: 2 * D * V
