"""Where one training step's time goes, by part of the model: hsa-train's own jitted step (same config,
sharding, remat and scan settings) on random tokens, traced with jax.profiler, each device kernel
attributed through its HLO instruction's op name to the named scope it was traced under
(`hsa_jax.common.layers.scoped`: dense, mlp, attn_core, chunking, retrieval, hsa_core, gca_core,
lm_head (the LM head and the log-softmax); train/step.py: optimizer), backward-pass kernels included.

    PYTHONPATH=. python3 benchmarks/train_step.py --config configs/swa_hsa_125m.yaml           # one GPU
    PYTHONPATH=. python3 benchmarks/train_step.py --config configs/swa_hsa_370m_pile.yaml seq_len=8192 \\
        global_batch_size=8 optim.grad_accum=1
    PYTHONPATH=. python3 benchmarks/train_step.py global_batch_size=2 --steps 2    # tiny config, CPU

Prints the step time (median of the timed steps, outside the trace), then per category the kernel
time per step and its share of the device's busy time, and the idle gap (span - busy: launch, host
and data waits). On CPU the "kernels" are XLA's thunks on host threads (and their times overlap).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from trace_summary import COLLECTIVE, find_trace, length, union

# (scope, label), most specific first: an op under several scopes (the encoder's MLP) takes the first.
CATEGORIES = [
    ("hsa_core", "HSA attention (kernels)"),
    ("gca_core", "GCA attention (kernels)"),
    ("chunking", "chunk encoder, memory K/V, landmarks"),
    ("retrieval", "retrieval scores, top-k"),
    ("attn_core", "SWA / self-attention core"),
    ("mlp", "MLP"),
    ("lm_head", "LM head and log-softmax"),
    ("optimizer", "optimizer (grad norm, clip, AdamW)"),
    ("dense", "attention / HSA projections"),
]
OTHER = "other (norms, RoPE, residuals, embedding, casts)"
COLLECTIVES = "collectives"
INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (kernel names use '_' where HLO names use '.')."""
    out = {}
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            out[m.group(1)] = out[m.group(1).replace(".", "_")] = m.group(2)
    return out


def category(op_name: str, hlo_op: str) -> str:
    if COLLECTIVE.search(hlo_op):
        return COLLECTIVES
    for scope, label in CATEGORIES:
        if re.search(rf"(^|[/(]){scope}([/)]|$)", op_name):
            return label
    return OTHER


def breakdown(events: list[dict], names: dict[str, str], device_prefix: str, steps: int):
    """-> ({label: kernel µs per step, summed over devices / devices}, idle µs per step,
    {kernel without an HLO op name: µs per step})."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    per_device = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and procs.get(e["pid"], "").startswith(device_prefix):
            hlo_op = str(e.get("args", {}).get("hlo_op", "")) or e.get("name", "")
            if hlo_op in names or device_prefix != "/host":  # on the host, only XLA's thunks are kernels
                per_device[procs[e["pid"]]].append((e["ts"], e["ts"] + e.get("dur", 0.0), hlo_op))
    totals, idle, unknown = collections.Counter(), 0.0, collections.Counter()
    for kernels in per_device.values():
        for a, b, hlo_op in kernels:
            totals[category(names.get(hlo_op, ""), hlo_op)] += (b - a)
            if hlo_op not in names:
                unknown[hlo_op] += b - a
        span = max(b for _, b, _ in kernels) - min(a for a, _, _ in kernels)
        idle += span - length(union([(a, b) for a, b, _ in kernels]))
    n = max(len(per_device), 1) * steps
    return {k: v / n for k, v in totals.items()}, idle / n, {k: v / n for k, v in unknown.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=pathlib.Path, default=None, help="hsa-train YAML config (default: the tiny one)")
    p.add_argument("--steps", type=int, default=3, help="steps timed, then the same number traced (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    p.add_argument("--trace-dir", type=pathlib.Path, default=None, help="where the trace goes (default: a temp dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="hsa-train config overrides")
    p.add_argument("--command-buffers", action="store_true", help="keep XLA's GPU command buffers (CUDA graphs) "
                   "on, as hsa-train runs: faster by a little, but the kernels inside a graph carry no HLO op name, "
                   "so the breakdown cannot attribute them (default: off)")
    args = p.parse_args(argv)
    if not args.command_buffers and "--xla_gpu_enable_command_buffer=" not in os.environ.get("XLA_FLAGS", ""):
        # before the backend starts; an empty list turns command buffers off (CPU ignores the flag)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

    from train.config import load_config
    from train.flops import peak_flops_per_device, train_flops_per_token
    from train.main import init_state
    from train.sharding import batch_sharding, make_mesh
    from train.step import make_train_step

    cfg = load_config(args.config, args.overrides)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    graphdef, tx, state = init_state(cfg, mesh)
    rng_ids = np.random.default_rng(0)
    ids = jax.device_put(rng_ids.integers(0, cfg.model.vocab_size, (cfg.data.global_batch_size, cfg.data.seq_len + 1),
                                          dtype=np.int32), batch_sharding(mesh))
    key = jax.random.key(0)
    step = jax.jit(make_train_step(graphdef, tx, cfg, mesh), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, ids, key).compile()
    compile_s = time.perf_counter() - t0
    names = op_names(compiled.as_text())

    for _ in range(args.warmup + 1):
        state, metrics = compiled(state, ids, key)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, ids, key)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    trace_dir = args.trace_dir or pathlib.Path(tempfile.mkdtemp(prefix="hsa_train_step_"))
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    for _ in range(args.steps):
        state, metrics = compiled(state, ids, key)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()

    events = json.loads(gzip.open(find_trace(trace_dir)).read())["traceEvents"]
    prefix = "/device:GPU" if jax.default_backend() == "gpu" else "/host"
    per_step, idle, unknown = breakdown(events, names, prefix, args.steps)
    step_s = statistics.median(times)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    busy = sum(per_step.values())
    peak = peak_flops_per_device()
    flops = train_flops_per_token(cfg.model_type, cfg.model, cfg.data.seq_len) * tokens
    mfu = f", MFU {100 * flops / step_s / (peak * jax.device_count()):.1f}%" if peak else ""
    print(f"{cfg.model_type}, {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {cfg.mesh.data}x"
          f"{cfg.mesh.fsdp}x{cfg.mesh.tensor}, batch {cfg.data.global_batch_size}x{cfg.data.seq_len}, remat "
          f"{cfg.run.remat}, scan_layers {cfg.run.scan_layers}, command buffers "
          f"{'on' if args.command_buffers else 'off'}: compile {compile_s:.1f} s, step {1e3 * step_s:.1f} ms "
          f"({tokens / step_s:,.0f} tokens/s{mfu}); trace in {trace_dir}\n")
    print("| part of the step | ms per step (per device) | share of kernel time |\n|---|---|---|")
    for label, us in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {us / 1e3:.2f} | {100 * us / busy:.1f}% |")
    print(f"| **all kernels** | {busy / 1e3:.2f} | 100% |")
    print(f"| idle between kernels (launch, host, data) | {idle / 1e3:.2f} | |")
    lost = sum(unknown.values())
    if lost > 0.01 * busy:
        print(f"\n{lost / 1e3:.2f} ms per step of kernels had no HLO op name in the program (counted as other); "
              "the largest:")
        for name, us in sorted(unknown.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {us / 1e3:8.2f} ms  {name[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
