"""Pile preprocessing into a token index (`hsa-preprocess`) and grain loading over it.

Trainer API:
    make_loader(index_dir, seq_len=L, global_batch_size=B, mode="random"|"across_docs"|"sequential",
                seed=0, process_index=None, process_count=None, worker_count=0) -> grain.DataLoader
        batches {"input_ids": int32 (B // process_count, L + 1)}; iterator get_state()/set_state()
    ensure_bundled_corpus(dir) -> index dir (byte-tokenised pydoc topics, vocab 257, EOS 256)
    read_manifest(index_dir) -> dict (vocab_size, eos_id, total_tokens, ...)
"""

from .build import build_index, import_raw
from .bundled import bundled_texts, ensure_bundled_corpus
from .errors import DataPipelineError
from .index import TokenIndex, read_manifest
from .loader import MODES, BatchSource, WindowSource, make_loader
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from .verify import VerifyReport, verify_index

__all__ = [
    "MODES", "BatchSource", "ByteTokenizer", "DataPipelineError", "HFTokenizer", "TokenIndex", "VerifyReport", "WindowSource",
    "build_index", "bundled_texts", "ensure_bundled_corpus", "import_raw", "load_tokenizer", "make_loader",
    "read_manifest", "verify_index",
]
