"""The token index on disk: format, atomic shard writer, manifest, and the memory-mapped reader.

Layout of an index directory DIR:

    DIR/manifest.json          written last, when every shard is complete (see `write_manifest`)
    DIR/build.json, DIR/.lock  the build's settings and its single-writer lock (see build.py, lock.py)
    DIR/shards/NAME.tokens     raw little-endian uint16 (uint32 if vocab_size > 65536) token ids, no
                               header; every document is followed by one EOS, so a uint16 shard is byte
                               for byte a `.data` stream of the original repo
    DIR/shards/NAME.offsets    raw little-endian int64, num_documents + 1 document start offsets into
                               NAME.tokens: 0, ..., num_tokens
    DIR/shards/NAME.json       the shard's manifest entry; its presence marks the shard complete

The global token stream is the concatenation of the shards in manifest order.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

from .errors import DataPipelineError

FORMAT = "hsa-token-index"
FORMAT_VERSION = 1
OFFSETS_DTYPE = np.dtype("<i8")
SHARDS = "shards"
SCAN_CHUNK = 1 << 24  # tokens per pass when a file is scanned: bounded memory for multi-GiB shards
SHARD_FIELDS = ("name", "tokens", "offsets", "num_tokens", "num_documents")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


class ShardWriter:
    """Streams whole documents into DIR/shards/NAME.*; nothing under a final name until `close()`.

    `write(tokens, lengths)`: tokens (N,) of the shard dtype, each document ending with its EOS; lengths
    (D,) int64 token counts per document, summing to N. The largest id is tracked as the tokens pass, so
    the entry's `max_token_id` costs no second read of the shard."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, extra: dict):
        self.shard_dir = Path(directory) / SHARDS
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.dtype, self.extra = name, np.dtype(dtype), extra
        self._tmp = self.shard_dir / f"{name}.tokens.tmp"
        self._f = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0
        self.max_token_id = -1

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens_n = np.ascontiguousarray(tokens, self.dtype)
        if len(tokens_n):
            self.max_token_id = max(self.max_token_id, int(tokens_n.max()))
        buf = tokens_n.data
        self._f.write(buf)
        self._sha.update(buf)
        self._lengths.append(np.asarray(lengths, np.int64))
        self.num_tokens += len(tokens)

    def close(self) -> dict:
        """Make the shard durable and complete; returns its manifest entry."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.shard_dir / f"{self.name}.tokens")
        offsets = np.zeros(1 + sum(len(x) for x in self._lengths), OFFSETS_DTYPE)
        if len(offsets) > 1:
            np.cumsum(np.concatenate(self._lengths), out=offsets[1:])
        assert offsets[-1] == self.num_tokens
        off_bytes = offsets.tobytes()
        atomic_write(self.shard_dir / f"{self.name}.offsets", off_bytes)
        meta = {"name": self.name, "tokens": f"{SHARDS}/{self.name}.tokens", "offsets": f"{SHARDS}/{self.name}.offsets",
                "num_tokens": int(self.num_tokens), "num_documents": len(offsets) - 1,
                "bytes": int(self.num_tokens * self.dtype.itemsize), "sha256": self._sha.hexdigest(),
                "offsets_sha256": hashlib.sha256(off_bytes).hexdigest(), "max_token_id": self.max_token_id,
                **self.extra}
        atomic_write_json(self.shard_dir / f"{self.name}.json", meta)
        return meta


def scan_max_token_id(path: Path, dtype: np.dtype) -> int:
    """The largest id in a .tokens file (-1 when empty), read in bounded chunks."""
    tokens = np.memmap(path, dtype, "r") if path.stat().st_size else np.empty(0, dtype)
    top = -1
    for lo in range(0, len(tokens), SCAN_CHUNK):
        top = max(top, int(tokens[lo:lo + SCAN_CHUNK].max()))
    return top


def write_manifest(directory: Path, *, tokenizer: dict, vocab_size: int, eos_id: int, shards: list[dict]) -> dict:
    """Assemble and atomically write DIR/manifest.json from complete shard entries (in stream order).

    Shard entries written before `max_token_id` existed (a build resumed across that change) get it by
    scanning their file. Refuses (DataPipelineError naming the shard) an id >= vocab_size: no writer
    should produce one, and a manifest must never claim a bound its shards break."""
    directory, dtype = Path(directory), token_dtype(vocab_size)
    shards = [s if "max_token_id" in s else {**s, "max_token_id": scan_max_token_id(directory / s["tokens"], dtype)}
              for s in shards]
    for s in shards:
        if s["max_token_id"] >= vocab_size:
            raise DataPipelineError(f"{directory / s['tokens']}: token id {s['max_token_id']} >= vocab_size "
                                    f"{vocab_size} (from {s.get('source', '?')}); the tokenizer's declared "
                                    f"vocab_size is wrong, no manifest written")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": tokenizer,
        "vocab_size": int(vocab_size), "eos_id": int(eos_id), "dtype": dtype.name,
        "total_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": sum(s["num_documents"] for s in shards),
        "max_token_id": max((s["max_token_id"] for s in shards), default=-1), "shards": shards,
    }
    atomic_write_json(Path(directory) / "manifest.json", manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """DIR/manifest.json, with its format checked; DataPipelineError naming the file otherwise."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataPipelineError(f"{path}: missing; is {directory} an index written by hsa-preprocess "
                                f"(an interrupted build writes it only at the end; rerun it)?") from e
    except ValueError as e:
        raise DataPipelineError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataPipelineError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataPipelineError(f"{path}: format_version {manifest.get('format_version')!r}, "
                                f"this code reads {FORMAT_VERSION}")
    for key in ("vocab_size", "eos_id", "dtype", "total_tokens", "num_documents", "shards"):
        if key not in manifest:
            raise DataPipelineError(f"{path}: missing field {key!r}")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataPipelineError(f"{path}: dtype {manifest['dtype']!r}, expected uint16 or uint32")
    if not isinstance(manifest["shards"], list):
        raise DataPipelineError(f"{path}: 'shards' is not a list")
    for k, s in enumerate(manifest["shards"]):
        missing = [f for f in SHARD_FIELDS if f not in s] if isinstance(s, dict) else list(SHARD_FIELDS)
        if missing:
            raise DataPipelineError(f"{path}: shard entry {k} lacks {missing}")
    return manifest


