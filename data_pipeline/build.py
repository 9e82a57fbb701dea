"""`build` (text -> token index) and `import-raw` (original repo's uint16 `.data` -> token index).

Both run one job per input file, in parallel worker processes, and share the resumable driver: shards of
one input are named `IIIII-PPPP` (input number, part), each is complete once its `.json` exists, and
`IIIII.done` marks a finished input. A rerun after a kill keeps complete shards, skips the documents
they hold, and writes the rest; the manifest is written last."""

from __future__ import annotations

import functools
import glob
import json
import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DataPipelineError
from .index import SHARDS, ShardWriter, atomic_write_json, token_dtype, write_manifest
from .sources import input_format, read_documents
from .tokenizer import load_tokenizer

# Shards hold at most this many tokens (unless one document is longer): 2 GiB uint16 files, few of them,
# and a kill loses at most one shard of work per worker.
DEFAULT_SHARD_TOKENS = 1 << 30
RAW_BLOCK = 1 << 24  # tokens scanned at a time by import-raw

# (tokens (N,), lengths (D,)) of whole documents; called as produce(path, skip_docs, skip_tokens).
Producer = Callable[[str, int, int], Iterator[tuple[np.ndarray, np.ndarray]]]


def expand_inputs(patterns: Sequence[str], check_format: bool = True) -> list[Path]:
    """Files matched by the glob patterns (sorted per pattern, duplicates dropped), each with a supported
    extension; DataPipelineError for a pattern matching nothing or a file of unknown extension."""
    out: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataPipelineError(f"--input {pattern!r} matches no file")
        for m in matches:
            if check_format:
                input_format(m)
            out[Path(m).resolve()] = None
    return list(out)


@functools.cache
def _tokenizer(spec: str, eos_token: str):
    return load_tokenizer(spec, eos_token)


def _text_chunks(spec: str, eos_token: str, path: str, skip_docs: int, skip_tokens: int):
    tok = _tokenizer(spec, eos_token)
    for texts in read_documents(path, skip_docs):
        yield tok.encode_documents(texts)


def _raw_chunks(eos_id: int, vocab_size: int, path: str, skip_docs: int, skip_tokens: int):
    size = os.path.getsize(path)
    if size == 0:
        raise DataPipelineError(f"{path}: empty input (0 bytes)")
    if size % 2:
        raise DataPipelineError(f"{path}: {size} bytes is not a whole number of uint16 tokens (truncated?)")
    data = np.memmap(path, "<u2", "r")
    start = scan = skip_tokens
    while scan < len(data):
        block = data[scan:scan + RAW_BLOCK]
        bad = np.flatnonzero(block >= vocab_size)
        if len(bad):
            raise DataPipelineError(f"{path}: token {int(block[bad[0]])} at position {scan + int(bad[0])} "
                                    f"is >= --vocab-size {vocab_size}")
        ends = np.flatnonzero(block == eos_id) + scan + 1
        scan += len(block)
        if len(ends):  # emit whole documents only; a document longer than a block waits for its EOS
            yield np.asarray(data[start:ends[-1]]), np.diff(ends, prepend=start)
            start = int(ends[-1])
    if start < len(data):
        raise DataPipelineError(f"{path}: the last {len(data) - start} tokens are not followed by EOS id "
                                f"{eos_id} (truncated file or wrong --eos-id?)")


def _process(index: int, path: str, output: Path, produce: Producer, dtype: np.dtype, shard_tokens: int,
             progress: Callable[[int], object]) -> list[dict]:
    """Turn input file number `index` into shards, resuming after its complete shards."""
    shard_dir = output / SHARDS
    done = shard_dir / f"{index:05d}.done"
    if done.exists():
        return json.loads(done.read_text())
    metas = [json.loads(p.read_text()) for p in sorted(shard_dir.glob(f"{index:05d}-*.json"))]
    docs = sum(m["num_documents"] for m in metas)
    tokens = sum(m["num_tokens"] for m in metas)
    writer = None
    for chunk, lengths in produce(path, docs, tokens):
        ends = np.cumsum(lengths)
        lo = 0  # first document of the chunk not yet written
        while lo < len(lengths):
            if writer is None:
                writer = ShardWriter(output, f"{index:05d}-{len(metas):04d}", dtype,
                                     {"source": path, "source_first_document": docs})
            base = int(ends[lo - 1]) if lo else 0
            hi = int(np.searchsorted(ends, base + shard_tokens - writer.num_tokens, "right"))
            if hi == lo and writer.num_tokens:  # the next document does not fit: start a new shard
                metas.append(writer.close())
                writer = None
                continue
            hi = max(hi, lo + 1)  # a document longer than a shard gets a shard of its own
            writer.write(chunk[base:ends[hi - 1]], lengths[lo:hi])
            docs += hi - lo
            lo = hi
        progress(len(chunk))
    if writer is not None:
        metas.append(writer.close())
    atomic_write_json(done, metas)
    return metas


