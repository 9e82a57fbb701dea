"""Which pass-key answers of the training layout a model gets right: the first question of a sample (only
the needle holds the key) or the later copies (the previous answer holds it too). A diagnostic of the
extrapolation recipe (docs/results.md): a model can lower its training loss by copying answers.

    PYTHONPATH=. python3 benchmarks/passkey_copies.py runs/xp2000_seed2 --seq-len 512 --qa-repeats 6

Builds --samples fresh samples with data_pipeline.synthetic.passkey_sample (own seed), runs the model's
batch forward once per sample, and prints, per question copy, the share of samples whose key digits
are all argmax-predicted (teacher forced), and the mean distance from the needle to the first question.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from data_pipeline.synthetic import PASSKEY_DIGITS, passkey_sample
from data_pipeline.tokenizer import ByteTokenizer
from hsa_jax.cli.common import run_cli
from hsa_jax.loading import load_model

ANSWER = ". Answer: "


def starts_of(ids: np.ndarray, pattern: np.ndarray) -> list[int]:
    n = len(pattern)
    return [i for i in range(len(ids) - n + 1) if np.array_equal(ids[i:i + n], pattern)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="hsa-train workdir (or its checkpoints/ dir)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--qa-repeats", type=int, default=6, help="question/answer copies per sample (default 6)")
    p.add_argument("--digits", type=int, default=PASSKEY_DIGITS, help=f"key digits (default {PASSKEY_DIGITS})")
    p.add_argument("--samples", type=int, default=40, help="samples (default 40)")
    p.add_argument("--seed", type=int, default=123, help="seed of the samples (default 123)")
    a = p.parse_args(argv)
    return run_cli("passkey_copies", measure, a)


def measure(a) -> int:
    model = load_model(checkpoint=a.checkpoint, log=lambda msg: print(msg, file=sys.stderr))
    rng = np.random.default_rng(a.seed)
    tok = ByteTokenizer()
    answer, needle = np.asarray(tok.encode(ANSWER)), np.asarray(tok.encode(" The pass key is "))
    hits, distance = np.zeros(a.qa_repeats), []
    for _ in range(a.samples):
        ids = passkey_sample(rng, a.seq_len, a.qa_repeats, a.digits).astype(np.int32)
        logits_TxV = np.asarray(model(jnp.asarray(ids[None])))[0]
        starts = starts_of(ids, answer)[-a.qa_repeats:]
        distance.append(starts[0] - starts_of(ids, needle)[0])
        for r, s in enumerate(starts):
            first = s + len(answer) + 1  # after the space before the key
            hits[r] += np.array_equal(logits_TxV[first - 1:first - 1 + a.digits].argmax(-1), ids[first:first + a.digits])
    print(f"{a.checkpoint}: {a.samples} samples of {a.seq_len} tokens, {a.qa_repeats} copies; needle to first "
          f"answer {np.mean(distance):.0f} tokens on average (max {max(distance)})")
    print("key right, per copy: " + "  ".join(f"#{r + 1} {100 * h / a.samples:.0f}%" for r, h in enumerate(hits)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
