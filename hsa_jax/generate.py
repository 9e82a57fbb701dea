"""Text generation over any family's decoder (the interface of hsa_jax/common/decoding.py): greedy or
temperature/top-k sampling, per-row stop tokens. The `hsa-generate` CLI is hsa_jax/cli/generate.py."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # (N, n) generated ids; rows that stopped early are padded with `pad_id` after the stop token
    lengths: np.ndarray  # (N,) generated tokens per row, the stop token included
    prefill_s: float
    decode_s: float


GREEDY_BLOCK = 64  # most greedy tokens per device program (a stop token is seen at most this late)


@jax.jit
def _sample(logits_NxV, key, temperature, top_k):
    """Temperature / top-k sampling (top_k <= 0: whole vocabulary)."""
    V = logits_NxV.shape[-1]
    scaled = logits_NxV / jnp.maximum(temperature, 1e-6)
    kth = jnp.sort(scaled, axis=-1)[:, V - jnp.clip(top_k, 1, V)][:, None]
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1)


def generate(decoder, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             stop_tokens=(), seed: int = 0, pad_id: int = 0, cache=None) -> Generation:
    """Greedy (temperature 0) or sampled continuation of prompt_ids (N, T) (equal-length rows).

    A row stops after emitting any of `stop_tokens`; generation ends when every row has stopped or after
    max_new_tokens. The cache is sized for T + max_new_tokens unless one is given."""
    prompt = np.asarray(prompt_ids)
    if prompt.ndim == 1:
        prompt = prompt[None]
    N, T = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    key = jax.random.key(seed)
    stop = np.asarray(sorted(set(int(t) for t in stop_tokens)), np.int64)
    t0 = time.perf_counter()
    logits, cache = decoder.prefill(prompt, cache, logits="last",
                                    capacity=None if cache is not None else T + max_new_tokens)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out = np.full((N, max_new_tokens), pad_id, np.int64)
    done = np.zeros(N, bool)
    lengths = np.zeros(N, np.int64)

    def emit(i, tok):  # column i of the output; -> whether every row has stopped
        tok = np.where(done, pad_id, tok)
        out[:, i] = tok
        lengths[:] += ~done
        done[:] |= np.isin(tok, stop)
        return done.all()

    if temperature > 0:
        for i in range(max_new_tokens):
            key, sub = jax.random.split(key)
            tok = np.asarray(_sample(logits, sub, jnp.float32(temperature), jnp.int32(top_k)))
            if emit(i, tok) or i == max_new_tokens - 1:
                break
            logits, cache = decoder.step(tok, cache)
    else:  # greedy: blocks of up to GREEDY_BLOCK tokens in one device program each (powers of two: few compiles)
        tok = np.asarray(jnp.argmax(logits, axis=-1))
        i, stopped = 0, emit(0, tok)
        while not stopped and i + 1 < max_new_tokens:
            k = 1 << (min(GREEDY_BLOCK, max_new_tokens - 1 - i).bit_length() - 1)
            block, cache = decoder.greedy(tok, cache, k)  # block[:, j] is output column i + 1 + j
            block = np.asarray(block)
            for j in range(k):
                i += 1
                if stopped := emit(i, block[:, j]):
                    break
            tok = block[:, -1]
    t2 = time.perf_counter()
    n = int(lengths.max())
    return Generation(out[:, :n], lengths, t1 - t0, t2 - t1)
