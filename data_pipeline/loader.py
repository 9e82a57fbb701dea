"""grain loading of an index: windows of L+1 tokens, batched per JAX process.

Window i of a loader is a pure function of (index, mode, seed, i). Row r of the global batch at step s is
window s*B + r (B = global batch size) whatever the process count; process p of P reads rows
p*b .. p*b+b-1 (b = B/P), its contiguous block of the batch (see BatchSource). So the global batch of a
step is the same tokens in the same order on any cluster shape, and a run's data position is just its
step: `make_loader(start_step=s)` continues at step s on any process count. A grain iterator state also
restores the exact position within one process layout.
"""

from __future__ import annotations

from pathlib import Path

import grain.python as grain
import numpy as np

from .errors import DataPipelineError
from .index import TokenIndex

MODES = ("random", "across_docs", "sequential")
# Random modes have no natural end; 2**40 samples outlast any run.
ENDLESS = 1 << 40
ACROSS_DOCS_BLOCK = 8


class WindowSource(grain.RandomAccessDataSource):
    """grain data source over a memory-mapped index. Record i: {"input_ids": int32 (L+1,)}, the inputs
    [0:L] and the labels [1:L+1] of one window.

    Modes (as in the original TextDataset; EOS separators stay in the stream, no −100 padding is needed
    because every window is full):
      random       window starting at a uniform position of the whole token stream (crosses documents);
      across_docs  `random_across_doc_sampling`: repeatedly pick a token position uniformly (that is a
                   document weighted by its length, and a uniform offset in it) and copy from there to
                   the end of that document (EOS included), until L+1 tokens are collected;
      sequential   window i is tokens [i*L, i*L + L + 1): each token is a label exactly once; for
                   evaluation. Its length is (total_tokens - 1) // L; the last partial window is dropped.
    """

    def __init__(self, index: TokenIndex | str | Path, seq_len: int, mode: str = "random", seed: int = 0,
                 num_samples: int | None = None):
        self.index = index if isinstance(index, TokenIndex) else TokenIndex(index)
        if mode not in MODES:
            raise DataPipelineError(f"mode {mode!r}: allowed {', '.join(MODES)}")
        if seq_len < 1 or seq_len + 1 > self.index.total_tokens:
            raise DataPipelineError(f"seq_len {seq_len}: windows of seq_len+1 tokens must fit in the "
                                    f"{self.index.total_tokens} tokens of {self.index.directory}")
        self.seq_len, self.mode, self.seed = seq_len, mode, seed
        natural = (self.index.total_tokens - 1) // seq_len if mode == "sequential" else ENDLESS
        if num_samples is not None and not 0 < num_samples <= natural:
            raise DataPipelineError(f"num_samples {num_samples}: allowed 1..{natural} for mode {mode}")
        self.num_samples = num_samples or natural

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"input_ids": self.window(int(i), np.empty(self.seq_len + 1, np.int32))}

    def window(self, i: int, out: np.ndarray) -> np.ndarray:
        """Write window i into `out` (int32 (L+1,)) and return it."""
        n = self.seq_len + 1
        if self.mode == "sequential":
            return self.index.read(i * self.seq_len, n, out)
        rng = np.random.default_rng([self.seed, i])
        total = self.index.total_tokens
        if self.mode == "random":
            return self.index.read(int(rng.integers(total - n + 1)), n, out)
        filled = 0
        while filled < n:
            # Positions are drawn in blocks for one vectorised document lookup each (the block size is
            # part of the sampling definition: changing it changes the windows).
            starts = rng.integers(total, size=ACROSS_DOCS_BLOCK)
            for pos, end in zip(starts.tolist(), self.index.document_ends(starts).tolist()):
                take = min(end - pos, n - filled)
                self.index.read(pos, take, out[filled:filled + take])
                filled += take
                if filled == n:
                    break
        return out

    def __repr__(self) -> str:
        return (f"WindowSource({str(self.index.directory)!r}, seq_len={self.seq_len}, mode={self.mode!r}, "
                f"seed={self.seed}, num_samples={self.num_samples})")


