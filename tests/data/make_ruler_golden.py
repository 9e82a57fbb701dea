"""Writes tests/data/ruler_golden.npz: token sequences built by the ORIGINAL RULER collator
(reader/ruler_collator.py of github.com/RamstorageAI/long-context-modeling) for a few fixed haystacks.

    python tests/data/make_ruler_golden.py /path/to/long-context-modeling/reader/ruler_collator.py [NEOX_TOKENIZER_JSON]

The original file is imported from the given path, unchanged; torch, tqdm and the original's reader.dataset /
reader.lazy_loader imports are replaced by small numpy stand-ins (the builders only use numpy, random and
scipy.special.zeta). Its `random.Random(inputs[0] * inputs[-1])` seeding (non-reproducible:
docs/model_math.md "RULER seeding") is fed the Python-int product, the seeding hsa_jax.eval.ruler uses. The
HF tokenizer is replaced by an object with the three attributes the original reads (encode, vocab_size,
eos_token_id), taken from hsa_jax.eval.ruler.TextTokenizer.
"""

import importlib.util
import random
import sys
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from hsa_jax.eval.ruler import TextTokenizer  # noqa: E402


def load_original(path):
    torch = types.ModuleType("torch")
    torch.tensor = lambda x, **_: np.asarray(x)
    torch.stack = np.stack
    torch.long = np.int64
    tu, tud = types.ModuleType("torch.utils"), types.ModuleType("torch.utils.data")
    tud.SequentialSampler, tu.data, torch.utils = object, tud, tu
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = lambda x, **_: x
    rd, rl = types.ModuleType("reader.dataset"), types.ModuleType("reader.lazy_loader")
    rd.LongRNNDataset, rl.LazyLoader = None, None
    for name, m in {"torch": torch, "torch.utils": tu, "torch.utils.data": tud, "tqdm": tqdm,
                    "reader.dataset": rd, "reader.lazy_loader": rl}.items():
        sys.modules.setdefault(name, m)
    spec = importlib.util.spec_from_file_location("original_ruler_collator", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.random = types.SimpleNamespace(Random=lambda s: random.Random(int(s)), randint=random.randint)
    return mod


class HFLike:
    def __init__(self, tt):
        self.encode, self.vocab_size, self.eos_token_id = tt.encode, tt.vocab_size, tt.eos_token_id


def haystacks(tt, lengths, seed):
    rng = np.random.default_rng(seed)
    words = ["The grass is green.", "The sky is blue.", "Here we go.", "Again, and again:", "x = 42;"]
    out = []
    for i, L in enumerate(lengths):
        if i % 2 == 0:  # random ids; the end tokens make the seed product exceed int32 where the vocab allows
            h = rng.integers(0, tt.vocab_size, L)
            h[0], h[-1] = tt.vocab_size - 1, tt.vocab_size - 2
        else:  # tokenised text
            h = np.array(tt.encode(" ".join(rng.choice(words, size=L))), np.int64)[:L]
        out.append(h.astype(np.int64))
    return out


def main():
    mod = load_original(sys.argv[1])
    tokenizers = [("bytes", "bytes", (600, 1500))]
    if len(sys.argv) > 2:
        tokenizers.append(("neox", sys.argv[2], (800, 2000)))
    gold = {}
    for tname, spec, lengths in tokenizers:
        tt = TextTokenizer.load(spec)
        for i, h in enumerate(haystacks(tt, lengths, len(tname))):
            key = f"{tname}.{i}"
            gold[f"{key}.haystack"] = h.astype(np.uint16)
            for task, tid, fn, kw in [("s_niah", 0, "generate_single_niah", {}),
                                      ("mq_niah", 1, "generate_multi_query", {}),
                                      ("mk_niah", 1, "generate_multi_query", {"num_queries": 1}),
                                      ("vt", 2, "generate_variable_tracking", {}),
                                      ("fwe", 3, "generate_frequent_words_extraction", {})]:
                syn = mod.RulerSynthesizer(HFLike(tt), task_id=tid, **kw)
                ids, q, a = getattr(syn, fn)(h.copy(), **kw)
                ids = np.asarray(ids, np.int64)
                assert np.array_equal(ids, np.concatenate([q, a]))
                gold[f"{key}.{task}.ids"] = ids.astype(np.uint16)
                gold[f"{key}.{task}.qlen"] = np.int32(len(q))
                if tid == 2 and tname == "neox":  # eval-time answer cut (comma id 13 is NeoX's)
                    batch = syn.single_token_eval_collate_fn([(h.copy(), True)])
                    assert np.array_equal(batch["input_ids"][0], ids)
                    gold[f"{key}.vt_eval.qlen"] = np.int32(len(ids) - batch["labels"].shape[1])
    out = Path(__file__).with_name("ruler_golden.npz")
    np.savez_compressed(out, **gold)
    print(f"{out}: {len(gold)} arrays, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
