"""`build` (text -> token index) and `import-raw` (original repo's uint16 `.data` -> token index).

Both run one job per input file, in parallel worker processes, and share the resumable driver: shards of
one input are named `IIIII-PPPP` (input number, part), each is complete once its `.json` exists, and
`IIIII.done` marks a finished input. A rerun after a kill keeps complete shards, skips the documents
they hold, and writes the rest; the manifest is written last.

Guards (docs/data.md "Faults and refusals"): one writer per output (DirLock for the whole run); an output folder that
is not empty and holds no build.json of ours is refused untouched; build.json records the settings and
each input's (path, size, mtime_ns), and a resume after an input changed is refused; workers die with the
build process."""

from __future__ import annotations

import ctypes
import functools
import glob
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DataPipelineError
from .index import SHARDS, ShardWriter, TokenIndex, atomic_write_json, read_manifest, token_dtype, write_manifest
from .lock import LOCK_NAME, DirLock
from .sources import input_format, read_documents
from .tokenizer import load_tokenizer

# Shards hold at most this many tokens (unless one document is longer): 2 GiB uint16 files, few of them,
# and a kill loses at most one shard of work per worker.
DEFAULT_SHARD_TOKENS = 1 << 30
RAW_BLOCK = 1 << 24  # tokens scanned at a time by import-raw
COMMANDS = ("build", "import-raw")  # the `command` of a build.json written here
PR_SET_PDEATHSIG = 1  # linux/prctl.h

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


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its build (kill -9 of the parent): it would go on writing shards of a run
    nobody owns any more, racing a rerun. On Linux the kernel kills the worker when the thread that spawned
    it exits (PR_SET_PDEATHSIG); that is the thread running `_run`, which outlives the pool. A thread
    watching for re-parenting backs it up (other systems, or a failed prctl) within a second."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _init_worker(q, parent_pid: int) -> None:
    global _progress_queue
    _progress_queue = q
    _die_with_parent(parent_pid)
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
            ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q, os.getpid()))
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
                        i = pending.pop(fut)
                        try:
                            metas = fut.result()
                        except BrokenProcessPool as e:
                            raise DataPipelineError(f"a worker process died (killed? out of memory?) while "
                                                    f"indexing {inputs[i]}; finished shards are kept: rerun "
                                                    f"the same command to resume") from e
                        finished(i, metas)
            except BaseException:
                # Stop the other workers now rather than after their current file: what they would write
                # is redone by a rerun anyway, and the output's lock is released when we return.
                for proc in list((getattr(ex, "_processes", None) or {}).values()):
                    proc.terminate()
                raise
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
    return [m for i in sorted(results) for m in results[i]]


def _input_files(files: list[Path]) -> list[dict]:
    """Each input's identity: path, size and mtime_ns (a cheap stand-in for its content)."""
    out = []
    for p in files:
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _changed(recorded: list[dict], current: list[dict]) -> str | None:
    """'PATH (what changed)' for the first input whose identity differs, else None."""
    for old, new in zip(recorded, current):
        if old != new:
            what = (f"size {old['size']} -> {new['size']} bytes" if old["size"] != new["size"]
                    else "modification time changed")
            return f"{new['path']} ({what})"
    return None


