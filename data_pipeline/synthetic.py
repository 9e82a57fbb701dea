"""Synthetic retrieval corpus for the extrapolation demo (README "Extrapolation demo").

Two byte-level token indexes (the bundled byte tokenizer: ids 0-255 are UTF-8 bytes, 256 is EOS):

  haystack   filler text: sentences drawn at random from a small set (RULER's "noise" haystack style),
             one document per `doc_tokens` tokens. hsa-eval reads its haystacks from here.
  train      `samples` documents of exactly `seq_len` tokens, each a single-needle (S-NIAH) sample in the
             format of hsa_jax.eval.ruler.RulerTasks.s_niah: filler with the needle
             " |One of the special magic numbers for long-context is:" + 7 random key bytes + "|" at a
             uniform position, and the question "... Answer: " + key + EOS at the end. Keys and positions
             come from this generator's own seed (not from the haystack, whose few distinct first/last
             bytes would repeat keys). Train with data.mode=sequential and data.seq_len=seq_len so that
             every window is one sample.
             With --task passkey (the CPU demo's recipe), each sample is instead in the layout of
             RulerTasks.passkey with a --key-digits key (hsa-eval tasks passkey / passkey2 / passkey3),
             its question/answer block repeated --qa-repeats times to raise the share of answer tokens.
             --tail-jitter J ends each sample with 0..J filler tokens (uniform) after its final EOS, so that
             the question does not always sit at the same offset within a chunk: DRT retrieves once per
             chunk, by the landmark of the chunk before, and a DRT trained with the question at one fixed
             offset answers at that offset only (docs/results.md "DRT and where the question falls").

    python -m data_pipeline.synthetic OUT_DIR [--samples 50000] [--seq-len 512] [--seed 0]
    python -m data_pipeline.synthetic OUT_DIR --task passkey --key-digits 2 --qa-repeats 6 --samples 20000
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import numpy as np

from .index import read_manifest, token_dtype, write_manifest, ShardWriter
from .tokenizer import ByteTokenizer

FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.", "The river flows to the sea.", "Birds sing in the morning.",
                    "A cat sleeps on the mat.")
NEEDLE = " |One of the special magic numbers for long-context is:"
NEEDLE_END = "|"
QUESTION = " What is the special magic number for long-context mentioned in the provided text? Answer: "
KEY_LEN = 7
KEY_LOW, KEY_HIGH = 100, 256  # the byte tokenizer's RulerTasks range (EOS 256 excluded)


def _enc(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int64)


def filler(rng: np.random.Generator, n_tokens: int) -> np.ndarray:
    """At least n_tokens byte tokens of random filler sentences (space separated), cut to n_tokens."""
    encoded = [_enc(s + " ") for s in FILLER_SENTENCES]
    mean = np.mean([len(e) for e in encoded])
    picks = rng.integers(len(encoded), size=int(n_tokens / mean * 1.3) + 8)
    out = np.concatenate([encoded[i] for i in picks])
    while len(out) < n_tokens:
        out = np.concatenate([out, encoded[int(rng.integers(len(encoded)))]])
    return out[:n_tokens]


def niah_sample(rng: np.random.Generator, seq_len: int) -> np.ndarray:
    """One S-NIAH sequence of exactly seq_len tokens (the RulerTasks.s_niah layout, own randomness)."""
    key = rng.integers(KEY_LOW, KEY_HIGH, size=KEY_LEN)
    needle = np.concatenate([_enc(NEEDLE), key, _enc(NEEDLE_END)])
    prompt = np.concatenate([_enc(QUESTION), key, [ByteTokenizer.eos_id]])
    body = filler(rng, seq_len - len(needle) - len(prompt))
    start = int(rng.integers(len(body) + 1))
    out = np.concatenate([body[:start], needle, body[start:], prompt])
    assert len(out) == seq_len
    return out


PASSKEY_DIGITS = 5  # RulerTasks.passkey's default


def passkey_sample(rng: np.random.Generator, seq_len: int, qa_repeats: int = 2,
                   digits: int = PASSKEY_DIGITS) -> np.ndarray:
    """One pass-key sequence of exactly seq_len tokens, in the layout of hsa_jax.eval.ruler.RulerTasks.passkey
    (own randomness): filler with the needle " The pass key is K. Remember it. K is the pass key." at a
    uniform position, then " What is the pass key? The pass key is" + ". Answer: " + " K" + EOS. With
    qa_repeats > 1 the question/answer block is repeated (same K) to raise the share of answer tokens;
    every repeat is still beyond the SWA window from the previous key, so it is answered by retrieval."""
    key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits - 1)))
    needle = _enc(f" The pass key is {key}. Remember it. {key} is the pass key.")
    qa = np.concatenate([_enc(" What is the pass key? The pass key is"), _enc(". Answer: "), _enc(f" {key}"),
                         [ByteTokenizer.eos_id]])
    prompt = np.concatenate([qa] * qa_repeats)
    body = filler(rng, seq_len - len(needle) - len(prompt))
    start = int(rng.integers(len(body) + 1))
    out = np.concatenate([body[:start], needle, body[start:], prompt])
    assert len(out) == seq_len
    return out


def mk_passkey_sample(rng: np.random.Generator, seq_len: int, qa_repeats: int = 2,
                      digits: int = PASSKEY_DIGITS, keys: int = 4) -> np.ndarray:
    """One multi-key pass-key sequence of exactly seq_len tokens, in the layout of
    hsa_jax.eval.ruler.RulerTasks.mk_passkey (own randomness): `keys` needles " The pass key of NAME is K.
    Remember it. K is the pass key of NAME." (distinct 3-letter names and keys) at uniform positions, then
    qa_repeats questions " What is the pass key of NAME? The pass key of NAME is. Answer:  K" + EOS, each
    about a different needle: no answer can be copied from an earlier one."""
    names = ["".join(chr(65 + c // 26 ** i % 26) for i in range(3)) for c in rng.choice(26 ** 3, keys, replace=False)]
    vals = [str(v) for v in rng.choice(np.arange(10 ** (digits - 1), 10 ** digits - 1), size=keys, replace=False)]
    needles = [_enc(f" The pass key of {n} is {v}. Remember it. {v} is the pass key of {n}.") for n, v in zip(names, vals)]
    asked = rng.permutation(keys)[:qa_repeats]
    prompt = np.concatenate([np.concatenate([_enc(f" What is the pass key of {names[i]}? The pass key of {names[i]} is"),
                                             _enc(". Answer: "), _enc(f" {vals[i]}"), [ByteTokenizer.eos_id]])
                             for i in asked])
    body = filler(rng, seq_len - sum(len(n) for n in needles) - len(prompt))
    cuts = np.sort(rng.integers(len(body) + 1, size=keys))
    pieces = np.split(body, cuts)
    out = np.concatenate([x for piece, needle in zip(pieces, needles + [np.zeros(0, np.int64)])
                          for x in (piece, needle)] + [prompt])
    assert len(out) == seq_len
    return out


def _write(directory: pathlib.Path, docs) -> dict:
    tok = ByteTokenizer()
    dtype = token_dtype(tok.vocab_size)
    writer = ShardWriter(directory, "shard-00000", dtype, {})
    for doc in docs:
        writer.write(doc.astype(dtype), np.array([len(doc)], np.int64))
    shard = writer.close()
    return write_manifest(directory, tokenizer=tok.describe(), vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                          shards=[shard])


def build_synthetic(out_dir: str | pathlib.Path, *, samples: int = 50000, seq_len: int = 512, seed: int = 0,
                    haystack_docs: int = 64, doc_tokens: int = 65536, task: str = "s_niah",
                    qa_repeats: int = 2, key_digits: int = PASSKEY_DIGITS, keys: int = 4,
                    tail_jitter: int = 0) -> dict[str, pathlib.Path]:
    """Writes OUT/train and OUT/haystack (skipped when already complete); returns their paths."""
    out = pathlib.Path(out_dir)
    paths = {"train": out / "train", "haystack": out / "haystack"}
    rng = np.random.default_rng(seed)
    if not (paths["haystack"] / "manifest.json").exists():
        eos = np.array([ByteTokenizer.eos_id])
        _write(paths["haystack"], (np.concatenate([filler(rng, doc_tokens - 1), eos]) for _ in range(haystack_docs)))
    if not (paths["train"] / "manifest.json").exists():
        rng = np.random.default_rng([seed, 1])
        if task == "passkey":
            make = functools.partial(passkey_sample, rng, qa_repeats=qa_repeats, digits=key_digits)
        elif task == "mk_passkey":
            make = functools.partial(mk_passkey_sample, rng, qa_repeats=qa_repeats, digits=key_digits, keys=keys)
        elif task == "s_niah":
            make = functools.partial(niah_sample, rng)
        else:
            raise ValueError(f"unknown task {task!r}: s_niah, passkey or mk_passkey")

        def sample():  # each sample ends with EOS (the end of its question prompt), then the jitter's filler
            if not tail_jitter:  # (no draw: the data of earlier versions is reproduced)
                return make(seq_len)
            j = int(rng.integers(tail_jitter + 1))
            return np.concatenate([make(seq_len - j), filler(rng, j)])

        _write(paths["train"], (sample() for _ in range(samples)))
    for p in paths.values():
        read_manifest(p)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=pathlib.Path, help="output folder: OUT/train and OUT/haystack token indexes")
    p.add_argument("--samples", type=int, default=50000, help="training samples (documents) to write (default 50000)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sample (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys, needle positions and filler (default 0)")
    p.add_argument("--haystack-docs", type=int, default=64, help="filler documents in OUT/haystack, hsa-eval's --haystack (default 64)")
    p.add_argument("--doc-tokens", type=int, default=65536, help="tokens per haystack document (default 65536)")
    p.add_argument("--task", choices=("s_niah", "passkey", "mk_passkey"), default="s_niah",
                   help="training-sample format: hsa-eval's s_niah (7 random key bytes), passkey (--key-digits "
                        "digits) or mk_passkey (--keys named pass keys, --qa-repeats of them asked)")
    p.add_argument("--qa-repeats", type=int, default=2, help="passkey, mk_passkey: question/answer blocks per sample")
    p.add_argument("--key-digits", type=int, default=PASSKEY_DIGITS, help="passkey, mk_passkey: digits of the key")
    p.add_argument("--keys", type=int, default=4, help="mk_passkey: needles per sample (default 4)")
    p.add_argument("--tail-jitter", type=int, default=0,
                   help="end each sample with 0..J filler tokens after its EOS, J uniform (default 0: none)")
    a = p.parse_args(argv)
    if a.task == "mk_passkey" and not 1 <= a.qa_repeats <= a.keys:
        p.error(f"--qa-repeats {a.qa_repeats} with --keys {a.keys}: mk_passkey asks about distinct needles, so "
                f"1 <= --qa-repeats <= --keys")
    if a.task == "mk_passkey" and a.keys > 10 ** a.key_digits - 10 ** (a.key_digits - 1) - 1:
        p.error(f"--keys {a.keys}: more than the {a.key_digits}-digit keys there are")
    if not 0 <= a.tail_jitter <= a.seq_len // 4:
        p.error(f"--tail-jitter {a.tail_jitter}: allowed 0 <= J <= seq_len/4 = {a.seq_len // 4}")
    paths = build_synthetic(a.out, samples=a.samples, seq_len=a.seq_len, seed=a.seed,
                            haystack_docs=a.haystack_docs, doc_tokens=a.doc_tokens, task=a.task,
                            qa_repeats=a.qa_repeats, key_digits=a.key_digits, keys=a.keys, tail_jitter=a.tail_jitter)
    for name, path in paths.items():
        m = read_manifest(path)
        print(f"{name}: {path} ({m['total_tokens']} tokens, {m['num_documents']} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
