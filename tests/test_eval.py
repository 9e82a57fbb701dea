"""RULER task construction and scoring (hsa_jax/ruler.py), generate() (greedy, sampling, stop tokens),
checkpoint restore, and hsa-eval end to end on a tiny random model (table, JSON, PNG)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from data_pipeline.synthetic import build_synthetic, mk_passkey_sample, niah_sample
from hsa_jax.cli import evaluate
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.swa_hsa.decode import SWAHSADecoder
from hsa_jax.generate import generate
from hsa_jax.loading import restore_checkpoint
from hsa_jax.common.interop import save_safetensors
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM
from hsa_jax.eval.ruler import RulerTasks, Task, TextTokenizer, score

BYTES = TextTokenizer.load("bytes")
TASKS = RulerTasks(BYTES)


def haystack(L, seed=0):
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(["The grass is green.", "The sky is blue.", "Here we go."], size=L))
    return np.frombuffer(text.encode(), np.uint8)[:L].astype(np.int64)


def count(seq, sub) -> int:
    seq, sub = list(seq), list(sub)
    return sum(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def enc(text):
    return BYTES.encode(text)


@pytest.mark.parametrize("L", [300, 1000])
def test_s_niah_construction(L):
    h = haystack(L, L)
    t = TASKS.s_niah(h)
    assert len(t.ids) == L and np.array_equal(t.ids, np.concatenate([t.q, t.a]))
    key = t.a[:-1]
    assert len(key) == 7 and t.a[-1] == 256 and all(100 <= k < 256 for k in key) and t.scored == 7
    needle = enc(" |One of the special magic numbers for long-context is:") + list(key) + enc("|")
    assert count(t.ids, needle) == 1  # the needle is present exactly once
    question = enc(" What is the special magic number for long-context mentioned in the provided text? Answer: ")
    assert list(t.q[-len(question):]) == question
    # deterministic for a haystack (Python-int seeding), and another haystack gives another key
    assert np.array_equal(TASKS.s_niah(h).ids, t.ids)
    h2 = h.copy()
    h2[0] = h[0] + 1
    assert not np.array_equal(TASKS.s_niah(h2).a, t.a)


def test_multi_needle_tasks():
    h = haystack(2000, 1)
    t = TASKS.mq_niah(h)
    assert len(t.ids) == 2000 and np.array_equal(t.ids, np.concatenate([t.q, t.a]))
    text = bytes(t.ids[:-1].astype(np.uint8)).decode()
    needles = [s for s in text.split("|") if s.startswith(" One of the special magic numbers for ")]
    assert len(needles) == 6
    pairs = dict(s[len(" One of the special magic numbers for "):].rstrip(".").split(" is ") for s in needles)
    asked = text.split("magic numbers for ")[-1].split(" mentioned")[0].split(" and ")
    assert len(asked) == 2 and all(text.count(f"for {n} is {pairs[n]}.") == 1 for n in asked)
    assert bytes(t.a[:-1].astype(np.uint8)).decode() == " ".join(pairs[n] for n in asked)
    assert text.endswith(". Answer: " + " ".join(pairs[n] for n in asked))

    mk = TASKS.mk_niah(h)
    asked = bytes(mk.ids.astype(np.uint8)).decode().split("magic numbers for ")[-1].split(" mentioned")[0]
    assert " and " not in asked and len(asked) == 5

    vt = TASKS.vt(h)
    text = bytes(vt.ids[:-1].astype(np.uint8)).decode()
    value = text.split("assigned the value ")[-1].split(".")[0]
    first = text.split(f"= {value}|")[0].split("|VAR ")[-1].strip()
    second = text.split(f"= {first}|")[0].split("|VAR ")[-1].strip()
    third = text.split(f"= {second}|")[0].split("|VAR ")[-1].strip()
    assert text.endswith(f". Answer: {first}, {second}, {third}")
    assert bytes(vt.a[:-1].astype(np.uint8)).decode() == f" {third}"  # cut after the last comma

    pk = TASKS.passkey(h)
    text = bytes(pk.ids[:-1].astype(np.uint8)).decode()
    key = bytes(pk.a[:-1].astype(np.uint8)).decode().strip()
    assert len(key) == 5 and text.count(f"The pass key is {key}.") == 1

    fwe = TASKS.fwe(haystack(600, 2))  # its length is only roughly L (for bytes: above it)
    words = bytes(fwe.a[:-1].astype(np.uint8)).decode().split()
    assert fwe.a[-1] == 256 and len(words) == 3 and all(len(w) == 5 for w in words)


GOLDEN = Path(__file__).with_name("data") / "ruler_golden.npz"
SHARED = Path(os.environ.get("HSA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
NEOX = SHARED / "tokenizers/gpt-neox-20b/tokenizer.json"


@pytest.mark.parametrize("tok", ["bytes", "neox"])
def test_ruler_tasks_match_original_golden(tok):
    """Our builders reproduce, token for token, the original PyTorch collator's sequences
    (docs/model_math.md "RULER tasks").

    tests/data/ruler_golden.npz was written by tests/data/make_ruler_golden.py, which imports
    reader/ruler_collator.py of github.com/RamstorageAI/long-context-modeling at commit
    c40400c7037cce951518c5feaa62928ad32fba9b (torch/tqdm replaced by numpy stand-ins, seeded with the
    Python-int product inputs[0]*inputs[-1] as ours is, i.e. with the seeding fix of
    docs/model_math.md "RULER seeding") and runs its RulerSynthesizer on the stored haystacks: the byte
    tokenizer (lengths 600, 1500) and GPT-NeoX-20B (800, 2000; the first haystack's end tokens make the seed
    product exceed int32). Per haystack it stores ids (q ++ a) and len(q) of generate_single_niah,
    generate_multi_query (num_queries 2 and 1: our mq_niah, mk_niah), generate_variable_tracking and
    generate_frequent_words_extraction, and for NeoX the len(q) after single_token_eval_collate_fn's VT answer
    cut at token 13 (our vt with eval_cut)."""
    if tok == "neox" and not NEOX.exists():
        pytest.skip(f"{NEOX} missing (set HSA_SHARED)")
    gold = np.load(GOLDEN)
    tasks = RulerTasks(TextTokenizer.load("bytes" if tok == "bytes" else str(NEOX)))
    builders = {"s_niah": tasks.s_niah, "mq_niah": tasks.mq_niah, "mk_niah": tasks.mk_niah,
                "vt": lambda h: tasks.vt(h, eval_cut=False), "fwe": tasks.fwe}
    if tok == "neox":
        builders["vt_eval"] = tasks.vt
    n = 0
    for i in range(2):
        key = f"{tok}.{i}"
        h = gold[f"{key}.haystack"].astype(np.int64)
        for name, build in builders.items():
            t = build(h)
            ids = gold[f"{key}.{'vt' if name == 'vt_eval' else name}.ids"].astype(np.int64)
            qlen = int(gold[f"{key}.{name}.qlen"])
            assert np.array_equal(t.ids, ids), (key, name)
            assert np.array_equal(t.q, ids[:qlen]) and np.array_equal(t.a, ids[qlen:]), (key, name)
            n += 1
    assert n == 2 * len(builders)


def test_score():
    a = np.array([5, 6, 7, 256])
    t = Task(np.concatenate([np.arange(10), a]), np.arange(10), a)
    logits = np.zeros((len(t.ids), 257))
    logits[np.arange(len(t.ids) - 1), t.ids[1:]] = 1.0  # perfect teacher-forced predictions
    assert score(logits, t)
    logits[-3, 7], logits[-3, 9] = 0.0, 2.0  # the prediction of the last scored token is wrong
    assert not score(logits, t)
    logits[-3, 9], logits[-3, 7] = 0.0, 1.0
    logits[-2, 0] = 5.0  # the final EOS is not scored
    assert score(logits, t)
    assert score(logits[-5:], t)  # only the tail is needed


def test_synthetic_sample_is_an_s_niah_sample():
    s = niah_sample(np.random.default_rng(0), 512)
    key = s[-8:-1]
    assert len(s) == 512 and s[-1] == 256
    assert count(s, enc(" |One of the special magic numbers for long-context is:") + list(key) + enc("|")) == 1


def test_mk_passkey_asks_one_of_four_named_keys():
    import re
    from hsa_jax.eval.longctx import build_task
    for seed in range(3):
        t = build_task(TASKS, "mk_passkey2", haystack(2000, seed))
        text = bytes(t.ids[:-1].astype(np.uint8)).decode()
        owners = dict(re.findall(r" The pass key of ([A-Z]{3}) is (\d\d)\. Remember it\.", text))
        asked = re.search(r"What is the pass key of ([A-Z]{3})\? The pass key of \1 is\. Answer: $",
                          bytes(t.q.astype(np.uint8)).decode()).group(1)
        assert len(owners) == 4 and len(set(owners.values())) == 4  # distinct names, distinct keys
        assert bytes(t.a[:-1].astype(np.uint8)).decode() == f" {owners[asked]}" and t.a[-1] == 256
        assert len(t.ids) == 2000


def test_mk_passkey_training_sample():
    import re
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = mk_passkey_sample(rng, 1024, qa_repeats=3, digits=2, keys=4)
        text = bytes(s[:-1].astype(np.uint8)).decode()
        assert len(s) == 1024 and s[-1] == 256
        owners = dict(re.findall(r" The pass key of ([A-Z]{3}) is (\d\d)\. Remember it\. \2 is the pass key of \1\.", text))
        qa = re.findall(r" What is the pass key of ([A-Z]{3})\? The pass key of \1 is\. Answer:  (\d\d)", text)
        assert len(owners) == 4 and len(set(owners.values())) == 4
        assert len(qa) == 3 and len({n for n, _ in qa}) == 3  # each question about another needle
        assert all(owners[n] == k for n, k in qa)


def test_synthetic_cli_rejects_more_questions_than_keys(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(tmp_path / "x"), "--task", "mk_passkey",
                        "--keys", "2", "--qa-repeats", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "--qa-repeats 3 with --keys 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    r = subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(tmp_path / "x"), "--task", "passkey",
                        "--seq-len", "256", "--tail-jitter", "65"], capture_output=True, text=True)
    assert r.returncode == 2 and "--tail-jitter 65: allowed 0 <= J <= seq_len/4 = 64" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_synthetic_tail_jitter_moves_the_question(tmp_path):
    """--tail-jitter J: samples stay seq_len long, each a passkey sample of seq_len - j tokens (its question
    and answer intact, EOS after the answer) followed by j filler tokens, with j spread over 0..J."""
    import re
    from data_pipeline.index import TokenIndex
    build_synthetic(tmp_path, samples=200, seq_len=256, haystack_docs=1, doc_tokens=512, task="passkey",
                    qa_repeats=1, key_digits=2, tail_jitter=63)
    index = TokenIndex(tmp_path / "train")
    assert index.total_tokens == 200 * 256
    tails = []
    for i in range(200):
        s = index.read(i * 256, 256)
        eos = np.flatnonzero(s == 256)
        assert len(eos) == 1  # the filler tail holds no EOS
        text = bytes(s[:eos[0]].astype(np.uint8)).decode()
        key = re.search(r" The pass key is (\d\d)\. Remember it\.", text).group(1)
        assert text.endswith(f" What is the pass key? The pass key is. Answer:  {key}")
        tails.append(255 - eos[0])
    assert min(tails) <= 3 and max(tails) >= 60 and len(set(tails)) > 40


TINY = dict(vocab_size=257, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
            num_kv_heads=1, num_lower_layers=1, num_upper_layers=1, chunk_size=32, chunk_topk=2,
            retrieval_dim=32, encoder_layers=1, sliding_window=32, initializer_range=0.2, hsa_impl="xla")


@pytest.fixture(scope="module")
def tiny_model():
    return SWAHSAForCausalLM(SWAHSAConfig.from_dict(TINY), rngs=nnx.Rngs(3))


def test_generate_greedy_sampling_stop(tiny_model):
    dec = SWAHSADecoder(tiny_model, segment_len=64)
    prompt = np.random.default_rng(0).integers(0, 256, (2, 40))
    g = generate(dec, prompt, 30)
    assert g.tokens.shape == (2, 30) and (g.lengths == 30).all()
    # greedy == argmax of the training forward over prompt ++ generated
    full = np.concatenate([prompt, g.tokens], 1)[:, :64]
    ref = np.asarray(tiny_model(full))
    np.testing.assert_array_equal(ref[:, 39:63].argmax(-1), g.tokens[:, :24])
    # top-k 1 sampling is greedy; temperature sampling is seeded and differs from greedy
    np.testing.assert_array_equal(generate(dec, prompt, 30, temperature=1.0, top_k=1, seed=5).tokens, g.tokens)
    s1 = generate(dec, prompt, 30, temperature=2.0, seed=1).tokens
    assert np.array_equal(s1, generate(dec, prompt, 30, temperature=2.0, seed=1).tokens)
    assert not np.array_equal(s1, g.tokens)
    # stop tokens: row 0 stops at its first occurrence of the stop token; padding after it
    stop = int(g.tokens[0, 3])
    gs = generate(dec, prompt, 30, stop_tokens=[stop], pad_id=-1)
    first = int(np.flatnonzero(g.tokens[0] == stop)[0])
    assert gs.lengths[0] == first + 1 and (gs.tokens[0, first + 1:] == -1).all()
    np.testing.assert_array_equal(gs.tokens[0, :first + 1], g.tokens[0, :first + 1])


def test_checkpoint_restore(tiny_model, tmp_path):
    import jax
    from train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "run" / "checkpoints", keep=1)
    state = {"params": nnx.state(tiny_model, nnx.Param), "opt_state": {}, "step": np.int32(7)}
    cfg = {"model_type": "swa_hsa", "model": tiny_model.cfg.to_dict()}
    ck.save(7, state, cfg, jax.random.key_data(jax.random.key(0)))
    ck.wait()
    ck.close()
    model, run_cfg = restore_checkpoint(tmp_path / "run")
    assert run_cfg["model"]["hidden_size"] == 32
    ids = np.arange(64)[None] % 250
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(tiny_model(ids)))


def test_inference_settings_change_retrieval_not_weights(tiny_model, tmp_path):
    from hsa_jax.common.config import ConfigError
    from hsa_jax.loading import load_model

    save_safetensors(tiny_model, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(tiny_model.cfg.to_dict()))
    load = lambda *settings: load_model(weights=tmp_path / "model.safetensors", config=tmp_path / "config.json",
                                        settings=settings)
    ids = np.random.default_rng(1).integers(0, 256, (1, 256))  # 8 chunks: top-2 and top-6 differ
    base, wide = load(), load("chunk_topk=6")
    assert wide.cfg.chunk_topk == 6 and base.cfg.chunk_topk == 2
    assert all(m.cfg is wide.cfg for _, m in nnx.iter_graph(wide) if isinstance(m, nnx.Module) and hasattr(m, "cfg"))
    np.testing.assert_array_equal(np.asarray(base(ids)), np.asarray(tiny_model(ids)))
    wide_ref = SWAHSAForCausalLM(tiny_model.cfg.replace(chunk_topk=6), rngs=nnx.Rngs(3))  # same init seed
    np.testing.assert_allclose(np.asarray(wide(ids)), np.asarray(wide_ref(ids)), atol=1e-6)
    assert not np.allclose(np.asarray(wide(ids))[:, 100:], np.asarray(base(ids))[:, 100:], atol=1e-4)
    with pytest.raises(ConfigError, match="'hidden_size' cannot change at inference; allowed: chunk_topk, dtype"):
        load("hidden_size=64")
    with pytest.raises(ConfigError, match="'chunk_topk=many': expected a value of type int"):
        load("chunk_topk=many")
    with pytest.raises(ConfigError, match="chunk_topk"):
        load("chunk_topk=0")
    with pytest.raises(ConfigError, match="not key=value"):
        load("chunk_topk")


def test_backend_setting_reaches_every_attention_call(tiny_model, tmp_path):
    """`--set hsa_impl=` / `gca_impl=` changes the kernel the loaded model runs (a pallas_call appears in
    its program), for converted weights of both families (DRT: original keys, ALiBi buffers included)."""
    import jax

    from hsa_jax.models.drt.interop import export_original_state_dict
    from hsa_jax.models.drt.model import DRTForCausalLM
    from hsa_jax.models.drt.config import DRTConfig
    from hsa_jax.loading import load_model

    drt = DRTForCausalLM(DRTConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                   num_key_value_heads=1, decoder_layers=[1, 1, 1], encoder_layers=1,
                                   enc_chunk_size=63, chunk_topk=2, chunk_id=60, pad_id=59, slide_window=40,
                                   gca_impl="xla"), rngs=nnx.Rngs(0))
    np.savez(tmp_path / "drt.npz", **export_original_state_dict(drt))
    (tmp_path / "drt.json").write_text(json.dumps(drt.cfg.to_dict()))
    save_safetensors(tiny_model, tmp_path / "swa.safetensors")
    (tmp_path / "swa.json").write_text(json.dumps(tiny_model.cfg.to_dict()))
    for model_type, weights, setting, length in [("drt", "drt.npz", "gca_impl", 189),
                                                 ("swa_hsa", "swa.safetensors", "hsa_impl", 128)]:
        ids = np.random.default_rng(2).integers(0, 58, (1, length))
        programs = {}
        for impl in ("xla", "interpret"):
            model = load_model(weights=tmp_path / weights, config=tmp_path / weights.replace(
                ".safetensors", ".json").replace(".npz", ".json"), model_type=model_type,
                settings=[f"{setting}={impl}"])
            assert getattr(model.cfg, setting) == impl
            programs[impl] = str(jax.make_jaxpr(lambda x: model(x))(ids))
        assert "pallas_call" not in programs["xla"] and "pallas_call" in programs["interpret"], model_type


def test_hsa_eval_end_to_end(tiny_model, tmp_path, capsys):
    paths = build_synthetic(tmp_path / "data", samples=4, seq_len=256, haystack_docs=2, doc_tokens=3000)
    save_safetensors(tiny_model, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(tiny_model.cfg.to_dict()))
    out = tmp_path / "eval"
    rc = evaluate.main(["--weights", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "config.json"),
                        "--haystack", str(paths["haystack"]), "--tasks", "s_niah,passkey", "--lengths", "256,1K",
                        "--samples", "2", "--ppl", "--ppl-samples", "1", "--segment", "512", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "s_niah" in printed and "passkey" in printed and "1K" in printed and "ppl" in printed
    record = json.loads((out / "results.json").read_text())
    assert set(record["tasks"]) == {"s_niah", "passkey"} and record["lengths"] == [256, 1024]
    assert record["tasks"]["s_niah"]["1024"]["samples"] == 2 and record["seed"] == 0
    lo, hi = record["tasks"]["s_niah"]["1024"]["wilson95"]
    assert 0 <= lo <= record["tasks"]["s_niah"]["1024"]["accuracy"] <= hi <= 1
    assert 1.0 < record["perplexity"]["256"]["ppl"] < 1e4
    assert (out / "accuracy.png").stat().st_size > 1000

    # Accuracy, recomputed independently: the same windows and samples, the plain training forward over
    # the whole sample (no decoder, no cache, no segments), the argmax at the answer's rows.
    from data_pipeline import TokenIndex
    from hsa_jax.eval.longctx import build_task, haystack_window, window_starts
    from hsa_jax.eval.ruler import RulerTasks, TextTokenizer
    index, builder, guesses = TokenIndex(paths["haystack"]), RulerTasks(TextTokenizer.load("bytes")), set()
    for name in ("s_niah", "passkey"):
        for L in (256, 1024):
            got = record["tasks"][name][str(L)]
            starts = window_starts(index.total_tokens, L, 2, 0)
            assert [s["window_start"] for s in got["per_sample"]] == starts
            for s, start in zip(got["per_sample"], starts):
                task = build_task(builder, name, haystack_window(index, start, L))
                ids = np.asarray(task.ids)
                padded = np.pad(ids, (0, -len(ids) % tiny_model.cfg.chunk_size))[None]  # whole chunks
                logits = np.asarray(tiny_model(padded))[0, :len(ids)]
                guess = logits[len(ids) - 2 - task.scored:len(ids) - 2].argmax(-1)
                assert s["predicted"] == guess.tolist() and s["answer"] == list(task.a[:task.scored])
                assert s["hit"] == (s["predicted"] == s["answer"])
                guesses.add(tuple(s["predicted"]))
            assert got["hits"] == sum(s["hit"] for s in got["per_sample"]) and got["accuracy"] == got["hits"] / 2
    assert len(guesses) > 1  # the predictions depend on the sample: the comparison above can fail
    assert evaluate.main(["--weights", "x", "--config", "y", "--haystack", str(paths["haystack"]),
                          "--tasks", "nope"]) == 2
    assert evaluate.main(["--weights", "x", "--config", "y", "--haystack", str(paths["haystack"]),
                          "--samples", "0"]) == 2


def test_eval_seed_draws_fresh_windows_and_wilson_intervals():
    from hsa_jax.eval.longctx import wilson, window_starts
    # Seed 0: the consecutive windows of every earlier evaluation (last one clamped to the end).
    assert window_starts(10_000, 1000, 12, seed=0) == [min(i * 1000, 10_000 - 1001) for i in range(12)]
    a, b, c = (window_starts(10**6, 4096, 50, seed=s) for s in (1, 1, 2))
    assert a == b and a != c  # reproducible per seed, different across seeds
    assert all(0 <= x <= 10**6 - 4097 for x in a + c) and len(set(a)) > 40
    with pytest.raises(ValueError, match="fewer than a window"):
        window_starts(1000, 1000, 1)
    # Known values of the 95% Wilson interval.
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and abs(hi - 0.1611) < 1e-3
    lo, hi = wilson(18, 20)
    assert abs(lo - 0.6990) < 1e-3 and abs(hi - 0.9721) < 1e-3
    lo, hi = wilson(20, 20)
    assert abs(lo - 0.8389) < 1e-3 and abs(hi - 1.0) < 1e-12
