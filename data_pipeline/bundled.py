"""The bundled corpus: Python's own documentation topics (`pydoc_data.topics`, in every CPython install),
one document per topic, byte-tokenised. About 0.5M tokens; used by the default training config and tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .build import build_index
from .index import atomic_write
from .lock import DirLock


def bundled_texts() -> list[str]:
    """The documents of the bundled corpus, in a fixed order (sorted topic names)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def ensure_bundled_corpus(directory: str | Path, progress: bool = False) -> Path:
    """Build (once) the byte-tokenised index of the bundled corpus under `directory`; returns the index
    directory `directory/index`. Idempotent and safe to call from concurrent processes: it rebuilds only
    when the source text changed (another Python version) or the index is incomplete."""
    directory = Path(directory)
    source, index = directory / "pydoc_topics.jsonl", directory / "index"
    text = "".join(json.dumps({"text": t}) + "\n" for t in bundled_texts()).encode()
    with DirLock(directory, what="bundled corpus", wait=True):  # concurrent callers wait for the first
        if source.exists() and source.read_bytes() == text and (index / "manifest.json").exists():
            return index
        shutil.rmtree(index, ignore_errors=True)
        atomic_write(source, text)
        build_index([str(source)], "bytes", index, progress=progress)
    return index
