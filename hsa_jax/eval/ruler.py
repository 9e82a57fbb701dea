"""RULER-style long-context tasks, built as the original `reader/ruler_collator.py` builds them
(docs/model_math.md "RULER tasks").

Every builder takes a haystack of token ids (its length L is the task length) and returns `Task(ids, q, a)`:
the full sequence, the question part and the answer part, with ids = q ++ a. The scoring
(docs/model_math.md "RULER scoring"; the original's eval_ruler.py) feeds q ++ a teacher-forced and counts a
hit when the argmax predictions of every answer token except the final EOS are right.

Seeding: the original seeds `random.Random(inputs[0] * inputs[-1])` with torch int32 scalars, which is
non-reproducible (docs/model_math.md "RULER seeding"); here the seed is the Python int product
`int(h[0]) * int(h[-1])`. From that seed on, the random draws (a numpy RandomState seeded with 16 words from
it) and their order are the original's, so for a given haystack and tokenizer the sequences are the
original's token for token.

Tasks: "s_niah" (task 0), "mq_niah" (task 1), "vt" (task 2), "fwe" (task 3) are the original's. Two
are ours, for the issue's task list: "mk_niah" is task 1 with a single query (6 key-value needles, one
asked: the other five are distractors), and "passkey" is the classic pass-key retrieval (a 5-digit
number in the haystack, its digits asked for), built with the same seeding and insertion rules;
"mk_passkey" is its multi-key form (4 named pass keys, one asked).
"""

from __future__ import annotations

import dataclasses
import math
import random
import string

import numpy as np

VOCAB_LOW = 100
VT_COMMA = 13  # ',' in GPT-NeoX: the original cuts VT answers at the last comma token


@dataclasses.dataclass
class Task:
    ids: np.ndarray  # (L',) int64, q ++ a
    q: np.ndarray
    a: np.ndarray

    @property
    def scored(self) -> int:
        """Number of scored answer tokens (the final EOS is not scored)."""
        return len(self.a) - 1


class TextTokenizer:
    """What the builders need: encode(text) -> list[int] (no special tokens), vocab_size (the high end of
    random key ids, exclusive) and eos_token_id."""

    def __init__(self, encode, vocab_size: int, eos_token_id: int, comma_id: int):
        self.encode, self.vocab_size, self.eos_token_id, self.comma_id = encode, vocab_size, eos_token_id, comma_id

    @classmethod
    def load(cls, spec: str) -> "TextTokenizer":
        """"bytes" (ids 0-255, EOS 256; keys drawn below 256) or a tokenizer.json path (HF `vocab_size`
        semantics: the base vocabulary without added tokens, 50254 for GPT-NeoX-20B), loaded by the
        project's one tokenizer loader, data_pipeline.load_tokenizer."""
        from data_pipeline.tokenizer import load_tokenizer

        tok = load_tokenizer(spec)
        return cls(tok.encode, tok.base_vocab_size, tok.eos_id, tok.encode(",")[0])


def _rng(haystack) -> np.random.RandomState:
    seeder = random.Random(int(haystack[0]) * int(haystack[-1]))
    return np.random.RandomState(seed=[seeder.randint(0, 2 ** 32 - 1) for _ in range(16)])


def _name(rng, letters: str, n: int) -> str:
    return "".join(rng.choice(list(letters)) for _ in range(n))


def _distinct(draw, n: int) -> list:
    """The first n distinct values of repeated draw() calls, in order (the draws of the duplicates count)."""
    out = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _insert_needles(ids: np.ndarray, needles: list, rng) -> np.ndarray:
    """Needle k goes before haystack position p_k (distinct positions from a shuffled range), inserted
    one after another; later positions past an insertion shift by its length."""
    where = list(range(len(ids)))
    rng.shuffle(where)
    where = where[:len(needles)]
    for k, needle in enumerate(needles):
        ids = np.insert(ids, where[k], needle)
        for j in range(k + 1, len(needles)):
            if where[j] > where[k]:
                where[j] += len(needle)
    return ids


