"""GPU benchmark of the HSA op: Pallas kernels vs the XLA reference vs cuDNN dense causal attention.

Run on a GPU machine from the repository root, e.g.
    PYTHONPATH=. python3 benchmarks/hsa_kernel.py --out /tmp/hsa_bench
It first checks the Pallas op against the reference on the GPU (fp32 and bf16, every kernel path) and
that its gradients are bit-identical across runs, then times each shape (bf16, causal random
indices) and prints a markdown table. Only jax and pallas_kernels are imported.

FLOPs: 4*Z*L*HQ*K*S*D per HSA forward (QK^T and PV over K chunks of S keys); dense causal attention
counts 4*Z*L*(L/2)*HQ*D. fwd+bwd counts 3.5x the forward (2 matmuls forward, 5 backward), the
FlashAttention convention, for every implementation alike.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import (fwd_and_grad_fns, markdown_table, parser, rel_err, run_checks, start, time_ms,
                               time_shapes, write_results)
from pallas_kernels import hsa
from pallas_kernels.hsa import KernelParams, hsa_attention, hsa_attention_pallas

# (Z, L, HQ, H, D, K, S): the shapes of issue #3.
DEFAULT_SHAPES = ["1,8192,16,1,64,8,64", "4,8192,16,1,64,8,64", "1,32768,16,1,64,8,64",
                  "1,8192,32,2,128,8,64", "1,131072,16,1,64,8,64"]
# Small cases that exercise every kernel path on the GPU: padded tiles (G*Q < 16), several tiles per
# row, masked head_dim, sm_n, batch, Lq != multiple of the program's rows, fp32 (IEEE dots) and bf16.
# (Z, L, Lkv, HQ, H, D, K, S, Q, sm_n, dtype)
CHECK_CASES = [
    (1, 2048, 2048, 16, 1, 64, 8, 64, 1, 0.0, "float32"),
    (2, 1024, 1024, 8, 2, 128, 4, 32, 1, 1.0, "float32"),
    (1, 1000, 1024, 1, 1, 48, 3, 64, 1, 0.0, "float32"),
    (1, 512, 512, 32, 2, 32, 32, 16, 8, 1.0, "float32"),
    (1, 2048, 2048, 16, 1, 64, 8, 64, 1, 0.0, "bfloat16"),
    (2, 1024, 2048, 4, 1, 256, 8, 128, 2, 1.0, "bfloat16"),
]
# KernelParams overrides timed by --sweep (each row times the index, fwd, dq and dk/dv pieces).
SWEEP = [dict(), dict(fwd_warps=1), dict(fwd_warps=4), dict(fwd_stages=3), dict(dq_warps=2),
         dict(dkv_rows=64), dict(dkv_warps=8), dict(dkv_splits=8), dict(dkv_splits=64)]


def causal_indices(key, Z, L, Lkv, H, K, S, correlated=False):
    """Retrieval as the model makes it: token t sees the chunks fully before its own chunk, picks K of
    them (random scores, or with `correlated` one score vector per 64-token span plus small per-token
    noise, so neighbours share most chunks), sorted most-recent first; missing slots get index 0 and
    weight 0. Returns weights (Z, L, H, K) fp32 and indices (Z, L, H, K) int32."""
    C = Lkv // S
    k_score, k_noise, k_w = jax.random.split(key, 3)
    if correlated:
        span = jax.random.uniform(k_score, (Z, pl_cdiv(L, 64), H, C))
        score_ZxLxHxC = jnp.repeat(span, 64, axis=1)[:, :L] + 0.05 * jax.random.uniform(k_noise, (Z, L, H, C))
    else:
        score_ZxLxHxC = jax.random.uniform(k_score, (Z, L, H, C))
    visible = jnp.arange(C)[None, None, None, :] < (jnp.arange(L) // S)[None, :, None, None]
    top, idx = jax.lax.top_k(jnp.where(visible, score_ZxLxHxC, -jnp.inf), K)
    idx = jnp.where(top > -jnp.inf, idx, -1)
    idx = -jnp.sort(-idx, axis=-1)  # most recent chunk first, invalid (-1) last
    w = jnp.where(idx >= 0, jax.random.uniform(k_w, idx.shape, minval=0.05), 0.0)
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    return w.astype(jnp.float32), jnp.maximum(idx, 0).astype(jnp.int32)


def pl_cdiv(a, b):
    return -(-a // b)


def make_inputs(key, Z, L, Lkv, HQ, H, D, K, S, dtype, correlated=False):
    kq, kk, kv, kd, ki = jax.random.split(key, 5)
    q = jax.random.normal(kq, (Z, L, HQ, D), dtype)
    k = jax.random.normal(kk, (Z, Lkv, H, D), dtype)
    v = jax.random.normal(kv, (Z, Lkv, H, D), dtype)
    do = jax.random.normal(kd, (Z, L, HQ, D), dtype)
    w, idx = causal_indices(ki, Z, L, Lkv, H, K, S, correlated)
    return q, k, v, w, idx, do


def check_case(case, key, params):
    """(ok, {o, dq, dk, dv, dw: relative error}) of the Pallas op against the reference."""
    Z, L, Lkv, HQ, H, D, K, S, Q, sm_n, dtype = case
    q, k, v, w, idx, do = make_inputs(key, Z, L, Lkv, HQ, H, D, K, S, jnp.dtype(dtype))
    w, idx = w[:, ::Q], idx[:, ::Q]  # block-level retrieval: Q queries share a row
    tol = 1e-5 if dtype == "float32" else 1e-2
    errs = {}
    with jax.default_matmul_precision("highest"):  # fp32 reference without TF32
        outs = {}
        for name, op in (("pallas", functools.partial(hsa_attention_pallas, params=params)),
                         ("xla", functools.partial(hsa_attention, impl="xla"))):
            _, fb = fwd_and_grad_fns(functools.partial(op, chunk_size=S, sm_n=sm_n))
            o, grads = fb(q, k, v, w, idx, do)
            outs[name] = (o, *grads)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), outs["pallas"], outs["xla"]):
        errs[name] = float(rel_err(a, b))
    ok = all(e <= tol for e in errs.values())  # NaN compares False
    return ok, errs


def check_deterministic(shape, key, params):
    Z, L, HQ, H, D, K, S = shape
    q, k, v, w, idx, do = make_inputs(key, Z, L, L, HQ, H, D, K, S, jnp.bfloat16)
    _, fb = fwd_and_grad_fns(functools.partial(hsa_attention_pallas, chunk_size=S, params=params))
    first = jax.tree.leaves(fb(q, k, v, w, idx, do))
    for _ in range(3):
        again = jax.tree.leaves(fb(q, k, v, w, idx, do))
        if not all(bool(jnp.array_equal(a, b)) for a, b in zip(first, again)):
            return False
    return True


def bench_shape(shape, key, impls, params, correlated=False):
    """Median fwd and fwd+bwd ms of each impl on bf16 inputs; a row dict."""
    Z, L, HQ, H, D, K, S = shape
    q, k, v, w, idx, do = make_inputs(key, Z, L, L, HQ, H, D, K, S, jnp.bfloat16, correlated)
    row = {"shape": shape}
    for impl in impls:
        if impl == "cudnn":
            op = lambda q, k, v, w, idx: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                      implementation="cudnn")
        elif impl == "pallas":
            op = functools.partial(hsa_attention_pallas, chunk_size=S, params=params)
        else:
            op = functools.partial(hsa_attention, chunk_size=S, impl="xla")
        fwd, fb = fwd_and_grad_fns(op)
        row[impl] = (time_ms(fwd, q, k, v, w, idx), time_ms(fb, q, k, v, w, idx, do))
    return row


def breakdown(shape, key, params):
    """ms of each piece of the Pallas op: forward kernel, dq kernel, dk/dv (reverse index + kernel +
    split sum), the reverse index alone, its uint32 sort alone, and (for docs/benchmarks.md's record
    of the replaced version) a jnp.bincount over the indices."""
    Z, L, HQ, H, D, K, S = shape
    q, k, v, w, idx, do = make_inputs(key, Z, L, L, HQ, H, D, K, S, jnp.bfloat16)
    dims = hsa.make_dims(q, k, w, chunk_size=S, params=params)
    fwd = jax.jit(lambda *a: hsa._forward(*a, dims))
    o, lse = fwd(q, k, v, w, idx)
    dq = jax.jit(lambda *a: hsa._dq(*a, dims))
    _, di = dq(q, k, v, w, idx, lse, do)
    key_P = jax.random.bits(key, (w.size,), jnp.uint32)
    return {"fwd": time_ms(fwd, q, k, v, w, idx),
            "dq": time_ms(dq, q, k, v, w, idx, lse, do),
            "dkdv": time_ms(jax.jit(lambda *a: hsa._dkv(*a, dims)), q, k, v, w, idx, lse, di, do),
            "rev_index": time_ms(jax.jit(lambda idx, w: hsa._reverse_index(idx, w, dims)), idx, w),
            "sort_only": time_ms(jax.jit(jax.lax.sort), key_P),
            "bincount_only": time_ms(jax.jit(lambda i: jnp.bincount(i.ravel(), length=dims.C + 1)), idx)}


def flops_fwd(shape):
    Z, L, HQ, H, D, K, S = shape
    return 4 * Z * L * HQ * K * S * D


def flops_dense_fwd(shape):
    Z, L, HQ, H, D, K, S = shape
    return 4 * Z * L * (L / 2) * HQ * D


def flops(shape, impl):
    return flops_dense_fwd(shape) if impl == "cudnn" else flops_fwd(shape)


def growth(rows, impls):
    """fwd+bwd time ratios 8K -> 32K -> 128K for the (1, L, 16, 1, 64, 8, 64) shapes."""
    by_len = {r["shape"][1]: r for r in rows if r["shape"][0] == 1 and r["shape"][2:] == (16, 1, 64, 8, 64)}
    out = []
    if all(L in by_len for L in (8192, 32768, 131072)):
        for i in impls:
            t = [by_len[L][i][1] for L in (8192, 32768, 131072)]
            out.append(f"{i}: fwd+bwd {t[0]:.3f} -> {t[1]:.3f} -> {t[2]:.3f} ms, "
                       f"x{t[1] / t[0]:.2f} (8K->32K, 4x length), x{t[2] / t[1]:.2f} (32K->128K, 4x length)")
    return out


def main():
    ap = parser(__doc__, DEFAULT_SHAPES, "Z,L,HQ,H,D,K,S", "pallas,xla,cudnn",
                "pallas, xla (reference), cudnn (dense causal)",
                "JSON dict of KernelParams overrides for the Pallas op, e.g. '{\"fwd_warps\": 2}'")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the KernelParams variants in SWEEP (fwd, dq, dk/dv pieces) "
                         "on the first shape and on --sweep-shape")
    ap.add_argument("--sweep-shape", default="",
                    help="optional second shape 'Z,L,HQ,H,D,K,S' for --sweep (default: the first shape only)")
    ap.add_argument("--breakdown", action="store_true",
                    help="time the pieces of the Pallas op (fwd, dq, dk/dv, reverse index, its sort) per shape")
    ap.add_argument("--correlated", action="store_true",
                    help="also time the Pallas op with correlated indices (neighbouring tokens share chunks)")
    args = ap.parse_args()

    shapes, impls, params, key, results = start(args, KernelParams)

    if not args.no_check:
        checks, key = run_checks(CHECK_CASES, lambda case, sub: check_case(case, sub, params), key)
        key, sub = jax.random.split(key)
        det = check_deterministic(shapes[0], sub, params)
        print(f"bit-identical fwd+bwd over 4 runs at {shapes[0]}: {det}", flush=True)
        results.update(checks=checks, deterministic=det)
        if not det or not all(c["ok"] for c in checks):
            raise SystemExit("correctness check failed: not timing")

    if args.sweep:
        sweep = []
        extra = [tuple(int(x) for x in args.sweep_shape.split(","))] if args.sweep_shape else []
        for shape in [shapes[0], *extra]:
            for over in SWEEP:
                key, sub = jax.random.split(key)
                t = breakdown(shape, sub, dataclasses.replace(params, **over))
                sweep.append({"shape": shape, "override": over, **t})
                print(f"sweep {shape} {over}: " + " ".join(f"{k}={v:.4f}" for k, v in t.items()), flush=True)
        results["sweep"] = sweep

    def bench(shape, sub):
        row = bench_shape(shape, sub, impls, params)
        if args.breakdown:
            row["breakdown"] = breakdown(shape, sub, params)
        if args.correlated:
            row["pallas_correlated"] = bench_shape(shape, sub, ["pallas"], params, correlated=True)["pallas"]
        return row

    rows = time_shapes(shapes, bench, key)
    results["rows"] = rows
    lines = [markdown_table(rows, impls, "Z, L, HQ, H, D, K, S", flops), *growth(rows, impls)]
    if args.correlated:
        lines += [f"pallas, correlated indices, {r['shape']}: fwd {r['pallas_correlated'][0]:.3f} ms, "
                  f"fwd+bwd {r['pallas_correlated'][1]:.3f} ms" for r in rows]
    print("\n".join(lines))
    write_results(args.out, results, "\n".join(lines))


if __name__ == "__main__":
    main()
