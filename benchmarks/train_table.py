"""Summarise hsa-train workdirs as one markdown table: first step (compilation included), median step
time, tokens/s and MFU over the logged windows from --from-step on (up to the traced steps, if any), and
the loss.

    python3 benchmarks/train_table.py /tmp/r_125m /tmp/r_370m --from-step 20
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys


def summarise(workdir: pathlib.Path, from_step: int) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    cfg = json.loads((workdir / "config.json").read_text())
    run = cfg["run"]
    traced_from = run["profile_from"] if run.get("profile_steps") else float("inf")  # the profiler slows its window
    timed = [r for r in rows if "step_time_s" in r and from_step < r["step"] <= traced_from]
    losses = [r for r in rows if "loss" in r]
    first = next((r["first_step_s"] for r in rows if "first_step_s" in r), None)
    med = lambda key: statistics.median(r[key] for r in timed) if timed and key in timed[0] else None
    m = cfg["mesh"]
    return {
        "run": workdir.name, "mesh": f"data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}",
        "batch": f"{cfg['data']['global_batch_size']}x{cfg['data']['seq_len']}", "remat": cfg["run"]["remat"],
        "first_step_s": first, "step_s": med("step_time_s"), "tokens_s": med("tokens_per_s"), "mfu": med("mfu"),
        "loss": f"{losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f} (step {losses[-1]['step']})" if losses else "",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", type=pathlib.Path, help="hsa-train workdirs (metrics.jsonl, config.json)")
    p.add_argument("--from-step", type=int, default=20, help="ignore logged windows up to this step (warm-up)")
    args = p.parse_args(argv)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print("| run | mesh | batch | remat | first step (s) | step (s) | tokens/s | MFU | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in args.workdirs:
        if not (d / "metrics.jsonl").exists():
            print(f"| {d.name} | (no metrics.jsonl: the run failed) | | | | | | | |")
            continue
        s = summarise(d, args.from_step)
        print(f"| {s['run']} | {s['mesh']} | {s['batch']} | {s['remat']} | {fmt(s['first_step_s'], '.1f')} | "
              f"{fmt(s['step_s'], '.3f')} | {fmt(s['tokens_s'], ',.0f')} | "
              f"{fmt(s['mfu'] and 100 * s['mfu'], '.1f')}% | {s['loss']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
