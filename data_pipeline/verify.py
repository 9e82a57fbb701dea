"""`verify`: re-read every shard and check it against the manifest."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DataPipelineError
from .index import OFFSETS_DTYPE, SCAN_CHUNK, read_manifest, token_dtype


@dataclasses.dataclass
class VerifyReport:
    """`problems`: one line per failed check, each naming the file; empty means the index is sound."""

    directory: Path
    shards_checked: int = 0
    tokens_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.directory}: {self.shards_checked} shards, {self.tokens_checked:,} tokens checked: "
                + ("OK" if self.ok else f"{len(self.problems)} problem(s)"))
        return "\n".join([head] + [f"  FAIL {p}" for p in self.problems])


def _check_shard(directory: Path, shard: dict, dtype: np.dtype, vocab_size: int, eos_id: int) -> list[str]:
    tok_path, off_path = directory / shard["tokens"], directory / shard["offsets"]
    n, docs = int(shard["num_tokens"]), int(shard["num_documents"])
    problems = []
    for path, expected in ((tok_path, n * dtype.itemsize), (off_path, (docs + 1) * OFFSETS_DTYPE.itemsize)):
        if not path.exists():
            return [f"{path}: missing"]
        if path.stat().st_size != expected:
            return [f"{path}: {path.stat().st_size} bytes, manifest says {expected} (truncated?)"]
    off_bytes = off_path.read_bytes()
    if hashlib.sha256(off_bytes).hexdigest() != shard["offsets_sha256"]:
        problems.append(f"{off_path}: sha256 mismatch (file changed since it was written)")
    offsets = np.frombuffer(off_bytes, OFFSETS_DTYPE)
    if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 1):
        problems.append(f"{off_path}: offsets must rise strictly from 0 to num_tokens={n}")
        return problems
    tokens = np.memmap(tok_path, dtype, "r")
    sha = hashlib.sha256()
    n_eos, top = 0, -1
    for lo in range(0, n, SCAN_CHUNK):
        block = np.asarray(tokens[lo:lo + SCAN_CHUNK])
        sha.update(block.data)
        n_eos += int(np.count_nonzero(block == eos_id))
        top = max(top, int(block.max()))
        bad = np.flatnonzero(block >= vocab_size)
        if len(bad) and len(problems) < 10:
            problems.append(f"{tok_path}: token {int(block[bad[0]])} at position {lo + int(bad[0])} "
                            f">= vocab_size {vocab_size}")
    if "max_token_id" in shard and shard["max_token_id"] != top:
        problems.append(f"{tok_path}: largest id {top}, manifest says max_token_id {shard['max_token_id']}")
    if sha.hexdigest() != shard["sha256"]:
        problems.append(f"{tok_path}: sha256 mismatch (corrupt or changed since it was written)")
    ends = np.asarray(tokens[offsets[1:] - 1])
    if np.any(ends != eos_id):
        doc = int(np.flatnonzero(ends != eos_id)[0])
        problems.append(f"{tok_path}: document {doc} does not end with EOS {eos_id}")
    elif n_eos != docs:
        problems.append(f"{tok_path}: {n_eos} EOS tokens for {docs} documents (EOS inside a document)")
    return problems


def verify_index(directory: str | Path, progress: bool = True) -> VerifyReport:
    """Check the manifest (fields, totals, dtype), then every shard: sizes, sha256 of tokens and offsets,
    offsets rising from 0 to num_tokens, one EOS ending each document and none elsewhere, ids < vocab,
    max_token_id (when recorded) equal to the largest id."""
    directory = Path(directory)
    report = VerifyReport(directory)
    try:
        m = read_manifest(directory)
    except DataPipelineError as e:
        report.problems.append(str(e))
        return report
    mpath = directory / "manifest.json"
    vocab, eos = int(m["vocab_size"]), int(m["eos_id"])
    if m["dtype"] != token_dtype(vocab).name:
        report.problems.append(f"{mpath}: dtype {m['dtype']} but vocab_size {vocab} needs {token_dtype(vocab).name}")
        return report
    if not 0 <= eos < vocab:
        report.problems.append(f"{mpath}: eos_id {eos} outside [0, vocab_size={vocab})")
    for key in ("total_tokens", "num_documents"):
        per_shard = "num_tokens" if key == "total_tokens" else key
        total = sum(int(s[per_shard]) for s in m["shards"])
        if total != m[key]:
            report.problems.append(f"{mpath}: {key} {m[key]} but the shards sum to {total}")
    if "max_token_id" in m and all("max_token_id" in s for s in m["shards"]):
        top = max((int(s["max_token_id"]) for s in m["shards"]), default=-1)
        if m["max_token_id"] != top:
            report.problems.append(f"{mpath}: max_token_id {m['max_token_id']} but the shards' largest is {top}")
    for shard in tqdm(m["shards"], desc="verify", unit="shard", disable=not progress):
        report.problems += _check_shard(directory, shard, token_dtype(vocab), vocab, eos)
        report.shards_checked += 1
        report.tokens_checked += int(shard["num_tokens"])
    return report
