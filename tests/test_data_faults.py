"""Data pipeline under faults, injected for real: concurrent writers, kill -9 of a build and of its
workers, foreign output folders, inputs changed between an interrupted build and its resume, damaged
index files, token ids beyond a vocabulary. No mocks: real files, real processes, real signals."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_pipeline import (DataPipelineError, DirLock, LockedError, TokenIndex, build_index, check_vocab, import_raw,
                           make_loader, read_manifest, verify_index)
from data_pipeline.index import ShardWriter, write_manifest
from test_data_pipeline import REPO, _cli, _write_jsonl

TINY_DOC = b'{"text": "a few words"}\n'  # 11 bytes + EOS = 12 tokens; ~4 us each to index, ~0 bytes as zst


def _tiny_docs(path: Path, n: int) -> Path:
    """A .jsonl.zst of n tiny documents: seconds of indexing work from a few KB of disk."""
    path.write_bytes(zstandard.ZstdCompressor().compress(TINY_DOC * n))
    return path


def _one_line_error(r: subprocess.CompletedProcess, command: str = "build") -> str:
    """The CLI's expected-failure contract: exit 2, one line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"hsa-preprocess {command}: error: "), r.stderr
    return r.stderr


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie no longer runs


def _spawned_workers(pid: int) -> list[int]:
    """Child processes of `pid` that are multiprocessing spawn workers."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(d.name))
        if fields and int(fields[1]) == pid:
            try:
                if b"spawn_main" in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _wait_for(cond, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _lock_pid(directory: Path) -> int | None:
    try:
        return json.loads((directory / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _popen_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- the lock ---------------------------------------------------------------------------------------------

HOLDER = ("import sys, time; from data_pipeline.lock import DirLock; DirLock(sys.argv[1], what='test').acquire(); "
          "print('locked', flush=True); time.sleep(600)")


def _hold_lock(directory: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_dirlock_names_the_holder_and_dies_with_it(tmp_path):
    d = tmp_path / "work"
    p = _hold_lock(d)
    try:
        with pytest.raises(LockedError) as e:
            DirLock(d, what="training workdir").acquire()
        assert isinstance(e.value, DataPipelineError)
        assert str(e.value) == (f"{d} (training workdir) is in use by pid {p.pid} on host {socket.gethostname()}; "
                                f"wait for it or stop it")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert _lock_pid(d) == p.pid  # kill -9 leaves the record behind, but never the lock
    with DirLock(d) as lock:
        assert lock.held and _lock_pid(d) == os.getpid()
        with pytest.raises(LockedError, match=f"pid {os.getpid()} "):  # not re-entrant, even in-process
            DirLock(d).acquire()
    assert not lock.held and (d / ".lock").read_text() == ""
    lock = DirLock(d).acquire()
    lock.release()
    lock.release()  # idempotent
    # wait=True blocks until the holder is gone
    p = _hold_lock(d)
    threading.Timer(1.5, p.send_signal, (signal.SIGKILL,)).start()
    with DirLock(d, wait=True):  # acquired early, the holder would still live for ~1 s: wait() times out
        assert p.wait(timeout=0.5) == -signal.SIGKILL


def test_second_concurrent_build_into_one_output_is_refused(tmp_path):
    n = 300_000
    src = _tiny_docs(tmp_path / "a.jsonl.zst", n)
    out = tmp_path / "idx"
    args = ["build", "--input", src, "--tokenizer", "bytes", "--output", out, "--shard-tokens", 200_000,
            "--no-progress"]
    first = _popen_cli(*args)
    _wait_for(lambda: _lock_pid(out) == first.pid or first.poll() is not None, what="the first build's lock")
    os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run, still holding the lock
    try:
        assert first.poll() is None, "the first build ended before the second started; make its input larger"
        r = _cli(*args, check=False)
        msg = _one_line_error(r)
        assert f"{out} (token index output) is in use by pid {first.pid} on host {socket.gethostname()}" in msg
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(120) == 0, first.stderr.read()
    assert read_manifest(out)["num_documents"] == n and verify_index(out, progress=False).ok


# --- worker processes -------------------------------------------------------------------------------------


def test_kill9_of_a_worker_and_of_the_build_leaves_no_writer_and_a_resumable_index(tmp_path):
    n = 2_500_000  # ~10 s of indexing per input file
    src = [_tiny_docs(tmp_path / f"{i}.jsonl.zst", n) for i in range(2)]
    out = tmp_path / "idx"
    args = ["build", "--input", *src, "--tokenizer", "bytes", "--output", out, "--shard-tokens", 200_000,
            "--workers", 2, "--no-progress"]

    def start_and_wait_for_shards():
        p = _popen_cli(*args)
        before = len(list(out.glob("shards/*.json")))
        _wait_for(lambda: (len(list(out.glob("shards/*.json"))) > before and len(_spawned_workers(p.pid)) == 2)
                  or p.poll() is not None, what="the build's first shards")
        assert p.poll() is None, p.communicate()
        return p, _spawned_workers(p.pid)

    # 1. A worker dies (OOM killer, kill -9): the build stops with one line, its other worker with it.
    p, workers = start_and_wait_for_shards()
    os.kill(workers[0], signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.count("\n") == 1 and "a worker process died" in err and "rerun" in err, err
    assert not any(_alive(w) for w in workers)

    # 2. The build itself is killed: its workers follow within seconds and stop writing.
    p, workers = start_and_wait_for_shards()
    p.send_signal(signal.SIGKILL)
    p.wait()
    _wait_for(lambda: not any(_alive(w) for w in workers), timeout=5, what=f"workers {workers} to exit")
    frozen = _snapshot(out)
    time.sleep(1.5)
    assert _snapshot(out) == frozen and not (out / "manifest.json").exists()

    # 3. A rerun completes the index.
    r = _cli(*args)
    m = read_manifest(out)
    assert (m["num_documents"], m["total_tokens"]) == (2 * n, 2 * n * len("a few words" + "E"))
    assert not list(out.glob("**/*.tmp")) and verify_index(out, progress=False).ok
    assert r.stdout.startswith(f"{out}: ")


def test_an_input_error_stops_the_other_workers_at_once(tmp_path):
    (tmp_path / "0-bad.jsonl").write_bytes(b'{"text": broken\n')
    _tiny_docs(tmp_path / "1-big.jsonl.zst", 2_500_000)
    with pytest.raises(DataPipelineError, match="0-bad.jsonl:1: invalid JSON"):
        build_index([str(tmp_path / "0-bad.jsonl"), str(tmp_path / "1-big.jsonl.zst")], "bytes",
                    tmp_path / "idx", workers=2, shard_tokens=200_000, progress=False)
    assert not (tmp_path / "idx/shards/00001.done").exists()  # the big file's worker did not run to its end
    frozen = _snapshot(tmp_path / "idx")
    time.sleep(1.0)
    assert _snapshot(tmp_path / "idx") == frozen


# --- what --output may be ---------------------------------------------------------------------------------


def test_a_foreign_output_folder_is_refused_and_left_untouched(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"my": "own manifest"}\n')
    (mine / "notes.txt").write_text("keep me\n")
    before = _snapshot(mine)
    for args in (["build", "--input", src, "--tokenizer", "bytes"],
                 ["import-raw", "--input", src, "--eos-id", 0, "--vocab-size", 300]):
        msg = _one_line_error(_cli(*args, "--output", mine, "--no-progress", check=False), args[0])
        assert f"--output {mine} is not empty (manifest.json, notes.txt)" in msg and "left untouched" in msg
        assert _snapshot(mine) == before and sorted(os.listdir(mine)) == ["manifest.json", "notes.txt"]
    with pytest.raises(DataPipelineError, match="not written by hsa-preprocess"):
        build_index([str(src)], "bytes", mine, progress=False)
    assert _snapshot(mine) == before

    # A token index written some other way (no build.json, e.g. data_pipeline.synthetic) is not ours either.
    build_index([str(src)], "bytes", tmp_path / "idx", progress=False)
    (tmp_path / "idx/build.json").unlink()
    with pytest.raises(DataPipelineError, match="no build.json"):
        build_index([str(src)], "bytes", tmp_path / "idx", progress=False)
    # A file is no folder; an empty folder is fine.
    msg = _one_line_error(_cli("build", "--input", src, "--tokenizer", "bytes", "--output", src, check=False))
    assert "exists and is not a directory" in msg
    (tmp_path / "empty").mkdir()
    assert build_index([str(src)], "bytes", tmp_path / "empty", progress=False)["num_documents"] == 2


# --- inputs changed between an interrupted build and its resume -------------------------------------------


def _interrupt(out: Path, m: dict) -> None:
    """The state a kill leaves mid-build: no manifest, input 0 unfinished, its shards from 1 on missing."""
    (out / "manifest.json").unlink()
    (out / "shards/00000.done").unlink()
    for s in m["shards"][1:]:
        for ext in ("json", "tokens", "offsets"):
            (out / "shards" / f"{s['name']}.{ext}").unlink()


def test_resume_refuses_an_input_changed_since_the_interrupted_build(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", [f"document {i} " * 40 for i in range(200)])
    out = tmp_path / "idx"
    args = ["build", "--input", src, "--tokenizer", "bytes", "--output", out, "--shard-tokens", 20_000, "--no-progress"]
    r = _cli(*args)
    full = read_manifest(out)
    recorded = json.loads((out / "build.json").read_text())["input_files"]
    st = src.stat()
    assert recorded == [{"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}]

    # A finished index of the same inputs and settings: nothing to do, nothing rewritten.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    r = _cli(*args)
    assert "nothing to do" in r.stdout and (out / "manifest.json").stat().st_mtime_ns == stamp

    original = src.read_bytes()
    _interrupt(out, full)
    with open(src, "ab") as f:  # a document appended
        f.write(b'{"text": "late addition"}\n')
    msg = _one_line_error(_cli(*args, check=False))
    assert f"input {src} (size {len(original)} -> " in msg and "fresh --output" in msg
    src.write_bytes(original)  # same bytes again, but a new modification time
    msg = _one_line_error(_cli(*args, check=False))
    assert f"input {src} (modification time changed)" in msg
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # truly unchanged again: the resume proceeds
    _cli(*args)
    assert read_manifest(out) == full and verify_index(out, progress=False).ok

    # A finished index whose input changed since: refused too, rather than "nothing to do".
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _one_line_error(_cli(*args, check=False))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))

    # A build.json from before inputs were recorded: resumed, with a note, and recorded from now on.
    _interrupt(out, full)
    state = json.loads((out / "build.json").read_text())
    del state["input_files"]
    (out / "build.json").write_text(json.dumps(state))
    notes = []
    assert build_index([str(src)], "bytes", out, shard_tokens=20_000, progress=False, log=notes.append) == full
    assert any("no input identities recorded" in n for n in notes)
    assert json.loads((out / "build.json").read_text())["input_files"] == recorded


# --- max_token_id and check_vocab -------------------------------------------------------------------------


def test_max_token_id_matches_random_data_and_old_manifests(tmp_path):
    rng = np.random.default_rng(0)
    for trial, vocab in enumerate((300, 50277, 65536)):
        cap = int(rng.integers(vocab // 2, vocab))  # the largest id that may occur: often below vocab - 1
        eos = int(rng.integers(cap))
        data_n = rng.integers(0, cap + 1, 30_000).astype(np.uint16)
        data_n[rng.integers(0, len(data_n), 300)] = eos  # documents
        data_n[-1] = eos
        raw = tmp_path / f"{trial}.data"
        raw.write_bytes(data_n.tobytes())
        out = tmp_path / f"idx{trial}"
        m = import_raw([str(raw)], out, eos_id=eos, vocab_size=vocab, shard_tokens=4000, progress=False)
        assert len(m["shards"]) > 3 and m["max_token_id"] == int(data_n.max())
        idx = TokenIndex(out)
        for k, s in enumerate(m["shards"]):
            assert s["max_token_id"] == int(idx.shard_arrays(k)[0].max())
            assert json.loads((out / "shards" / f"{s['name']}.json").read_text())["max_token_id"] == s["max_token_id"]
        assert idx.max_token_id == int(data_n.max()) and verify_index(out, progress=False).ok

    # A manifest from before max_token_id: computed from the shards when asked.
    old = {k: v for k, v in m.items() if k != "max_token_id"}
    old["shards"] = [{k: v for k, v in s.items() if k != "max_token_id"} for s in m["shards"]]
    (out / "manifest.json").write_text(json.dumps(old))
    assert TokenIndex(out).max_token_id == int(data_n.max()) and verify_index(out, progress=False).ok
    # verify compares a recorded max_token_id with the data
    wrong = {**m, "max_token_id": 7, "shards": [{**m["shards"][0], "max_token_id": 7}] + m["shards"][1:]}
    (out / "manifest.json").write_text(json.dumps(wrong))
    problems = verify_index(out, progress=False).problems
    assert any(f"largest id {m['shards'][0]['max_token_id']}, manifest says max_token_id 7" in p for p in problems)
    assert any(f"max_token_id 7 but the shards' largest is {m['max_token_id']}" in p for p in problems)


def test_check_vocab_names_the_index_the_id_and_its_shard(tmp_path):
    data_n = np.array([5, 9, 0, 3, 0, 4, 2, 0] * 100, np.uint16)
    data_n[450] = 77  # the largest id, in the second shard
    raw = tmp_path / "x.data"
    raw.write_bytes(data_n.tobytes())
    out = tmp_path / "idx"
    m = import_raw([str(raw)], out, eos_id=0, vocab_size=100, shard_tokens=400, progress=False)
    assert m["max_token_id"] == 77
    check_vocab(out, 78)
    check_vocab(TokenIndex(out), 100)
    for index in (out, TokenIndex(out)):
        with pytest.raises(DataPipelineError) as e:
            check_vocab(index, 77)
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"{out}: token id 77 (in shards/00000-0001.tokens) is >= vocab_size 77")
    # An old manifest without max_token_id: scanned only when its declared vocab exceeds the limit.
    old = {k: v for k, v in m.items() if k != "max_token_id"}
    old["shards"] = [{k: v for k, v in s.items() if k != "max_token_id"} for s in m["shards"]]
    (out / "manifest.json").write_text(json.dumps(old))
    check_vocab(out, 100)
    with pytest.raises(DataPipelineError, match=r"token id 77 \(in shards/00000-0001.tokens\)"):
        check_vocab(out, 50)
    with pytest.raises(DataPipelineError, match="manifest.json: missing"):
        check_vocab(tmp_path / "nowhere", 100)


def test_a_manifest_is_never_written_over_ids_beyond_its_vocab(tmp_path):
    writer = ShardWriter(tmp_path, "00000-0000", np.dtype("<u2"), {"source": "buggy-tokenizer"})
    writer.write(np.array([1, 300, 256], np.uint16), np.array([3]))
    shard = writer.close()
    assert shard["max_token_id"] == 300
    with pytest.raises(DataPipelineError) as e:
        write_manifest(tmp_path, tokenizer={"kind": "bytes"}, vocab_size=257, eos_id=256, shards=[shard])
    assert f"{tmp_path}/shards/00000-0000.tokens: token id 300 >= vocab_size 257 (from buggy-tokenizer)" in str(e.value)
    assert not (tmp_path / "manifest.json").exists()


# --- damaged index files reach the loader as one-line errors naming the file ------------------------------


def test_damaged_index_files_are_errors_naming_the_file_through_make_loader(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", [f"document {i} " * 30 for i in range(100)])
    ref = tmp_path / "ref"
    build_index([str(src)], "bytes", ref, shard_tokens=10_000, progress=False)
    shard = read_manifest(ref)["shards"][1]

    def damaged(name, damage):
        d = tmp_path / name
        shutil.copytree(ref, d)
        damage(d)
        return d

    def cut(path, n):
        path.write_bytes(path.read_bytes()[:-n])

    manifest = json.loads((ref / "manifest.json").read_text())
    cases = {
        "tokens-cut": (lambda d: cut(d / shard["tokens"], 2), shard["tokens"], "truncated"),
        "offsets-cut": (lambda d: cut(d / shard["offsets"], 8), shard["offsets"], "truncated"),
        "tokens-gone": (lambda d: (d / shard["tokens"]).unlink(), shard["tokens"], "missing"),
        "manifest-cut": (lambda d: cut(d / "manifest.json", 50), "manifest.json", "invalid JSON"),
        "entry-broken": (lambda d: (d / "manifest.json").write_text(json.dumps(
            {**manifest, "shards": [{"name": "x"}]})), "manifest.json", r"shard entry 0 lacks \['tokens'"),
    }
    for name, (damage, rel, what) in cases.items():
        d = damaged(name, damage)
        for worker_count in (0, 1):
            with pytest.raises(DataPipelineError, match=what) as e:
                make_loader(d, seq_len=64, global_batch_size=2, process_index=0, process_count=1,
                            worker_count=worker_count)
            assert str(d / rel) in str(e.value) and "\n" not in str(e.value)
        assert not verify_index(d, progress=False).ok
