"""Where a traced training step's time goes on each device: compute kernels, collectives (NCCL), and
the collective time that no compute kernel overlaps ("exposed"), from the Perfetto trace that
`hsa-train run.profile_steps=N` writes (WORKDIR/profile/plugins/profile/<time>/perfetto_trace.json.gz).

    python3 benchmarks/trace_summary.py /tmp/r125_fsdp2/profile            # newest trace under it
    python3 benchmarks/trace_summary.py trace.json.gz --device /host:CPU    # a CPU trace's XLA threads

Per device (a trace process whose name starts with --device): the span from its first kernel start to
its last kernel end, the union of all its kernels' intervals (busy), of the compute kernels, of the
collective kernels, and collective minus compute (exposed), divided by the number of traced train
steps (host `train_step` dispatches; --steps overrides). Then the --top kernels with the most time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys

COLLECTIVE = re.compile(r"nccl|all-gather|all_gather|allgather|reduce-scatter|reduce_scatter|reducescatter|"
                        r"all-reduce|all_reduce|allreduce|collective-permute|all-to-all", re.IGNORECASE)


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def minus(xs, ys) -> float:
    """Total length of the union `xs` not covered by the union `ys` (both sorted, disjoint)."""
    total, j = 0.0, 0
    for a, b in xs:
        covered = 0.0
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            covered += min(b, ys[k][1]) - max(a, ys[k][0])
            k += 1
        total += (b - a) - covered
    return total


def find_trace(path: pathlib.Path) -> pathlib.Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("perfetto_trace.json.gz")) if path.is_dir() else []
    if not found:
        print(f"trace_summary: error: no perfetto_trace.json.gz at or under {path} (a trace hsa-train "
              f"run.profile_steps=N writes into WORKDIR/profile)", file=sys.stderr)
        raise SystemExit(2)
    return found[-1]


def summarise(events: list[dict], device_prefix: str, steps: int | None):
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    kernels = collections.defaultdict(list)
    dispatches = []
    for e in events:
        if e.get("ph") != "X":
            continue
        proc = names.get(e["pid"], "")
        if proc.startswith("/host") and e.get("name", "").startswith("PjitFunction(train_step"):
            dispatches.append((e["ts"], e["ts"] + e.get("dur", 0.0)))
        if proc.startswith(device_prefix):
            label = " ".join([e.get("name", ""), str(e.get("args", {}).get("hlo_op", ""))])
            kernels[proc].append((e["ts"], e["ts"] + e.get("dur", 0.0), e.get("name", ""),
                                  bool(COLLECTIVE.search(label))))
    steps = steps or len(union(dispatches)) or 1  # the profiler nests one dispatch in another of the same name
    rows, top, count = [], collections.Counter(), collections.Counter()
    for proc in sorted(kernels):
        ks = kernels[proc]
        busy = union([(a, b) for a, b, _, _ in ks])
        comp = union([(a, b) for a, b, _, c in ks if not c])
        coll = union([(a, b) for a, b, _, c in ks if c])
        span = max(b for _, b, _, _ in ks) - min(a for a, _, _, _ in ks)
        rows.append((proc, span, length(busy), length(comp), length(coll), minus(coll, comp), len(ks)))
        for a, b, name, _ in ks:
            top[name[:90]] += (b - a)
            count[name[:90]] += 1
    return steps, rows, top, count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=pathlib.Path, help="perfetto_trace.json.gz, or a folder to search for the newest one")
    p.add_argument("--device", default="/device:GPU", help="trace process name prefix of the devices (default "
                   "/device:GPU; /host:CPU for a CPU run)")
    p.add_argument("--steps", type=int, default=None, help="traced steps to divide by (default: the host's "
                   "train_step dispatches in the trace)")
    p.add_argument("--top", type=int, default=10, help="how many of the longest kernels to list (default 10)")
    args = p.parse_args(argv)
    path = find_trace(args.trace)
    events = json.loads(gzip.open(path).read())["traceEvents"]
    steps, rows, top, count = summarise(events, args.device, args.steps)
    if not rows:
        print(f"trace_summary: no kernels of a device named {args.device}* in {path}", file=sys.stderr)
        return 1
    digits = 1 if max(r[1] for r in rows) / steps > 1e4 else 3  # a decode step lasts about a millisecond
    ms = lambda us: f"{us / steps / 1e3:.{digits}f}"
    print(f"{path} ({steps} traced steps; ms per step)\n")
    print("| device | span | busy | compute | collectives | exposed collectives | kernels per step |")
    print("|---|---|---|---|---|---|---|")
    for proc, span, busy, comp, coll, exposed, n in rows:
        print(f"| {proc} | {ms(span)} | {ms(busy)} | {ms(comp)} | {ms(coll)} | {ms(exposed)} | {n / steps:.0f} |")
    print("\n| kernel (all devices) | ms per step | launches per step |\n|---|---|---|")
    for name, us in top.most_common(args.top):
        print(f"| `{name}` | {ms(us)} | {count[name] / steps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
