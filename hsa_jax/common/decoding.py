"""The decoder interface every model family provides (hsa_jax.registry.make_decoder builds it):

    dec.prefill(ids (N, T), cache=None, *, logits="last", capacity=None, labels=None)
        -> (logits (N, V) | (N, T, V) | None, cache)     consumes ids after `cache` (a new one if None);
           with labels (N, T) (-1 = ignore): the per-token log-probabilities of the labels (N, T)
    dec.step(tokens (N,), cache) -> (logits (N, V) fp32, cache)
    dec.init_cache(batch, capacity) -> cache

generate(), hsa-generate and hsa-eval use nothing else. This module holds what the decoders share.
"""

from __future__ import annotations

import numpy as np

LOGITS_MODES = ("all", "last", "none")
DEFAULT_SEGMENT = 4096


class CacheCapacityError(ValueError):
    """The cache cannot hold the tokens asked for (capacity, or a batch size mismatch)."""


def check_prefill_args(ids, logits: str) -> np.ndarray:
    """Validates prefill's arguments; -> ids as an (N, T) array."""
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits={logits!r} must be one of {LOGITS_MODES}")
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"prefill: ids must be (N, T) with T >= 1, got shape {ids.shape}")
    return ids