def _read_state(output: Path) -> dict | None:
    """output/build.json if it is one of ours, else None."""
    try:
        state = json.loads((output / "build.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("command") in COMMANDS else None


def _claim(output: Path) -> None:
    """Refuse, before writing anything (not even the lock file), an --output that is not a directory, or
    not empty and not ours (no build.json of a build/import-raw run): it may hold a user's files, e.g.
    their own manifest.json. The lock and a build.json still being written are what a run that has just
    started (or was killed right then) leaves: they count as empty, and the lock then decides."""
    if output.exists() and not output.is_dir():
        raise DataPipelineError(f"--output {output}: exists and is not a directory")
    ignored = {LOCK_NAME, "build.json.tmp"}
    entries = sorted(e.name for e in output.iterdir() if e.name not in ignored) if output.exists() else []
    if entries and _read_state(output) is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise DataPipelineError(f"--output {output} is not empty ({shown}) and was not written by "
                                f"hsa-preprocess build/import-raw (no build.json); left untouched: use a "
                                f"new or empty --output")


def _start(output: Path, settings: dict, inputs: list[dict], log: Callable[[str], object]) -> dict | None:
    """Record the run's settings and inputs (under the lock); refuse to resume into a directory written
    with other settings or from inputs changed since. Returns the manifest of an already finished run of
    the same settings and inputs, else None."""
    path = output / "build.json"
    old = _read_state(output)
    if old is None:
        atomic_write_json(path, {**settings, "input_files": inputs})
        return None
    recorded = old.pop("input_files", None)
    if old != settings:
        diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        raise DataPipelineError(f"{output} holds a run with other settings (differs in {diff}); "
                                f"use a new --output or delete it")
    if recorded is None:  # written before inputs were recorded: nothing to compare with
        log(f"{path}: no input identities recorded (older hsa-preprocess); recording them now, unchecked")
        atomic_write_json(path, {**settings, "input_files": inputs})
    elif changed := _changed(recorded, inputs):
        raise DataPipelineError(f"input {changed} since the run in {output} started; its shards may no "
                                f"longer match it: start over with a fresh --output (or delete {output})")
    if not (output / "manifest.json").exists():
        return None
    TokenIndex(output)  # the finished index's files are all there, at their sizes
    return read_manifest(output)


def _build(output: Path, files: list[Path], settings: dict, produce: Producer, shard_tokens: int, workers: int,
           progress: bool, log: Callable[[str], object] | None, manifest_fields: dict) -> dict:
    """The run shared by build and import-raw: claim and lock the output, resume, check the inputs did not
    change while read, write the manifest."""
    log = log or (lambda msg: None)
    _claim(output)
    with DirLock(output, what="token index output"):
        inputs = _input_files(files)
        finished = _start(output, settings, inputs, log)
        if finished is not None:
            log(f"{output}: already a finished index of these inputs and settings; nothing to do")
            return finished
        shards = _run(files, output, produce, token_dtype(settings["vocab_size"]), shard_tokens, workers,
                      progress, settings["command"])
        if changed := _changed(inputs, _input_files(files)):
            raise DataPipelineError(f"input {changed} while it was being indexed into {output}; no manifest "
                                    f"written: start over with a fresh --output (or delete {output})")
        return write_manifest(output, shards=shards, **manifest_fields)


def build_index(inputs: Sequence[str], tokenizer: str, output: str | Path, *, workers: int = 1,
                eos_token: str = "<|endoftext|>", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                progress: bool = True, log: Callable[[str], object] | None = None) -> dict:
    """Tokenise text files (.jsonl, .jsonl.zst, .parquet, .txt; glob patterns allowed) into an index at
    `output`, appending one EOS to every document. `tokenizer` is "bytes" or a tokenizer.json path.
    Resumable; returns the manifest. `log` receives notes such as "nothing to do"."""
    output = Path(output)
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, eos_token)
    settings = {"command": "build", "inputs": [str(p) for p in files], "tokenizer": tok.describe(),
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "shard_tokens": shard_tokens}
    produce = functools.partial(_text_chunks, tokenizer, eos_token)
    return _build(output, files, settings, produce, shard_tokens, workers, progress, log,
                  dict(tokenizer=tok.describe(), vocab_size=tok.vocab_size, eos_id=tok.eos_id))


def import_raw(inputs: Sequence[str], output: str | Path, *, eos_id: int, vocab_size: int, workers: int = 1,
               shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True,
               log: Callable[[str], object] | None = None) -> dict:
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
    produce = functools.partial(_raw_chunks, eos_id, vocab_size)
    return _build(output, files, settings, produce, shard_tokens, workers, progress, log,
                  dict(tokenizer=tokenizer, vocab_size=vocab_size, eos_id=eos_id))