class RulerTasks:
    def __init__(self, tokenizer: TextTokenizer, vocab_low: int = VOCAB_LOW):
        self.tok = tokenizer
        enc = tokenizer.encode
        self.low, self.high, self.eos = vocab_low, tokenizer.vocab_size, tokenizer.eos_token_id
        self.niah_needle = enc(" |One of the special magic numbers for long-context is:")
        self.niah_end = enc("|")
        self.niah_question = enc(" What is the special magic number for long-context mentioned in the provided text? Answer: ")
        self.vt_question = enc(" Find all variables that are assigned the value ")
        self.answer_prefix = enc(". Answer: ")

    # ----- task 0 -----
    def s_niah(self, haystack, length: int = 7) -> Task:
        h = np.asarray(haystack, np.int64)
        rng = _rng(h)
        key = np.array(rng.randint(self.low, self.high, size=length))
        needle = np.concatenate((self.niah_needle, key, self.niah_end))
        prompt = np.concatenate((self.niah_question, key, [self.eos]))
        L = len(h)
        start = rng.randint(L - len(needle) - len(prompt))
        ids = np.insert(h, start, needle)
        ids = np.insert(ids, L - len(prompt), prompt)[:L].astype(np.int64)
        return Task(ids, ids[:-(length + 1)], ids[-(length + 1):])

    # ----- tasks 1 and mk_niah -----
    def mq_niah(self, haystack, total_var: int = 6, var_name_len: int = 5, var_len: int = 5,
                num_queries: int = 2) -> Task:
        h = np.asarray(haystack, np.int64)
        rng = _rng(h)
        names = _distinct(lambda: _name(rng, string.ascii_uppercase, var_name_len), total_var)
        vals = _distinct(lambda: f"{rng.randint(10 ** var_len, 10 ** (var_len + 1) - 1)}", total_var)
        needles = [self.tok.encode(f"| One of the special magic numbers for {n} is {v}.|") for n, v in zip(names, vals)]
        rng.shuffle(needles)
        question = self.tok.encode(
            f" What are all the special magic numbers for {' and '.join(names[:num_queries])} mentioned in the provided text?")
        answer = self.tok.encode(" ".join(vals[:num_queries]))
        return self._assemble(h, needles, question, answer, rng)

    def mk_niah(self, haystack) -> Task:
        return self.mq_niah(haystack, num_queries=1)

    def _assemble(self, h, needles, question, answer, rng) -> Task:
        answer_ids = np.concatenate((self.answer_prefix, answer, [self.eos]))
        body = h[:-len(answer_ids) - len(question)]
        body = body[:-sum(len(n) for n in needles)]
        ids = np.concatenate((_insert_needles(body, needles, rng), question, answer_ids)).astype(np.int64)
        cut = len(answer) + 1
        return Task(ids, ids[:-cut], ids[-cut:])

    # ----- task 2 -----
    def vt(self, haystack, total_var: int = 6, max_hops: int = 2, varlen: int = 7, eval_cut: bool = True) -> Task:
        """With eval_cut (as eval_ruler does), the answer is cut after its last comma token: only the
        last variable name (and the EOS) remain in `a`."""
        h = np.asarray(haystack, np.int64)
        rng = _rng(h)
        hops = max_hops + 1
        values = []
        while len(values) < total_var // hops:
            v = f"{rng.randint(10 ** varlen, 10 ** (varlen + 1) - 1)}"
            if v not in values:
                values.append(v)
        names = []
        while len(names) < total_var:
            n = _name(rng, string.ascii_uppercase, 5)
            if n not in names:
                names.append(n)
        needles = []
        for i in range(0, total_var, hops):
            needles.append(self.tok.encode(f"|VAR {names[i]} = {values[i // hops]}|"))
            needles.append(self.tok.encode(f"|VAR {names[i + 1]} = {names[i]}|"))
            needles.append(self.tok.encode(f"|VAR {names[i + 2]} = {names[i + 1]}|"))
        rng.shuffle(needles)
        question = self.vt_question + self.tok.encode(values[0])
        answer = self.tok.encode(", ".join(names[:hops]))
        task = self._assemble(h, needles, question, answer, rng)
        if eval_cut:
            last = np.flatnonzero(task.a == self.tok.comma_id)[-1]
            task = Task(task.ids, np.concatenate([task.q, task.a[:last + 1]]), task.a[last + 1:])
        return task

    # ----- task 3 -----
    def fwe(self, haystack, var_len: int = 5, alpha: float = 2.0, vocab_size: int = 2000) -> Task:
        h = np.asarray(haystack, np.int64)
        rng = _rng(h)
        words = [_name(rng, string.ascii_lowercase, var_len) for _ in range(vocab_size)]
        while len(set(words)) < vocab_size:
            words.append(_name(rng, string.ascii_lowercase, var_len))
        words = sorted(set(words))
        rng.shuffle(words)
        words[0] = "..."
        zeta = math.pi ** 2 / 6 if alpha == 2.0 else sum(k ** -alpha for k in range(1, 10 ** 6))
        template = ("[INST] Read the following coded text and track the frequency of each coded word. Find the "
                    "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                    "explanation. Please ignore the dots '....'. What are the three most frequently appeared "
                    "words in the above coded text? [/INST] Answer: According to the coded text above, the three "
                    "most frequently appeared words are:")

        def text(num_words):
            counts = (num_words * (np.arange(1, len(words) + 1) ** -alpha) / zeta).astype(int)
            sampled = [w for w, c in zip(words, counts) for _ in range(c)]
            rng.shuffle(sampled)
            return template.format(context=" ".join(sampled)), words[1:4]

        L = len(h)
        n = L // var_len
        t, ans = text(n)
        while len(self.tok.encode(t + " ".join(ans))) < L - 1:
            n = int(n * 1.1)
            t, ans = text(n)
        t, ans = text(int(n / 1.1))
        ids = np.array(self.tok.encode(t + " ".join(ans)) + [self.eos], np.int64)
        cut = len(self.tok.encode(" ".join(ans))) + 1
        return Task(ids, ids[:-cut], ids[-cut:])

    # ----- ours: pass key -----
    def passkey(self, haystack, digits: int = 5) -> Task:
        h = np.asarray(haystack, np.int64)
        rng = _rng(h)
        key = f"{rng.randint(10 ** (digits - 1), 10 ** digits - 1)}"
        needle = self.tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = self.tok.encode(" What is the pass key? The pass key is")
        answer = self.tok.encode(f" {key}")
        return self._assemble(h, [needle], question, answer, rng)

    def mk_passkey(self, haystack, digits: int = 5, keys: int = 4) -> Task:
        """`keys` pass-key needles, each naming its owner (3 capital letters); the question asks for the
        first owner's key, so the other needles are distractors that only the name tells apart."""
        h = np.asarray(haystack, np.int64)
        rng = _rng(h)
        names = _distinct(lambda: _name(rng, string.ascii_uppercase, 3), keys)
        vals = _distinct(lambda: f"{rng.randint(10 ** (digits - 1), 10 ** digits - 1)}", keys)
        needles = [self.tok.encode(f" The pass key of {n} is {v}. Remember it. {v} is the pass key of {n}.")
                   for n, v in zip(names, vals)]
        question = self.tok.encode(f" What is the pass key of {names[0]}? The pass key of {names[0]} is")
        return self._assemble(h, needles, question, self.tok.encode(f" {vals[0]}"), rng)

    def build(self, name: str, haystack) -> Task:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
        return getattr(self, name)(haystack)


TASKS = ("s_niah", "mk_niah", "mq_niah", "vt", "passkey", "mk_passkey", "fwe")


def predicted_answer(logits_TxV, task: Task) -> np.ndarray:
    """With logits over ids = q ++ a (teacher forced; row t predicts ids[t+1]): the argmax at rows
    [-2-l, -2), the model's guesses for the l = |a|-1 answer tokens before the final EOS."""
    return np.argmax(np.asarray(logits_TxV)[-2 - task.scored:-2], axis=-1)


def score(logits_TxV, task: Task) -> bool:
    """The original's hit rule: every scored answer token predicted (predicted_answer == a[:l])."""
    return bool(np.array_equal(predicted_answer(logits_TxV, task), task.a[:task.scored]))
