"""What the attention-op benchmarks (hsa_kernel.py, gca_kernel.py) share: the timer, the error
measure, jit'd forward / forward+backward of an op, the common flags and their parsing, the GPU check
loop, the timing loop over shapes, the markdown table and the result files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp


def time_ms(fn, *args, target_s=0.3, trials=7, sync=jax.block_until_ready):
    """Median per-call time: each trial enqueues enough back-to-back calls to fill target_s/trials
    (so host sync and dispatch gaps amortise), then waits for the device (`sync(output)`: jax by
    default; benchmarks/peers.py passes torch's, so both frameworks get the same timer)."""
    sync(fn(*args))  # compile + warm-up
    t0 = time.perf_counter()
    sync(fn(*args))
    calls = max(1, int(target_s / trials / max(time.perf_counter() - t0, 1e-6)))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        sync(out)
        samples.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(samples)


@jax.jit
def rel_err(a, b):
    """max |a - b| / max |b| in fp32 on the device (NaN anywhere gives NaN)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)


def fwd_and_grad_fns(op, n_diff: int = 4):
    """jit'd op(*args) and fwd_bwd(*args, do) -> (o, gradients of the first n_diff args); the other
    args (integer indices) are held fixed."""
    @jax.jit
    def fwd_bwd(*args_and_do):
        *args, do = args_and_do
        o, vjp = jax.vjp(lambda *d: op(*d, *args[n_diff:]), *args[:n_diff])
        return o, vjp(do)
    return jax.jit(op), fwd_bwd


def parser(doc: str, default_shapes: list[str], shape_fields: str, impls: str, impls_help: str,
           params_help: str) -> argparse.ArgumentParser:
    """The flags every op benchmark has; a script adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=default_shapes,
                    help=f"shapes to time, each '{shape_fields}' (default: {' '.join(default_shapes)})")
    ap.add_argument("--impls", default=impls, help=f"comma list of implementations to time: {impls_help}")
    ap.add_argument("--params", default="{}", help=params_help)
    ap.add_argument("--no-check", action="store_true", help="skip the GPU correctness checks before timing")
    ap.add_argument("--out", default=None, help="directory for results.json and table.md")
    return ap


def start(args, params_cls):
    """The common flags parsed: -> shapes (tuples), impls, params (params_cls from --params JSON), a fresh
    key (new inputs every run) and the results dict, after printing the device line."""
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    impls = args.impls.split(",")
    params = params_cls(**json.loads(args.params))
    key = jax.random.key(int(time.time()))
    dev = jax.devices()[0]
    print(f"# device: {dev.device_kind}; jax {jax.__version__}; params {params}", flush=True)
    return shapes, impls, params, key, {"device": dev.device_kind, "params": dataclasses.asdict(params)}


def time_shapes(shapes, bench, key):
    """bench(shape, key) -> row {"shape", impl: (fwd ms, fwd+bwd ms), ...} for each shape, printed; -> rows."""
    rows = []
    for shape in shapes:
        key, sub = jax.random.split(key)
        row = bench(shape, sub)
        rows.append(row)
        print(f"timed {shape}: " + " ".join(f"{k}={v}" for k, v in row.items() if k != "shape"), flush=True)
    return rows


def run_checks(cases, check, key):
    """check(case, key) -> (ok, {output: relative error}) for each case, printed; -> (records, key)."""
    records = []
    for case in cases:
        key, sub = jax.random.split(key)
        ok, errs = check(case, sub)
        records.append({"case": case, "ok": ok, "rel_err": errs})
        print(f"check {case}: {'OK' if ok else 'FAIL'} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()),
              flush=True)
    return records, key


def markdown_table(rows, impls, shape_label: str, flops_fwd) -> str:
    """rows: {"shape", impl: (fwd ms, fwd+bwd ms)}; flops_fwd(shape, impl). fwd+bwd counts 3.5x the
    forward's FLOPs (the FlashAttention convention)."""
    head = f"| shape ({shape_label}) | " + " | ".join(
        f"{i} fwd ms | {i} fwd+bwd ms | {i} fwd TFLOP/s | {i} fwd+bwd TFLOP/s" for i in impls) + " |"
    lines = [head, "|" + "---|" * (1 + 4 * len(impls))]
    for r in rows:
        cells = []
        for i in impls:
            f, fb = r[i]
            fl = flops_fwd(r["shape"], i)
            cells += [f"{f:.3f}", f"{fb:.3f}", f"{fl / f / 1e9:.1f}", f"{3.5 * fl / fb / 1e9:.1f}"]
        lines.append(f"| {', '.join(map(str, r['shape']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: str | None, results: dict, text: str):
    """OUT/results.json (everything measured) and OUT/table.md (what was printed)."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
