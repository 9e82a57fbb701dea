"""Per-token log-probabilities of labels: the one computation behind the trainer's loss, perplexity in
hsa-eval, the decoders' `labels=` mode and the DRT parity loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_NxTxV, labels_NxT):
    """log p(label) per token in fp32, 0 where label < 0 (ignored), and the valid mask (label >= 0)."""
    valid = labels_NxT >= 0
    logp = jax.nn.log_softmax(logits_NxTxV.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, jnp.where(valid, labels_NxT, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lp, 0.0), valid
