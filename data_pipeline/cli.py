"""`hsa-preprocess`: build, import-raw and verify token indexes (see docs/data.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
import sys

from .build import DEFAULT_SHARD_TOKENS, build_index, import_raw
from .errors import DataPipelineError
from .sources import EXTENSIONS
from .verify import verify_index


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsa-preprocess",
        description="Turn a text corpus (e.g. the Pile) into a token index of uint16/uint32 shards with a "
                    "document-offset index and DIR/manifest.json, read by data_pipeline.make_loader.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", required=True, metavar="DIR",
                        help="index directory to write (new, empty, or one of this tool's); rerunning the "
                             "same command there resumes an interrupted run (finished shards are kept); "
                             "one run at a time per directory")
    common.add_argument("--workers", type=int, default=1, metavar="N",
                        help="parallel worker processes, one input file each at a time (default 1)")
    common.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="T",
                        help=f"start a new shard once one holds T tokens; documents are never split "
                             f"(default {DEFAULT_SHARD_TOKENS})")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("build", parents=[common], help="tokenise text files into an index",
                       description="Tokenise documents, append one EOS to each, and write the index. "
                                   f"Input formats by extension: {', '.join(EXTENSIONS)}: .jsonl(.zst) "
                                   "has one JSON object with a string 'text' field a line (the Pile); "
                                   ".parquet has a 'text' column; a .txt file is one document.")
    b.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                   help="input files or glob patterns (quote them; ** recurses); each must match a file")
    b.add_argument("--tokenizer", required=True, metavar="PATH|bytes",
                   help="a HF tokenizers tokenizer.json (the Pile's: gpt-neox-20b/tokenizer.json), or "
                        "'bytes': UTF-8 bytes 0-255 plus EOS 256, vocab_size 257")
    b.add_argument("--eos-token", default="<|endoftext|>",
                   help="the EOS token string of a tokenizer.json (default <|endoftext|>); ignored for bytes")

    r = sub.add_parser("import-raw", parents=[common], help="index the original repo's uint16 .data files",
                       description="Index raw little-endian uint16 token streams (the original PyTorch "
                                   "repo's .data files, EOS after each document) without re-tokenising; "
                                   "documents end at each EOS.")
    r.add_argument("--input", nargs="+", required=True, metavar="FILES", help="files or glob patterns")
    r.add_argument("--eos-id", type=int, required=True, metavar="ID", help="the EOS id (0 for gpt-neox-20b)")
    r.add_argument("--vocab-size", type=int, required=True, metavar="V",
                   help="vocabulary size; every id must be < V (50277 for gpt-neox-20b)")

    v = sub.add_parser("verify", help="check an index against its manifest",
                       description="Re-read every shard: sizes, sha256 checksums, offsets, one EOS ending "
                                   "each document, ids < vocab_size. Exit status 0 when sound, 1 otherwise.")
    v.add_argument("dir", metavar="DIR", help="index directory (holding manifest.json)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not args.no_progress
    try:
        if args.command == "verify":
            if not Path(args.dir).is_dir():  # bad input (exit 2), not a damaged index (exit 1)
                raise DataPipelineError(f"{args.dir}: no such index folder")
            report = verify_index(args.dir, progress=progress)
            print(report.summary())
            return 0 if report.ok else 1
        if args.workers < 1 or args.shard_tokens < 1:
            raise DataPipelineError("--workers and --shard-tokens must be >= 1")
        if args.command == "build":
            m = build_index(args.input, args.tokenizer, args.output, workers=args.workers,
                            eos_token=args.eos_token, shard_tokens=args.shard_tokens, progress=progress, log=print)
        else:
            m = import_raw(args.input, args.output, eos_id=args.eos_id, vocab_size=args.vocab_size,
                           workers=args.workers, shard_tokens=args.shard_tokens, progress=progress, log=print)
    except (DataPipelineError, OSError) as e:  # OSError: e.g. an unwritable --output, a full disk
        print(f"hsa-preprocess {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "" if args.command == "verify" else "; finished shards are kept, rerun the same command to resume"
        print(f"hsa-preprocess {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    print(f"{args.output}: {m['num_documents']:,} documents, {m['total_tokens']:,} tokens "
          f"({m['dtype']}, vocab_size {m['vocab_size']}, eos_id {m['eos_id']}) in {len(m['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
