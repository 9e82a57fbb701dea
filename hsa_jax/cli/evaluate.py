"""`hsa-eval`: RULER-style retrieval accuracy and perplexity over a sweep of context lengths.

How samples are built from haystack windows and scored, and what the perplexity averages: the
docstring of hsa_jax/eval/longctx.py, the library this command drives (tasks: docs/model_math.md
"RULER tasks").

    hsa-eval --checkpoint runs/extrapolation_tiny --haystack runs/extrapolation_data/haystack \
        --tokenizer bytes --tasks s_niah --lengths 512,4096,16384,32768 --samples 20 --out runs/eval
    hsa-eval --weights model.safetensors --config config.json --tokenizer tokenizer.json \
        --haystack /data/pile_neox_val --lengths 1K,4K,16K,64K,256K,1M --ppl

Writes OUT/results.json and OUT/accuracy.png (accuracy vs length, one line per task); prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from hsa_jax.cli.common import add_model_source, load_model_from_args, run_cli
from hsa_jax.common.config import ConfigError
from hsa_jax.eval.longctx import ALL_TASKS, evaluate_ppl, evaluate_tasks, format_table, parse_length, plot
from hsa_jax.eval.ruler import TextTokenizer
from hsa_jax.registry import make_decoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hsa-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(p)
    p.add_argument("--haystack", required=True, type=pathlib.Path, help="token index dir (hsa-preprocess build)")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or the index's tokenizer.json")
    p.add_argument("--tasks", default="s_niah", help=f"comma-separated, from {','.join(ALL_TASKS)}; '' for none")
    p.add_argument("--lengths", default="512,4K,16K,32K", help="comma-separated context lengths (K/M suffixes)")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0,
                   help="which haystack windows are drawn (and so the needle positions and keys): 0 (default) "
                        "takes consecutive windows from the index start, as earlier evaluations did; any other "
                        "seed draws fresh windows uniformly")
    p.add_argument("--ppl", action="store_true", help="also perplexity by length over the haystack")
    p.add_argument("--ppl-samples", type=int, default=2)
    p.add_argument("--segment", type=int, default=4096, help="prefill segment length")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/eval"))
    return p.parse_args(argv)


def _main(args) -> int:
    from data_pipeline import TokenIndex

    try:
        lengths = sorted(parse_length(x) for x in args.lengths.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--lengths {args.lengths!r}: expected comma-separated lengths like 512,4K,1M") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ALL_TASKS]
    if bad:
        raise ConfigError(f"--tasks: unknown tasks {bad}; available: {', '.join(ALL_TASKS)}")
    if args.samples < 1 or args.ppl_samples < 1:
        raise ConfigError(f"--samples={args.samples} / --ppl-samples={args.ppl_samples}: must be >= 1")
    if not lengths or min(lengths) < 64:
        raise ConfigError(f"--lengths {args.lengths}: need lengths >= 64")
    index = TokenIndex(args.haystack)
    tok = TextTokenizer.load(args.tokenizer)
    model = load_model_from_args(args)
    if index.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"--haystack {args.haystack}: vocab {index.vocab_size} > model vocab {model.cfg.vocab_size}")
    decoder = make_decoder(model, segment_len=args.segment)
    t0 = time.perf_counter()
    results = evaluate_tasks(decoder, index, tok, tasks, lengths, args.samples, seed=args.seed)
    ppl = evaluate_ppl(decoder, index, lengths, args.ppl_samples, seed=args.seed) if args.ppl else None
    table = format_table(results, ppl, lengths)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"model": str(args.checkpoint or args.weights), "haystack": str(args.haystack),
              "tokenizer": args.tokenizer, "lengths": lengths, "samples": args.samples, "seed": args.seed,
              "segment": args.segment,
              "backend": jax.default_backend(), "seconds": time.perf_counter() - t0, "tasks": results,
              "perplexity": ppl, "table": table}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    if results:
        plot(results, lengths, args.out / "accuracy.png", f"{args.checkpoint or args.weights}")
    print(f"hsa-eval: wrote {args.out / 'results.json'}" + (f" and {args.out / 'accuracy.png'}" if results else ""))
    return 0


def main(argv=None) -> int:
    return run_cli("hsa-eval", lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
