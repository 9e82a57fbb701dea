"""DRT decoding with decode = forward: the decoder interface of hsa_jax/common/decoding.py over the batch
forward (docs/architecture.md, "Decoding and evaluation")."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from hsa_jax.common.decoding import CacheCapacityError, check_prefill_args, greedy_by_steps
from hsa_jax.common.losses import token_logprobs
from hsa_jax.models.drt.model import DRTForCausalLM


@dataclasses.dataclass(frozen=True)
class DRTCache:
    ids: np.ndarray  # (N, capacity rounded up to S) tokens consumed so far, right-padded with pad_id
    pos: int  # tokens consumed


class DRTDecoder:
    """The decoder interface (hsa_jax/common/decoding.py) with decode = forward: the cache is the token
    history, and each call reruns the batch forward over it, right-padded to the capacity rounded up to S (one
    compile per capacity). Exact because every logit depends only on earlier tokens (tests/test_drt.py checks
    it); costs a full forward per step. Chunk boundaries sit at multiples of S from the first prompt token:
    the original instead left-pads a prompt to a multiple of S, and its incremental path drops lmk_norms[g]
    from the retrieval query (docs/model_math.md "DRT decoding"); this follows the batch path."""

    def __init__(self, model: DRTForCausalLM, **options):
        """options: settings of cached decoders (segment_len, ...); a whole-history forward has none."""
        self.cfg = model.cfg
        graphdef, self._params = nnx.split(model)  # passed as arguments: not baked into the programs
        run = lambda p, ids: nnx.merge(graphdef, p)(ids)
        self._last = jax.jit(lambda p, ids, i: run(p, ids)[:, i])
        self._all = jax.jit(run)

        self._log_probs = jax.jit(lambda p, ids, labels: token_logprobs(run(p, ids), labels)[0])

    def init_cache(self, batch: int, capacity: int) -> DRTCache:
        S = self.cfg.enc_chunk_size
        return DRTCache(np.full((batch, -(-capacity // S) * S), self.cfg.pad_id, np.int32), 0)

    def prefill(self, ids, cache: DRTCache | None = None, *, logits: str = "last", capacity: int | None = None,
                labels=None):
        """Consumes ids (N, T) after `cache`. logits: "last" -> (N, V); "all" -> (N, T, V); "none" -> None.
        With labels (N, T) (-1 = ignore): the per-token log-probabilities of the labels (N, T) instead."""
        ids = check_prefill_args(ids, logits, self.cfg.vocab_size)
        N, T = ids.shape
        if cache is None:
            cache = self.init_cache(N, capacity if capacity is not None else T)
        if cache.ids.shape[0] != N or cache.pos + T > cache.ids.shape[1]:
            raise CacheCapacityError(
                f"prefill: {T} tokens for batch {N} do not fit a cache of batch {cache.ids.shape[0]} at position "
                f"{cache.pos} of {cache.ids.shape[1]}; pass a larger capacity")
        hist = cache.ids.copy()
        hist[:, cache.pos:cache.pos + T] = ids
        new = DRTCache(hist, cache.pos + T)
        span = slice(cache.pos, cache.pos + T)
        if labels is not None:
            full = np.full(hist.shape, -1, np.int32)
            full[:, span] = np.asarray(labels)
            return self._log_probs(self._params, hist, full)[:, span], new
        if logits == "none":
            return None, new
        if logits == "last":
            return self._last(self._params, hist, new.pos - 1), new
        return self._all(self._params, hist)[:, span], new  # "all" (check_prefill_args allows no other)

    def step(self, tokens, cache: DRTCache):
        """One token per row: tokens (N,) -> logits (N, V) fp32 and the updated cache."""
        return self.prefill(np.asarray(tokens).reshape(-1, 1), cache)

    def greedy(self, tokens, cache: DRTCache, steps: int):
        """`steps` greedy tokens after feeding `tokens` (N,): -> (tokens (N, steps), cache)."""
        return greedy_by_steps(self, tokens, cache, steps)
