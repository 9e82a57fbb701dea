"""Pile preprocessing into a token index (`hsa-preprocess`) and grain loading over it.

Trainer API:
    make_loader(index_dir, seq_len=L, global_batch_size=B, mode="random"|"across_docs"|"sequential",
                seed=0, process_index=None, process_count=None, worker_count=0) -> grain.DataLoader
        batches {"input_ids": int32 (B // process_count, L + 1)}; iterator get_state()/set_state()
    ensure_bundled_corpus(dir) -> index dir (byte-tokenised pydoc topics, vocab 257, EOS 256)
    read_manifest(index_dir) -> dict (vocab_size, eos_id, total_tokens, max_token_id, ...)
    check_vocab(index_dir | TokenIndex, vocab_size) -> None; DataPipelineError if an id >= vocab_size
    DirLock(directory, what="...") -> single-writer lock (context manager; acquire()/release());
        LockedError names the holder's pid and host

Names are imported on first use, so build worker processes do not pay for importing grain (and jax).
"""

import importlib

_MODULES = {
    "build_index": "build", "import_raw": "build", "bundled_texts": "bundled", "ensure_bundled_corpus": "bundled",
    "DataPipelineError": "errors", "TokenIndex": "index", "read_manifest": "index", "check_vocab": "index",
    "DirLock": "lock", "LockedError": "lock", "MODES": "loader",
    "BatchSource": "loader", "WindowSource": "loader", "make_loader": "loader", "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer", "load_tokenizer": "tokenizer", "VerifyReport": "verify", "verify_index": "verify",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
