"""Readers of the raw-text input formats of `build`: `.jsonl`, `.jsonl.zst` (the original Pile: one
`{"text": ..., "meta": ...}` object a line), `.parquet` (a `text` column, e.g. the deduplicated Pile) and
`.txt` (the whole file is one document)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import zstandard

from .errors import DataPipelineError

EXTENSIONS = (".jsonl.zst", ".jsonl", ".parquet", ".txt")
# Tokeniser batches: big enough to amortise the call, small enough to bound memory per worker.
BATCH_CHARS = 4 << 20
BATCH_DOCS = 4096


def input_format(path: str | Path) -> str:
    """The extension of `path` among EXTENSIONS; a DataPipelineError naming the file otherwise."""
    name = str(path)
    for ext in EXTENSIONS:
        if name.endswith(ext):
            return ext
    raise DataPipelineError(f"{path}: unknown input extension; allowed: {', '.join(EXTENSIONS)}")


def _batched(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _jsonl_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        if path.name.endswith(".zst"):
            # The Pile's .zst files use long windows; 2 GiB is zstd's maximum.
            reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(f, read_across_frames=True)
            f = io.BufferedReader(reader, 1 << 20)
        try:
            yield from f
        except zstandard.ZstdError as e:
            raise DataPipelineError(f"{path}: corrupt zstd stream ({e})") from e


def _jsonl_texts(path: Path, skip: int) -> Iterator[str]:
    seen = 0
    for lineno, line in enumerate(_jsonl_lines(path), 1):
        if not line.strip():
            continue
        seen += 1
        if seen <= skip:  # resuming: count documents without parsing them
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataPipelineError(f"{path}:{lineno}: invalid JSON ({e})") from e
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataPipelineError(f"{path}:{lineno}: expected an object with a string 'text' field")
        yield text


def _parquet_texts(path: Path, skip: int) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataPipelineError(f"{path}: not a readable parquet file ({e})") from e
    if "text" not in pf.schema_arrow.names:
        raise DataPipelineError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            texts = batch.column(0).to_pylist()
            for t in texts[max(0, skip - row):]:
                if not isinstance(t, str):
                    raise DataPipelineError(f"{path}: row {row}: 'text' is {t!r}, expected a string")
                yield t
            row += len(texts)
    except pa.ArrowException as e:
        raise DataPipelineError(f"{path}: corrupt parquet data ({e})") from e


def _txt_texts(path: Path, skip: int) -> Iterator[str]:
    if skip:
        return
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataPipelineError(f"{path}: not UTF-8 text ({e})") from e


_READERS = {".jsonl": _jsonl_texts, ".jsonl.zst": _jsonl_texts, ".parquet": _parquet_texts, ".txt": _txt_texts}


def read_documents(path: str | Path, skip: int = 0) -> Iterator[list[str]]:
    """Batches of document texts of `path`, after skipping its first `skip` documents (for resuming).

    Raises DataPipelineError naming the file when it has no document at all (blank lines do not count)."""
    path = Path(path)
    reader = _READERS[input_format(path)]
    if path.stat().st_size == 0:
        raise DataPipelineError(f"{path}: empty input (0 bytes)")
    n = 0
    for batch in _batched(reader(path, skip)):
        n += len(batch)
        yield batch
    if n == 0 and skip == 0:
        raise DataPipelineError(f"{path}: empty input (no documents)")
