"""Throughput of the data pipeline, printed as a markdown table (recorded in docs/benchmarks.md).

  build   tokens/s of `build_index` with one worker (= one core: the Rust tokenizer's own thread pool is
          off) and with --build-workers; next to it the bare tokenizer on the same texts in memory,
          which shows that build is limited by tokenisation, not by reading or writing. The parallel
          row includes starting the worker processes (~1-2 s).
  loader  tokens/s of one process's grain loader at seq_len L (B windows of L+1 tokens a batch), per
          mode, over a synthetic index of random ids with Pile-like document lengths.

    .venv/bin/python benchmarks/data_loader.py [--build-mb 32] [--loader-tokens 268435456] [--seq-len 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, also for the in-memory baseline

import numpy as np  # noqa: E402

from data_pipeline import build_index, import_raw, make_loader  # noqa: E402
from data_pipeline.bundled import bundled_texts  # noqa: E402
from data_pipeline.sources import read_documents  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (pool workers): on a shared machine, tokens per
    CPU-second is the figure that other jobs do not distort."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def _timed(fn):
    """(fn(), wall seconds, CPU seconds)."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = fn()
    return out, time.perf_counter() - t0, _cpu_seconds() - c0


def _corpus(path: Path, megabytes: int) -> int:
    """A jsonl of the bundled documents repeated to about `megabytes` MB; returns its size in bytes."""
    texts = bundled_texts()
    with open(path, "w") as f:
        while f.tell() < megabytes << 20:
            for t in texts:
                f.write(json.dumps({"text": t, "meta": {"pile_set_name": "bench"}}) + "\n")
    return path.stat().st_size


def _build_rows(work: Path, megabytes: int, workers: int) -> list[tuple]:
    src = work / "corpus.jsonl"
    size = _corpus(src, megabytes)
    neox = Path(os.environ.get("HSA_SHARED", REPO.parent / "shared")) / "tokenizers/gpt-neox-20b/tokenizer.json"
    rows = []
    for name, spec in (("bytes", "bytes"), ("gpt-neox-20b", str(neox))):
        if spec != "bytes" and not neox.exists():
            print(f"skipping {name}: {neox} missing", file=sys.stderr)
            continue
        tok = load_tokenizer(spec)
        batches = list(read_documents(src))
        n, wall, cpu = _timed(lambda: sum(len(tok.encode_documents(b)[0]) for b in batches))
        rows.append((f"tokenizer only, in memory ({name})", 1, n, wall, cpu))
        for w in sorted({1, workers}):
            # Two copies of the input, so that `workers` processes have one file each.
            inputs = [str(src)] + ([str(work / "corpus2.jsonl")] if w > 1 else [])
            if w > 1 and not Path(inputs[1]).exists():
                os.link(src, inputs[1])
            m, wall, cpu = _timed(lambda: build_index(inputs, spec, work / f"idx-{name}-{w}", workers=w,
                                                      progress=False))
            rows.append((f"build {size * len(inputs) >> 20} MB jsonl ({name})", w, m["total_tokens"], wall, cpu))
    return rows


def _synthetic_index(work: Path, tokens: int, seed: int = 0) -> Path:
    """Random ids < 50277 with EOS 0 ending documents of geometric length, mean 2000 tokens."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 50277, tokens, dtype=np.uint16)
    ends = np.cumsum(rng.geometric(1 / 2000, tokens // 1000)) - 1
    data[ends[ends < tokens]] = 0
    data[-1] = 0
    raw = work / "synthetic.data"
    data.tofile(raw)
    import_raw([str(raw)], work / "synthetic", eos_id=0, vocab_size=50277, progress=False)
    return work / "synthetic"


def _loader_rows(index: Path, seq_len: int, batch: int, steps: int, workers: int) -> list[tuple]:
    rows = []
    for mode in ("random", "across_docs", "sequential"):
        for w in sorted({0, workers}):
            it = iter(make_loader(index, seq_len=seq_len, global_batch_size=batch, mode=mode, seed=0,
                                  process_index=0, process_count=1, worker_count=w))
            next(it)  # start-up (worker spawn, page-in of the offsets) is not throughput
            n, wall, cpu = _timed(lambda it=it: sum(next(it)["input_ids"].size for _ in range(steps)))
            # cpu: this process only (grain's worker processes are not reaped until the loader ends)
            rows.append((f"loader {mode}, L={seq_len}, B={batch}", w, n, wall, cpu))
            del it
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-mb", type=int, default=32, help="size of the jsonl corpus to build, MB")
    p.add_argument("--build-workers", type=int, default=2, help="worker count of the parallel build row")
    p.add_argument("--loader-tokens", type=int, default=1 << 28, help="tokens of the synthetic index")
    p.add_argument("--seq-len", type=int, default=8192, help="window length L (records are L+1 tokens)")
    p.add_argument("--batch", type=int, default=8, help="windows per batch (one process)")
    p.add_argument("--steps", type=int, default=500, help="batches timed per loader row")
    p.add_argument("--loader-workers", type=int, default=2, help="worker_count of the prefetching rows")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        rows = _build_rows(work, args.build_mb, args.build_workers)
        rows += _loader_rows(_synthetic_index(work, args.loader_tokens), args.seq_len, args.batch, args.steps,
                             args.loader_workers)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f}")
    print("| what | workers | tokens | wall s | tokens/s | tokens/s per worker | tokens per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for what, w, n, wall, cpu in rows:
        print(f"| {what} | {w} | {n:,} | {wall:.2f} | {n / wall / 1e6:.2f}M | {n / wall / max(w, 1) / 1e6:.2f}M "
              f"| {n / cpu / 1e6:.2f}M |")


if __name__ == "__main__":
    main()