_progress_queue = None


def _init_worker(q) -> None:
    global _progress_queue
    _progress_queue = q
    # One worker = one core: the Rust tokenizer must not spawn its own thread pool in every worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _process_in_worker(*args) -> list[dict]:
    return _process(*args, progress=_progress_queue.put)


def _run(inputs: list[Path], output: Path, produce: Producer, dtype: np.dtype, shard_tokens: int,
         workers: int, progress: bool, desc: str) -> list[dict]:
    jobs = [(i, str(p), output, produce, dtype, shard_tokens) for i, p in enumerate(inputs)]
    results: dict[int, list[dict]] = {}
    with tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        def finished(i, metas):
            results[i] = metas
            bar.set_postfix_str(f"files {len(results)}/{len(jobs)}")

        if workers <= 1:
            for job in jobs:
                finished(job[0], _process(*job, progress=bar.update))
        else:
            ctx = mp.get_context("spawn")  # fork would copy the parent's tokenizer thread pool state
            q = ctx.Queue()
            ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q,))
            try:
                pending = {ex.submit(_process_in_worker, *job): job[0] for job in jobs}
                while pending:
                    done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    while True:
                        try:
                            bar.update(q.get_nowait())
                        except queue.Empty:
                            break
                    for fut in done:
                        finished(pending.pop(fut), fut.result())
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
    return [m for i in sorted(results) for m in results[i]]


def _start(output: Path, settings: dict) -> None:
    """Record the run's settings; refuse to resume into a directory written with other settings."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "build.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            raise DataPipelineError(f"{output} holds a run with other settings (differs in {diff}); "
                                    f"use a new --output or delete it")
    else:
        atomic_write_json(path, settings)


def build_index(inputs: Sequence[str], tokenizer: str, output: str | Path, *, workers: int = 1,
                eos_token: str = "<|endoftext|>", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                progress: bool = True) -> dict:
    """Tokenise text files (.jsonl, .jsonl.zst, .parquet, .txt; glob patterns allowed) into an index at
    `output`, appending one EOS to every document. `tokenizer` is "bytes" or a tokenizer.json path.
    Resumable; returns the manifest."""
    output = Path(output)
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, eos_token)
    settings = {"command": "build", "inputs": [str(p) for p in files], "tokenizer": tok.describe(),
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "shard_tokens": shard_tokens}
    _start(output, settings)
    produce = functools.partial(_text_chunks, tokenizer, eos_token)
    shards = _run(files, output, produce, token_dtype(tok.vocab_size), shard_tokens, workers, progress, "build")
    return write_manifest(output, tokenizer=tok.describe(), vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                          shards=shards)


def import_raw(inputs: Sequence[str], output: str | Path, *, eos_id: int, vocab_size: int, workers: int = 1,
               shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> dict:
    """Index the original repo's raw little-endian uint16 `.data` token streams without re-tokenising;
    documents end at each EOS. Resumable; returns the manifest."""
    if not 0 < vocab_size <= 1 << 16:
        raise DataPipelineError(f"--vocab-size {vocab_size}: raw .data files are uint16, so it must be in "
                                f"1..65536")
    if not 0 <= eos_id < vocab_size:
        raise DataPipelineError(f"--eos-id {eos_id} must be in 0..{vocab_size - 1} (--vocab-size {vocab_size})")
    output = Path(output)
    files = expand_inputs(inputs, check_format=False)
    tokenizer = {"kind": "raw-import", "fingerprint": "unknown",
                 "description": "imported from raw uint16 .data streams; the tokenizer is not recorded"}
    settings = {"command": "import-raw", "inputs": [str(p) for p in files], "vocab_size": vocab_size,
                "eos_id": eos_id, "shard_tokens": shard_tokens}
    _start(output, settings)
    produce = functools.partial(_raw_chunks, eos_id, vocab_size)
    shards = _run(files, output, produce, token_dtype(vocab_size), shard_tokens, workers, progress, "import-raw")
    return write_manifest(output, tokenizer=tokenizer, vocab_size=vocab_size, eos_id=eos_id, shards=shards)
