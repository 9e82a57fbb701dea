"""GPU benchmark of the GCA op (DRT grouped cross attention): Pallas kernels vs the XLA reference.

Run on a GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/gca_kernel.py [--out /tmp/gca_bench]
It first checks the Pallas op (forward and all of dq, dk, dv, dw) against the reference on the GPU, in
fp32 and bf16, for P = 64 and 65 query rows, K not dividing 128, GQA and decode-sized queries; then
times each shape on bf16 inputs and prints a markdown table. Only jax and pallas_kernels are imported
(no grain, no training code).

Shapes are (B, HQ, H, Lq, K, Lk, D) with B = N * (C - 1) retrieval rows: the defaults are the original
DRT recipe (N = 1 or 4 sequences of C = 260 chunks, 12 heads of 64, top-8 chunks of 64 keys) at P = 64
and P = 65, plus a GQA and a head-dim-128 variant. FLOPs: 4*B*HQ*Lq*K*Lk*D per forward; fwd+bwd counts
3.5x the forward (the FlashAttention convention, as benchmarks/hsa_kernel.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks.common import (fwd_and_grad_fns, markdown_table, parser, rel_err, run_checks, start, time_ms,
                               time_shapes, write_results)
from pallas_kernels.gca import GCAParams, gca_attention, gca_attention_pallas

DEFAULT_SHAPES = ["259,12,12,64,8,64,64", "1036,12,12,64,8,64,64", "1036,12,12,65,8,64,64",
                  "1036,16,2,64,8,64,64", "1036,12,12,64,8,64,128"]
# (B, HQ, H, Lq, K, Lk, D, dtype): P = 64 / 65, K = 3 and 5 (no divisor of 128), GQA, decode Lq = 1 / 2,
# a padded key block (Lk = 48) and head dim (D = 40).
CHECK_CASES = [
    (64, 12, 12, 64, 8, 64, 64, "float32"),
    (64, 12, 12, 65, 8, 64, 64, "float32"),
    (32, 4, 4, 65, 1, 64, 64, "float32"),
    (32, 8, 2, 64, 3, 64, 64, "float32"),
    (16, 4, 1, 40, 5, 48, 40, "float32"),
    (64, 12, 12, 1, 8, 64, 64, "float32"),
    (64, 12, 12, 64, 8, 64, 64, "bfloat16"),
    (64, 12, 12, 65, 3, 64, 128, "bfloat16"),
    (64, 12, 12, 2, 8, 64, 64, "bfloat16"),
]


def make_inputs(key, B, HQ, H, Lq, K, Lk, D, dtype):
    kq, kk, kv, kd, kw = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, HQ, Lq, D), dtype)
    k = jax.random.normal(kk, (B, H, K, Lk, D), dtype)
    v = jax.random.normal(kv, (B, H, K, Lk, D), dtype)
    do = jax.random.normal(kd, (B, HQ, Lq, D), dtype)
    w = jax.nn.softmax(jax.random.normal(kw, (B, K), jnp.float32), axis=-1)
    return q, k, v, w, do


def check_case(case, key, params, interpret=False):
    """(ok, {o, dq, dk, dv, dw: relative error}) of the Pallas op against the reference."""
    *shape, dtype = case
    q, k, v, w, do = make_inputs(key, *shape, jnp.dtype(dtype))
    tol = 1e-5 if dtype == "float32" else 1e-2
    outs = {}
    with jax.default_matmul_precision("highest"):  # fp32 reference without TF32
        for name, op in (("pallas", functools.partial(gca_attention_pallas, params=params, interpret=interpret)),
                         ("xla", functools.partial(gca_attention, impl="xla"))):
            o, grads = fwd_and_grad_fns(op)[1](q, k, v, w, do)
            outs[name] = (o, *grads)
    errs = {n: float(rel_err(a, b)) for n, a, b in zip(("o", "dq", "dk", "dv", "dw"), outs["pallas"], outs["xla"])}
    return all(e <= tol for e in errs.values()), errs  # NaN compares False


def bench_shape(shape, key, impls, params, interpret=False):
    q, k, v, w, do = make_inputs(key, *shape, jnp.bfloat16)
    row = {"shape": shape}
    for impl in impls:
        op = (functools.partial(gca_attention_pallas, params=params, interpret=interpret) if impl == "pallas"
              else functools.partial(gca_attention, impl="xla"))
        fwd, fb = fwd_and_grad_fns(op)
        row[impl] = (time_ms(fwd, q, k, v, w), time_ms(fb, q, k, v, w, do))
    return row


def flops_fwd(shape, impl=None):
    B, HQ, H, Lq, K, Lk, D = shape
    return 4 * B * HQ * Lq * K * Lk * D


def main():
    ap = parser(__doc__, DEFAULT_SHAPES, "B,HQ,H,Lq,K,Lk,D", "pallas,xla", "pallas, xla (reference)",
                "JSON dict of GCAParams overrides for the Pallas op, e.g. '{\"block_q\": 32}'")
    ap.add_argument("--interpret", action="store_true",
                    help="run the Pallas kernels in interpret mode (a CPU smoke test of this script; times mean nothing)")
    args = ap.parse_args()

    shapes, impls, params, key, results = start(args, GCAParams)

    if not args.no_check:
        # Interpret mode runs each program in Python-level loops on the CPU: one batch row per case.
        cases = [(1, *c[1:]) for c in CHECK_CASES] if args.interpret else CHECK_CASES
        checks, key = run_checks(cases, lambda case, sub: check_case(case, sub, params, args.interpret), key)
        results["checks"] = checks
        if not all(c["ok"] for c in checks):
            raise SystemExit("correctness check failed: not timing")

    rows = time_shapes(shapes, lambda shape, sub: bench_shape(shape, sub, impls, params, args.interpret), key)
    results["rows"] = rows
    table = markdown_table(rows, impls, "B, HQ, H, Lq, K, Lk, D", flops_fwd)
    print(table)
    write_results(args.out, results, table)


if __name__ == "__main__":
    main()
