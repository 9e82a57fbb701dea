"""Chunk-selection top-k: XLA's TopK (`jax.lax.top_k`) against the exact two-stage
`hsa_jax.common.topk.top_k_indices` (block maxima, then top-k over the kept blocks), indices only, on
landmark-score shapes: rows = queries of a prefill segment (8192) or of a decode step (1-8), columns =
visible chunks (16K at 1M tokens with chunks of 64). Prints a markdown table; every row is checked for
equal indices first.

    PYTHONPATH=. python3 benchmarks/topk.py [--rows 1,8,8192] [--chunks 4096,16384] [--k 8,16]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_ms
from hsa_jax.common.topk import top_k_indices


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=ints, default=[1, 8, 8192], help="query rows (default 1,8,8192)")
    p.add_argument("--chunks", type=ints, default=[4096, 16384], help="chunks scored per row (default 4096,16384)")
    p.add_argument("--k", type=ints, default=[8, 16], help="chunks kept (default 8,16)")
    p.add_argument("--block", type=int, default=128, help="two-stage block size (default 128)")
    a = p.parse_args(argv)

    xla = jax.jit(lambda x, k: jax.lax.top_k(x, k)[1], static_argnums=1)
    two = jax.jit(lambda x, k: top_k_indices(x, k, a.block, min_rows=0), static_argnums=1)
    print(f"{jax.devices()[0].device_kind}, fp32 scores, causal -inf mask on the first rows, block {a.block}")
    print("| rows | chunks | k | lax.top_k (ms) | two-stage (ms) | speed-up | equal |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for R in a.rows:
        for C in a.chunks:
            x_RxC = rng.standard_normal((R, C), np.float32)
            x_RxC[: min(R, C), :][np.triu(np.ones((min(R, C), C), bool))] = -np.inf  # early queries see few chunks
            x_RxC = jnp.asarray(x_RxC)
            for k in a.k:
                equal = bool(jnp.all(xla(x_RxC, k) == two(x_RxC, k)))
                t_xla, t_two = time_ms(xla, x_RxC, k), time_ms(two, x_RxC, k)
                print(f"| {R} | {C} | {k} | {t_xla:.3f} | {t_two:.3f} | {t_xla / t_two:.1f}× | {equal} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