class TokenIndex:
    """Read-only view of an index as one global token stream, memory-mapped.

    Opening checks every shard file's size against the manifest (a truncated shard is an error naming
    the file); checksums are left to `verify`. Picklable (memmaps are reopened lazily), so grain
    workers can receive it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        self.vocab_size, self.eos_id = int(m["vocab_size"]), int(m["eos_id"])
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.total_tokens, self.num_documents = int(m["total_tokens"]), int(m["num_documents"])
        sizes = [int(s["num_tokens"]) for s in m["shards"]]
        # starts[k] = global position of shard k's first token; starts[-1] = total_tokens
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        for s in m["shards"]:
            self._check_size(s["tokens"], int(s["num_tokens"]) * self.dtype.itemsize)
            self._check_size(s["offsets"], (int(s["num_documents"]) + 1) * OFFSETS_DTYPE.itemsize)
        self._maps = None
        self._shard_max: list[int] | None = None

    def _check_size(self, rel: str, expected: int) -> None:
        path = self.directory / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise DataPipelineError(f"{path}: missing (listed in {self.directory / 'manifest.json'})") from e
        if size != expected:
            raise DataPipelineError(f"{path}: {size} bytes, manifest says {expected} (truncated or "
                                    f"overwritten; run `hsa-preprocess verify {self.directory}`)")

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def shard_max_token_ids(self) -> list[int]:
        """Each shard's largest id: from the manifest, or (an index written before manifests recorded it)
        by scanning that shard once; cached."""
        if self._shard_max is None:
            self._shard_max = [int(s["max_token_id"]) if "max_token_id" in s
                               else scan_max_token_id(self.directory / s["tokens"], self.dtype)
                               for s in self.manifest["shards"]]
        return self._shard_max

    @property
    def max_token_id(self) -> int:
        """The largest token id of the index (-1 for no tokens)."""
        if "max_token_id" in self.manifest:
            return int(self.manifest["max_token_id"])
        return max(self.shard_max_token_ids(), default=-1)

    def _open(self):
        if self._maps is None:
            # Plain ndarrays over mmap (np.memmap slices are ~10x slower to create, which the loader feels).
            self._maps = [(_map(self.directory / s["tokens"], self.dtype), _map(self.directory / s["offsets"], OFFSETS_DTYPE))
                          for s in self.manifest["shards"]]
        return self._maps

    def shard_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n_k,), offsets (d_k + 1,) int64) of shard k, memory-mapped."""
        return self._open()[k]

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start + length) of the global stream, may span shards; written into `out` when
        given, else into a new int32 (length,) array, which is returned."""
        if start < 0 or start + length > self.total_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.total_tokens})")
        if out is None:
            out = np.empty(length, np.int32)
        k = int(np.searchsorted(self.starts, start, "right")) - 1
        done = 0
        while done < length:
            tokens = self._open()[k][0]
            lo = start + done - int(self.starts[k])
            n = min(length - done, len(tokens) - lo)
            out[done:done + n] = tokens[lo:lo + n]
            done += n
            k += 1
        return out

    def document_ends(self, positions: np.ndarray) -> np.ndarray:
        """For global positions (n,) int64, the global position just past the EOS of the document holding
        each one; (n,) int64."""
        positions = np.asarray(positions, np.int64)
        shard = np.searchsorted(self.starts, positions, "right") - 1
        ends = np.empty_like(positions)
        for k in np.unique(shard):
            sel = shard == k
            offsets = self._open()[k][1]
            local = positions[sel] - self.starts[k]
            ends[sel] = self.starts[k] + offsets[np.searchsorted(offsets, local, "right")]
        return ends


def check_vocab(index: str | os.PathLike | TokenIndex, vocab_size: int) -> None:
    """Raise DataPipelineError (one line naming the index, the id and its shard) unless every token id of
    `index` (a directory or a TokenIndex) is < `vocab_size`, e.g. a model's embedding rows.

    An index whose manifest predates `max_token_id` is scanned only when its declared vocab_size exceeds
    `vocab_size` (otherwise the build's guarantee, ids < declared vocab_size, already settles it)."""
    index = index if isinstance(index, TokenIndex) else TokenIndex(index)
    if "max_token_id" not in index.manifest and index.vocab_size <= vocab_size:
        return
    top = index.max_token_id
    if top < vocab_size:
        return
    k = int(np.argmax(index.shard_max_token_ids()))
    raise DataPipelineError(f"{index.directory}: token id {top} (in {index.manifest['shards'][k]['tokens']}) "
                            f"is >= vocab_size {vocab_size}; the model needs vocab_size > {top}, or an "
                            f"index made with its tokenizer")


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype)