class BatchSource(grain.RandomAccessDataSource):
    """Record r is this process's rows of the global batch at step (start_step + r) mod steps:
    {"input_ids": int32 (b, L+1)} with row j = window step*B + row_start + j of `windows`. Whole batches
    as records keep grain's per-record overhead off the per-window path; the step offset lets a run
    resume at any step without replaying the iterator."""

    def __init__(self, windows: WindowSource, global_batch_size: int, row_start: int, rows: int,
                 start_step: int = 0):
        self.windows, self.global_batch_size = windows, global_batch_size
        self.row_start, self.rows, self.start_step = row_start, rows, start_step
        self.steps = len(windows) // global_batch_size

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        step = (self.start_step + int(r)) % self.steps
        out = np.empty((self.rows, self.windows.seq_len + 1), np.int32)
        first = step * self.global_batch_size + self.row_start
        for j in range(self.rows):
            self.windows.window(first + j, out[j])
        return {"input_ids": out}

    def __repr__(self) -> str:
        return (f"BatchSource({self.windows!r}, global_batch_size={self.global_batch_size}, "
                f"rows={self.row_start}..{self.row_start + self.rows - 1}, start_step={self.start_step})")


def make_loader(index_dir: str | Path, *, seq_len: int, global_batch_size: int, mode: str = "random",
                seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                worker_count: int = 0, worker_buffer_size: int = 2, num_samples: int | None = None,
                read_threads: int = 1, repeat: bool = False, start_step: int = 0) -> grain.DataLoader:
    """A grain DataLoader yielding {"input_ids": int32 (global_batch_size // process_count, seq_len + 1)}:
    process p's contiguous rows p*b .. p*b+b-1 of each global batch, starting at global step `start_step`.

    process_index/process_count default to jax.process_index()/jax.process_count(). worker_count > 0
    prefetches in that many worker processes (same batches as 0); read_threads is grain's reading thread
    count within a process (1 suffices at the measured rates, see docs/benchmarks.md). `iter(loader)` gives an iterator with
    `get_state() -> bytes` (JSON) and `set_state(bytes)`; a loader built with the same arguments and
    restored from a state continues with exactly the next batch. Random modes never end (2**40 samples
    unless num_samples); sequential ends after (total_tokens - 1) // seq_len // global_batch_size steps,
    or with repeat=True starts over (same order) as often as asked (training for more than one epoch);
    a sequential start_step counts from the first epoch (it is taken modulo the epoch length).
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise DataPipelineError(f"process_index {process_index} outside [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataPipelineError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                                f"process_count {process_count}")
    if worker_count > 0:
        from absl import flags

        # grain's worker pool reads absl flags, which only absl.app parses; use their defaults otherwise.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    source = WindowSource(index_dir, seq_len, mode, seed, num_samples)
    if len(source) < global_batch_size:
        raise DataPipelineError(f"{index_dir}: {len(source)} {mode} windows of {seq_len + 1} tokens, fewer "
                                f"than one global batch of {global_batch_size}")
    if start_step < 0:
        raise DataPipelineError(f"start_step {start_step}: must be >= 0")
    rows = global_batch_size // process_count
    batches = BatchSource(source, global_batch_size, process_index * rows, rows, start_step)
    if not repeat and start_step >= len(batches):
        raise DataPipelineError(f"start_step {start_step}: the {mode} loader has only {len(batches)} steps "
                                f"(use repeat=True for more than one pass)")
    return grain.DataLoader(
        data_source=batches,
        sampler=grain.IndexSampler(num_records=len(batches) - (0 if repeat else start_step),
                                   shard_options=grain.NoSharding(), shuffle=False,
                                   num_epochs=None if repeat else 1, seed=seed),
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=grain.NoSharding(),
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads * 2),
    )
