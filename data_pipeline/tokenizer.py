"""The project's tokenizers (`build`, hsa-generate, hsa-eval's RULER tasks): the built-in byte tokenizer
and HF `tokenizers` files, both loaded by `load_tokenizer`.

Both expose `encode_documents(texts) -> (tokens, lengths)`: every document becomes its token ids followed
by exactly one EOS, and no other special token is added (not even when the text itself contains the
literal string of a special token); `encode(text)`, the ids of one text without the EOS; `eos_id`;
`vocab_size` (every id, added tokens included) and `base_vocab_size` (the ordinary tokens lie below it:
the range RULER draws random key ids from, HF's `vocab_size` semantics).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .errors import DataPipelineError

BYTES = "bytes"


def _clean(text: str) -> str:
    """JSON may decode to lone UTF-16 surrogates, which no UTF-8 encoder accepts; replace them by '?'."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _with_eos(pieces: list[np.ndarray], eos_id: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) + 1 for p in pieces), np.int64, len(pieces))
    out = np.empty(int(lengths.sum()), dtype)
    eos_pos = np.cumsum(lengths) - 1
    body = np.ones(len(out), bool)
    body[eos_pos] = False
    if pieces:
        out[body] = np.concatenate(pieces)
    out[eos_pos] = eos_id
    return out, lengths


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes of the text, 256 is EOS; vocab_size 257 (models round it up)."""

    vocab_size = 257
    base_vocab_size = 256  # the bytes; EOS is the only other id
    eos_id = 256
    fingerprint = "bytes-utf8-v1"

    def describe(self) -> dict:
        return {"kind": BYTES, "fingerprint": self.fingerprint,
                "description": "ids 0-255 are UTF-8 bytes, 256 is EOS; vocab_size 257 is not padded "
                               "(round the embedding up in the model config)"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "replace"))

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces = [np.frombuffer(t.encode("utf-8", "replace"), np.uint8) for t in texts]
        return _with_eos(pieces, self.eos_id, np.uint16)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        segments = np.split(ids, np.flatnonzero(ids == self.eos_id))
        bodies = [segments[0]] + [s[1:] for s in segments[1:]]  # drop the EOS that starts each split
        return b"<|endoftext|>".join(b.astype(np.uint8).tobytes() for b in bodies).decode("utf-8", "replace")


class HFTokenizer:
    """A `tokenizer.json` of the HF `tokenizers` library (e.g. GPT-NeoX-20B, the Pile tokenizer)."""

    def __init__(self, path: str | Path, eos_token: str = "<|endoftext|>"):
        import tokenizers

        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataPipelineError(f"{self.path}: cannot load tokenizer ({e})") from e
        # Special-token strings inside a document are tokenised as plain text, so EOS only ends documents.
        self._tok.encode_special_tokens = True
        eos = self._tok.token_to_id(eos_token)
        if eos is None:
            raise DataPipelineError(f"{self.path}: EOS token {eos_token!r} is not in the vocabulary "
                                    f"(pass the right --eos-token)")
        self.eos_id = int(eos)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.base_vocab_size = int(self._tok.get_vocab_size(with_added_tokens=False))  # 50254 for GPT-NeoX-20B
        self.fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.eos_token = eos_token

    def describe(self) -> dict:
        return {"kind": "hf-tokenizers", "path": str(self.path), "fingerprint": self.fingerprint,
                "eos_token": self.eos_token}

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates
            return self._tok.encode(_clean(text), add_special_tokens=False).ids

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        try:
            encs = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # lone surrogates; rare, so clean only when needed
            encs = self._tok.encode_batch_fast([_clean(t) for t in texts], add_special_tokens=False)
        return _with_eos([np.asarray(e.ids, dtype) for e in encs], self.eos_id, dtype)

    def decode(self, ids) -> str:
        return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def load_tokenizer(spec: str, eos_token: str = "<|endoftext|>") -> ByteTokenizer | HFTokenizer:
    """`spec` is "bytes" or the path of a `tokenizer.json`."""
    if spec == BYTES:
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise DataPipelineError(f"--tokenizer {spec!r}: no such file (give a tokenizer.json or 'bytes')")
    return HFTokenizer(path, eos_token)
