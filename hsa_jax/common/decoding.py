"""The decoder interface every model family provides (hsa_jax.registry.make_decoder builds it):

    dec.prefill(ids (N, T), cache=None, *, logits="last", capacity=None, labels=None)
        -> (logits (N, V) | (N, T, V) | None, cache)     consumes ids after `cache` (a new one if None);
           with labels (N, T) (-1 = ignore): the per-token log-probabilities of the labels (N, T)
    dec.step(tokens (N,), cache) -> (logits (N, V) fp32, cache)
    dec.greedy(tokens (N,), cache, steps) -> (tokens (N, steps) int32, cache)
        feeds `tokens`, then each argmax in turn: out[:, i] is the argmax after the i-th token fed
        (`steps` calls of step + argmax; a cached decoder runs them as one device program)
    dec.init_cache(batch, capacity) -> cache

generate(), hsa-generate and hsa-eval use nothing else. This module holds what the decoders share.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LOGITS_MODES = ("all", "last", "none")
DEFAULT_SEGMENT = 4096


class CacheCapacityError(ValueError):
    """The cache cannot hold the tokens asked for (capacity, or a batch size mismatch)."""


def check_token_ids(ids, vocab_size: int, what: str = "token ids", padding_ok: bool = False) -> None:
    """ValueError naming the first id outside [0, vocab_size) and where it is: an id past the embedding
    table would read garbage (NaN logits everywhere on GPU), and a negative one would be taken as
    padding, silently (padding_ok: negative ids are padding, as in the models' training forward).
    Concrete arrays only: ids inside jit cannot be checked without a device-to-host sync."""
    ids = np.asarray(ids)
    bad = np.flatnonzero((ids >= vocab_size) if padding_ok else ((ids < 0) | (ids >= vocab_size)))
    if len(bad):
        where = np.unravel_index(bad[0], ids.shape)
        raise ValueError(f"{what}: id {int(ids[where])} at position {tuple(int(i) for i in where)} is outside the "
                         f"model's vocabulary [0, {vocab_size}) ({len(bad)} such ids)")


def check_prefill_args(ids, logits: str, vocab_size: int) -> np.ndarray:
    """Validates prefill's arguments; -> ids as an (N, T) array."""
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits={logits!r} must be one of {LOGITS_MODES}")
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"prefill: ids must be (N, T) with T >= 1, got shape {ids.shape}")
    check_token_ids(ids, vocab_size, "prefill ids")
    return ids


def greedy_by_steps(dec, tokens, cache, steps: int):
    """dec.greedy as `steps` calls of dec.step (for decoders without a fused program)."""
    tok, out = jnp.asarray(tokens, jnp.int32).reshape(-1), []
    for _ in range(steps):
        logits, cache = dec.step(tok, cache)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(tok)
    return jnp.stack(out, axis=1), cache
