"""Data pipeline: text -> token index -> grain loader, on the bundled corpus and small Pile-format samples."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline import (ByteTokenizer, DataPipelineError, TokenIndex, WindowSource, build_index, bundled_texts,
                           ensure_bundled_corpus, import_raw, make_loader, read_manifest, verify_index)

REPO = Path(__file__).resolve().parents[1]
NEOX = Path(os.environ.get("HSA_SHARED", REPO.parent / "shared")) / "tokenizers/gpt-neox-20b/tokenizer.json"
needs_neox = pytest.mark.skipif(not NEOX.exists(), reason=f"{NEOX} missing (set HSA_SHARED)")
EOT = "<|endoftext|>"
# Pile-like documents: unicode, an empty text, the EOS string inside a text, a long one.
DOCS = ["Hello, world.", "naïve café — ünïcödé ✓ 日本語", "", f"a literal {EOT} inside a document",
        "x" * 5000 + " end", "last\nline\n"]


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _write_jsonl(path: Path, docs, zst=False):
    data = "".join(json.dumps({"text": d, "meta": {"pile_set_name": "Pile-CC"}}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)
    return path


def _write_parquet(path: Path, docs):
    pq.write_table(pa.table({"text": docs, "meta": [json.dumps({"i": i}) for i in range(len(docs))]}), path)
    return path


def _byte_stream(docs) -> np.ndarray:
    """The expected global stream of the byte tokenizer: UTF-8 bytes, EOS 256 after each document."""
    return np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8).astype(np.int32), 256) for d in docs])


def _index_stream(index_dir) -> np.ndarray:
    idx = TokenIndex(index_dir)
    return idx.read(0, idx.total_tokens)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    return ensure_bundled_corpus(tmp_path_factory.mktemp("bundled"))


@pytest.fixture(scope="module")
def bundled_stream(bundled):
    return _index_stream(bundled)


def _batches(loader, n):
    it = iter(loader)
    return [next(it)["input_ids"] for _ in range(n)]


# --- build / import / verify ------------------------------------------------------------------------------


def test_bundled_corpus_is_the_pydoc_text_and_idempotent(tmp_path, bundled, bundled_stream):
    m = read_manifest(bundled)
    assert (m["vocab_size"], m["eos_id"], m["dtype"], m["num_documents"]) == (257, 256, "uint16", len(bundled_texts()))
    np.testing.assert_array_equal(bundled_stream, _byte_stream(bundled_texts()))
    assert verify_index(bundled, progress=False).ok
    stamps = {f.name: f.stat().st_mtime_ns for f in bundled.iterdir()}
    assert ensure_bundled_corpus(bundled.parent) == bundled
    assert {f.name: f.stat().st_mtime_ns for f in bundled.iterdir()} == stamps  # nothing rebuilt or rewritten


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet", "jsonl"])
def test_build_bytes_each_format(tmp_path, fmt):
    src = tmp_path / f"sample.{fmt}"
    _write_parquet(src, DOCS) if fmt == "parquet" else _write_jsonl(src, DOCS, zst=fmt.endswith("zst"))
    m = build_index([str(src)], "bytes", tmp_path / "idx", progress=False)
    assert m["num_documents"] == len(DOCS) and m["total_tokens"] == sum(len(d.encode()) + 1 for d in DOCS)
    np.testing.assert_array_equal(_index_stream(tmp_path / "idx"), _byte_stream(DOCS))
    assert verify_index(tmp_path / "idx", progress=False).ok


def test_txt_is_one_document_and_globs_keep_order(tmp_path):
    for i, d in enumerate(["first file\n", "second ✓"]):
        (tmp_path / f"{i}.txt").write_text(d)
    m = build_index([str(tmp_path / "*.txt")], "bytes", tmp_path / "idx", progress=False)
    assert m["num_documents"] == 2
    assert ByteTokenizer().decode(_index_stream(tmp_path / "idx")) == f"first file\n{EOT}second ✓{EOT}"


@needs_neox
@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_build_neox_pile_sample(tmp_path, fmt):
    import tokenizers

    src = tmp_path / f"pile.{fmt}"
    _write_parquet(src, DOCS) if fmt == "parquet" else _write_jsonl(src, DOCS, zst=True)
    _cli("build", "--input", src, "--tokenizer", NEOX, "--output", tmp_path / "idx", "--no-progress")
    assert _cli("verify", tmp_path / "idx", "--no-progress").stdout.rstrip().endswith("OK")
    m = read_manifest(tmp_path / "idx")
    assert (m["vocab_size"], m["eos_id"], m["dtype"]) == (50277, 0, "uint16")
    ref = tokenizers.Tokenizer.from_file(str(NEOX))
    stream, idx = _index_stream(tmp_path / "idx"), TokenIndex(tmp_path / "idx")
    offsets = idx.shard_arrays(0)[1]
    for d, lo, hi in zip(DOCS, offsets[:-1], offsets[1:]):
        doc = stream[lo:hi]
        assert doc[-1] == 0 and np.count_nonzero(doc == 0) == 1  # only the appended EOS, even for EOT text
        assert ref.decode(doc[:-1].tolist()) == d
    assert ref.encode(DOCS[0], add_special_tokens=False).ids == stream[offsets[0]:offsets[1] - 1].tolist()


def test_import_raw_reproduces_a_built_index(tmp_path, bundled):
    raw = tmp_path / "train.parquet.data"  # the original repo's layout: tokens + EOS, raw uint16
    raw.write_bytes((bundled / read_manifest(bundled)["shards"][0]["tokens"]).read_bytes())
    m = import_raw([str(raw)], tmp_path / "idx", eos_id=256, vocab_size=257, shard_tokens=100_000, progress=False)
    ref = read_manifest(bundled)
    assert (m["total_tokens"], m["num_documents"]) == (ref["total_tokens"], ref["num_documents"])
    assert len(m["shards"]) > 1  # split at document boundaries
    np.testing.assert_array_equal(_index_stream(tmp_path / "idx"), _index_stream(bundled))
    starts = np.concatenate([[0], np.cumsum([len(t.encode()) + 1 for t in bundled_texts()])])
    idx = TokenIndex(tmp_path / "idx")
    got = np.concatenate([[0]] + [idx.starts[k] + idx.shard_arrays(k)[1][1:] for k in range(len(m["shards"]))])
    np.testing.assert_array_equal(got, starts)
    assert verify_index(tmp_path / "idx", progress=False).ok


def test_workers_give_the_same_index(tmp_path):
    for i in range(3):
        _write_jsonl(tmp_path / f"part{i}.jsonl", [f"doc {i}.{j} " * (j + 1) for j in range(50)])
    inputs = [str(tmp_path / "part*.jsonl")]
    one = build_index(inputs, "bytes", tmp_path / "w1", shard_tokens=2000, progress=False)
    two = build_index(inputs, "bytes", tmp_path / "w2", workers=2, shard_tokens=2000, progress=False)
    assert len(one["shards"]) > 3 and one == two


def test_resume_keeps_finished_shards_and_gives_the_same_index(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", [f"document {i} " * 40 for i in range(400)])
    out = tmp_path / "idx"
    full = build_index([str(src)], "bytes", out, shard_tokens=20_000, progress=False)
    assert len(full["shards"]) >= 4
    # State of a kill while writing shard 2: manifest and .done not written, shard 2 half-written.
    (out / "manifest.json").unlink()
    (out / "shards/00000.done").unlink()
    for later in full["shards"][2:]:
        for ext in ("json", "tokens", "offsets"):
            (out / "shards" / f"{later['name']}.{ext}").unlink()
    (out / "shards/00000-0002.tokens.tmp").write_bytes(b"\x01" * 777)
    kept = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("00000-000[01].*")}
    assert build_index([str(src)], "bytes", out, shard_tokens=20_000, progress=False) == full
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert not list(out.glob("**/*.tmp")) and verify_index(out, progress=False).ok
    with pytest.raises(DataPipelineError, match="other settings"):
        build_index([str(src)], "bytes", out, shard_tokens=10_000, progress=False)


@needs_neox
def test_sigkill_during_build_then_rerun(tmp_path):
    src = [_write_jsonl(tmp_path / f"{i}.jsonl", [f"Sentence {j} of part {i}. " * 30 for j in range(1500)])
           for i in range(2)]
    args = ["build", "--input", *src, "--tokenizer", NEOX, "--shard-tokens", 30_000, "--no-progress"]
    _cli(*args, "--output", tmp_path / "ref")
    p = subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", *map(str, args), "--output", tmp_path / "idx"])
    deadline = time.time() + 60
    while not list((tmp_path / "idx").glob("shards/*.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "idx/manifest.json").exists() or p.returncode == 0
    _cli(*args, "--output", tmp_path / "idx")
    assert read_manifest(tmp_path / "idx") == read_manifest(tmp_path / "ref")
    assert verify_index(tmp_path / "idx", progress=False).ok


# --- errors name the file ---------------------------------------------------------------------------------


def test_input_errors_name_the_file(tmp_path):
    cases = {
        "empty.jsonl": b"",
        "blank.jsonl": b"\n\n",
        "bad.jsonl": b'{"text": "ok"}\n{"text": broken\n',
        "notext.jsonl": b'{"content": "x"}\n',
        "table.csv": b"text\nhello\n",
        "bad.parquet": b"PAR1 not really",
    }
    expected = {"empty.jsonl": "empty input", "blank.jsonl": "empty input", "bad.jsonl": r":2: invalid JSON",
                "notext.jsonl": "string 'text' field", "table.csv": "unknown input extension",
                "bad.parquet": "not a readable parquet"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataPipelineError, match=expected[name]) as e:
            build_index([str(tmp_path / name)], "bytes", tmp_path / f"out-{name}", progress=False)
        assert name in str(e.value)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "norows.parquet")
    for name, msg in (("nocol.parquet", "no 'text' column"), ("norows.parquet", "empty input")):
        with pytest.raises(DataPipelineError, match=msg) as e:
            build_index([str(tmp_path / name)], "bytes", tmp_path / f"out-{name}", progress=False)
        assert name in str(e.value)
    r = _cli("build", "--input", tmp_path / "*.nothing", "--tokenizer", "bytes", "--output", tmp_path / "o", check=False)
    assert r.returncode == 2 and "matches no file" in r.stderr


def test_import_raw_errors(tmp_path):
    good = np.array([5, 6, 0, 7, 0], np.uint16)
    cases = {"odd.data": good.tobytes()[:-1], "big.data": np.array([5, 300, 0], np.uint16).tobytes(),
             "noeos.data": np.array([5, 6, 0, 7], np.uint16).tobytes(), "empty.data": b""}
    expected = {"odd.data": "not a whole number of uint16", "big.data": "token 300 at position 1 is >= --vocab-size 100",
                "noeos.data": "last 1 tokens are not followed by EOS", "empty.data": "empty input"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataPipelineError, match=expected[name]) as e:
            import_raw([str(tmp_path / name)], tmp_path / f"out-{name}", eos_id=0, vocab_size=100, progress=False)
        assert name in str(e.value)


def test_verify_and_loader_catch_corrupt_truncated_and_out_of_range(tmp_path, bundled):
    import shutil

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(bundled, d)
        return d, d / read_manifest(d)["shards"][0]["tokens"]

    d, tokens = fresh("corrupt")
    data = bytearray(tokens.read_bytes())
    data[1001] ^= 0x01
    tokens.write_bytes(bytes(data))
    r = _cli("verify", d, "--no-progress", check=False)
    assert r.returncode == 1 and f"{tokens}: sha256 mismatch" in r.stdout

    d, tokens = fresh("truncated")
    tokens.write_bytes(tokens.read_bytes()[:-10])
    assert any(str(tokens) in p and "truncated" in p for p in verify_index(d, progress=False).problems)
    with pytest.raises(DataPipelineError, match="truncated") as e:
        make_loader(d, seq_len=64, global_batch_size=2, process_index=0, process_count=1)
    assert str(tokens) in str(e.value)

    d, tokens = fresh("range")
    m = read_manifest(d)
    (d / "manifest.json").write_text(json.dumps({**m, "vocab_size": 200}))  # bytes >= 200 occur
    problems = verify_index(d, progress=False).problems
    assert any(str(tokens) in p and ">= vocab_size 200" in p for p in problems)

    with pytest.raises(DataPipelineError, match="manifest.json: missing"):
        make_loader(tmp_path / "nowhere", seq_len=64, global_batch_size=2, process_index=0, process_count=1)


# --- loader -----------------------------------------------------------------------------------------------


def test_sequential_windows_decode_to_the_text(bundled, bundled_stream):
    L, B = 512, 4
    loader = make_loader(bundled, seq_len=L, global_batch_size=B, mode="sequential", process_index=0, process_count=1)
    n_steps = (len(bundled_stream) - 1) // L // B
    batches = list(iter(loader))
    assert len(batches) == n_steps
    text = ByteTokenizer().decode(bundled_stream)
    assert EOT.join(bundled_texts()) + EOT == text
    for s, batch in enumerate(batches):
        x = batch["input_ids"]
        assert x.shape == (B, L + 1) and x.dtype == np.int32
        for j, row in enumerate(x):
            i = s * B + j
            np.testing.assert_array_equal(row, bundled_stream[i * L:i * L + L + 1])
    row = batches[3]["input_ids"][1]
    assert bytes(row[row != 256].astype(np.uint8)).decode("utf-8", "ignore") in text.replace(EOT, "")


def test_sequential_repeat_starts_the_same_pass_over(bundled, bundled_stream):
    L, B = 512, 4
    n_steps = (len(bundled_stream) - 1) // L // B
    it = iter(make_loader(bundled, seq_len=L, global_batch_size=B, mode="sequential", process_index=0,
                          process_count=1, repeat=True))
    batches = [next(it)["input_ids"] for _ in range(n_steps + 3)]
    for k in range(3):
        np.testing.assert_array_equal(batches[n_steps + k], batches[k])
    assert not np.array_equal(batches[1], batches[0])


def test_random_windows_are_stream_slices_and_across_docs_cross_at_random_offsets(bundled, bundled_stream):
    stream = bundled_stream.tobytes()
    doc_starts = set(np.concatenate([[0], np.flatnonzero(bundled_stream == 256) + 1]).tolist())
    kw = dict(seq_len=1024, global_batch_size=4, seed=3, process_index=0, process_count=1)
    for x in _batches(make_loader(bundled, mode="random", **kw), 3):
        for row in x:
            assert row.tobytes() in stream
    mid_doc_after_eos = 0
    for x in _batches(make_loader(bundled, mode="across_docs", **kw), 3):
        for row in x:
            pieces = np.split(row, np.flatnonzero(row == 256) + 1)
            for piece in pieces[:-1]:  # each ends a document: it is a document suffix with its EOS
                at = stream.find(piece.tobytes())
                assert at >= 0 and (at // 4 + len(piece)) in doc_starts
            mid_doc_after_eos += sum(stream.find(p.tobytes()) // 4 not in doc_starts for p in pieces[1:] if len(p))
    assert mid_doc_after_eos > 0


def test_loader_deterministic_across_runs_seeds_and_workers(bundled):
    kw = dict(seq_len=256, global_batch_size=4, process_index=0, process_count=1)
    for mode in ("random", "across_docs"):
        a = _batches(make_loader(bundled, mode=mode, seed=1, **kw), 4)
        b = _batches(make_loader(bundled, mode=mode, seed=1, **kw), 4)
        c = _batches(make_loader(bundled, mode=mode, seed=2, **kw), 4)
        w = _batches(make_loader(bundled, mode=mode, seed=1, worker_count=2, **kw), 4)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, w)
        assert not np.array_equal(a, c)
    # Sequential with worker processes, from a later start step too: the same batches in the same order.
    for start in (0, 3):
        one = _batches(make_loader(bundled, mode="sequential", start_step=start, **kw), 5)
        two = _batches(make_loader(bundled, mode="sequential", start_step=start, worker_count=2, **kw), 5)
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("mode", ["random", "across_docs", "sequential"])
def test_state_restore_continues_exactly(bundled, mode):
    kw = dict(seq_len=128, global_batch_size=4, mode=mode, seed=7, process_index=1, process_count=2)
    it = iter(make_loader(bundled, **kw))
    for _ in range(5):
        next(it)
    state = it.get_state()
    json.loads(state)  # JSON bytes: checkpointable as is
    expected = [next(it)["input_ids"] for _ in range(3)]
    it2 = iter(make_loader(bundled, **kw))
    it2.set_state(state)
    np.testing.assert_array_equal([next(it2)["input_ids"] for _ in range(3)], expected)


def test_four_processes_read_disjoint_complete_slices(bundled, bundled_stream):
    L, B, P = 128, 8, 4
    # Sequential epoch: every window exactly once over all processes together.
    per_proc = [list(iter(make_loader(bundled, seq_len=L, global_batch_size=B, mode="sequential",
                                      process_index=p, process_count=P))) for p in range(P)]
    n_steps = (len(bundled_stream) - 1) // L // B
    assert all(len(x) == n_steps for x in per_proc)
    rows = [r.tobytes() for x in per_proc for b in x for r in b["input_ids"]]
    expected = [bundled_stream[i * L:i * L + L + 1].tobytes() for i in range(n_steps * B)]
    assert sorted(rows) == sorted(expected) and len(set(rows)) == len(rows)
    # Every mode: at each step the 4 slices, in process order, are the single-process global batch (same
    # rows in the same order), so a run can move between cluster shapes.
    for mode in ("random", "across_docs", "sequential"):
        kw = dict(seq_len=L, global_batch_size=B, mode=mode, seed=5)
        whole = _batches(make_loader(bundled, process_index=0, process_count=1, **kw), 3)
        parts = [_batches(make_loader(bundled, process_index=p, process_count=P, **kw), 3) for p in range(P)]
        for s in range(3):
            got = np.concatenate([parts[p][s] for p in range(P)])
            assert got.shape == (B, L + 1)
            np.testing.assert_array_equal(got, whole[s])


@pytest.mark.parametrize("mode", ["random", "across_docs", "sequential"])
def test_start_step_continues_on_any_process_count(bundled, bundled_stream, mode):
    L, B = 128, 8
    kw = dict(seq_len=L, global_batch_size=B, mode=mode, seed=11, repeat=True)
    whole = _batches(make_loader(bundled, process_index=0, process_count=1, **kw), 7)
    for P in (1, 2, 4):  # resume at step 4 on another process count: steps 4, 5, 6 as in the one run
        parts = [_batches(make_loader(bundled, process_index=p, process_count=P, start_step=4, **kw), 3)
                 for p in range(P)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole[4:7])
    steps = (len(bundled_stream) - 1) // L // B  # sequential steps per epoch
    if mode == "sequential":  # past the end of an epoch, repeat continues in the next pass
        nxt = _batches(make_loader(bundled, process_index=0, process_count=1, start_step=steps + 1, **kw), 1)
        np.testing.assert_array_equal(nxt[0], whole[1])
        with pytest.raises(DataPipelineError, match="start_step"):
            make_loader(bundled, seq_len=L, global_batch_size=B, mode=mode, process_index=0, process_count=1,
                        start_step=steps)


def test_loader_argument_errors(bundled):
    with pytest.raises(DataPipelineError, match="multiple of process_count 3"):
        make_loader(bundled, seq_len=64, global_batch_size=4, process_index=0, process_count=3)
    with pytest.raises(DataPipelineError, match="mode 'shuffle'"):
        make_loader(bundled, seq_len=64, global_batch_size=4, mode="shuffle", process_index=0, process_count=1)
    with pytest.raises(DataPipelineError, match="must fit"):
        WindowSource(bundled, 10**9)


def test_cli_help_explains_every_flag():
    for sub in ([], ["build"], ["import-raw"], ["verify"]):
        out = _cli(*sub, "--help").stdout
        assert "usage: hsa-preprocess" in out
    build_help = _cli("build", "--help").stdout
    for flag in ("--input", "--tokenizer", "--output", "--workers", "--eos-token", "--shard-tokens", "--no-progress"):
        assert flag in build_help
