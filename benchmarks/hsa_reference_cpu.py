"""CPU time and peak memory of the pure-jnp HSA reference op (the oracle must scale to long inputs
without materialising Lq x Lkv). Each measurement runs in a fresh process so its peak RSS is its own.

    .venv/bin/python benchmarks/hsa_reference_cpu.py --lengths 4096 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(L, HQ, H, D, K, S, backward):
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.reference import hsa_attention_reference

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, L, HQ, D), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((1, L, H, D), np.float32)) for _ in range(2))
    n_t = np.arange(L) // S  # causally visible chunks per token
    idx = (n_t[:, None] - 1 - np.arange(K)[None]).clip(min=0)
    w = np.where(np.arange(K)[None] < n_t[:, None], 1.0 / K, 0.0)
    idx = jnp.asarray(np.broadcast_to(idx[None, :, None], (1, L, H, K)).astype(np.int32))
    w = jnp.asarray(np.broadcast_to(w[None, :, None], (1, L, H, K)).astype(np.float32))
    op = lambda q, k, v, w: hsa_attention_reference(q, k, v, w, idx, chunk_size=S)
    if backward:
        fn = jax.jit(jax.grad(lambda *a: op(*a).sum(), argnums=(0, 1, 2, 3)))
    else:
        fn = jax.jit(op)
    jax.block_until_ready(fn(q, k, v, w))  # compile + first run
    t0 = time.perf_counter()
    jax.block_until_ready(fn(q, k, v, w))
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"seconds": seconds, "peak_rss_gb": peak_gb}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384], help="sequence lengths L")
    p.add_argument("--heads", type=int, default=16, help="query heads HQ")
    p.add_argument("--kv-heads", type=int, default=1, help="kv heads H")
    p.add_argument("--head-dim", type=int, default=64, help="head dim D")
    p.add_argument("--topk", type=int, default=8, help="retrieved chunks K")
    p.add_argument("--chunk", type=int, default=64, help="chunk size S")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(**json.loads(a.child))))
        return
    print("| L | HQ | H | D | K | S | pass | time (s) | peak RSS (GB) |\n|---|---|---|---|---|---|---|---|---|")
    for L in a.lengths:
        for backward in (False, True):
            spec = dict(L=L, HQ=a.heads, H=a.kv_heads, D=a.head_dim, K=a.topk, S=a.chunk, backward=backward)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": "."})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {L} | {a.heads} | {a.kv_heads} | {a.head_dim} | {a.topk} | {a.chunk} | "
                  f"{'fwd+bwd' if backward else 'fwd'} | {r['seconds']:.2f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
