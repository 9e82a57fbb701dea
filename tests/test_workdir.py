"""A workdir never lies: corrupt checkpoints are moved aside and the retrained step is saved, `--resume
never` moves the old run aside, a changed model is a config mismatch that changes nothing, a failed
start leaves the run's files alone, and one writer at a time. Faults go into real files and processes."""

import json
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from data_pipeline import LockedError
from hsa_jax.common.config import ConfigError
from train.checkpoint import Checkpointer
from train.config import load_config
from train.main import init_state, train
from train.sharding import make_mesh

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_lower_layers=1",
         "model.num_upper_layers=1", "model.encoder_layers=0", "model.chunk_size=16", "model.sliding_window=16",
         "model.retrieval_dim=64", "seq_len=64", "global_batch_size=8", "log_every=1", "eval_batches=1",
         "eval_every=100"]


def small(workdir, *overrides):
    return load_config(None, [*SMALL, f"workdir={workdir}", *overrides])


def steps_in(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def restore(workdir, cfg):
    """The latest checkpoint, read back the way hsa-train reads it."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, _, state = init_state(cfg, mesh)
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", 3)
    try:
        return ckpt.restore_latest(state, jax.random.key_data(jax.random.key(0)), cfg.to_dict(), log=lambda m: None)
    finally:
        ckpt.close()


def test_corrupt_latest_is_moved_aside_and_the_retrained_step_saved(tmp_path):
    cfg = small(tmp_path, "steps=4", "checkpoint_every=2")
    train(cfg, log=lambda m: None)
    for f in (tmp_path / "checkpoints" / "4").rglob("*"):
        if f.is_file() and "state" in str(f):
            f.write_bytes(b"garbage")
    messages = []
    out = train(cfg, log=messages.append)
    assert out["start_step"] == 2 and out["final_step"] == 4
    assert any("unreadable" in m and "moved to 4.corrupt-" in m for m in messages), messages
    aside = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("4.corrupt-")]
    assert len(aside) == 1 and any(aside[0].rglob("*"))  # moved, not deleted
    assert steps_in(tmp_path) == [2, 4]
    step, state = restore(tmp_path, cfg)  # the retrained step 4 is real and readable
    assert step == 4 and int(state["step"]) == 4
    again = train(cfg, log=lambda m: None)  # nothing left to redo
    assert again["steps_run"] == 0


def test_resume_never_moves_the_old_run_aside(tmp_path):
    cfg = small(tmp_path, "steps=3", "checkpoint_every=3")
    first = train(cfg, log=lambda m: None)
    old_metrics = (tmp_path / "metrics.jsonl").read_text()
    second = train(small(tmp_path, "steps=3", "checkpoint_every=3", "run.seed=5"), resume=False, log=lambda m: None)
    assert second["start_step"] == 0 and second["steps_run"] == 3
    (aside,) = tmp_path.glob("replaced-*")
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert [p.name for p in (aside / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]
    assert steps_in(tmp_path) == [3]  # the new run's weights were saved, not skipped
    _, state = restore(tmp_path, cfg)
    new = jax.tree.leaves(state["params"])
    assert not all(np.array_equal(a, b) for a, b in zip(new, jax.tree.leaves(first["params"])))
    for a, b in zip(new, jax.tree.leaves(second["params"])):
        np.testing.assert_array_equal(a, b)


def test_changed_model_is_a_mismatch_that_changes_nothing(tmp_path):
    train(small(tmp_path, "steps=2", "checkpoint_every=2"), log=lambda m: None)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=r"model.hidden_size: 64 -> 32"):
        train(small(tmp_path, "steps=4", "model.hidden_size=32"), log=lambda m: None)
    with pytest.raises(Exception, match="manifest.json"):  # a failed start: the index does not exist
        train(small(tmp_path, "steps=4", f"data.index={tmp_path / 'nowhere'}"), log=lambda m: None)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    # The CLI says it in one line with exit 2.
    r = subprocess.run([sys.executable, "-m", "train.main", *SMALL, f"workdir={tmp_path}", "steps=4",
                        "model.hidden_size=32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model.hidden_size: 64 -> 32" in r.stderr and "Traceback" not in r.stderr
    # Settings that a resumed run may change (steps, lr, kernel choice) resume.
    out = train(small(tmp_path, "steps=3", "optim.lr=1e-3", "model.hsa_impl=xla"), log=lambda m: None)
    assert out["start_step"] == 2 and out["final_step"] == 3


def test_one_writer_per_workdir(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from data_pipeline import DirLock; "
                               f"DirLock({str(tmp_path)!r}, what='training workdir').acquire(); print('held', "
                               "flush=True); time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"in use by pid {holder.pid} on host"):
            train(small(tmp_path, "steps=1"), log=lambda m: None)
        assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert train(small(tmp_path, "steps=1"), log=lambda m: None)["steps_run"] == 1  # a dead holder blocks nothing


def test_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "train.main", *SMALL, f"workdir={f}", "steps=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "run.workdir" in r.stderr and "is a file" in r.stderr, r.stderr
    assert f.read_text() == "x"


def test_metrics_of_a_resumed_run_are_kept(tmp_path):
    cfg = small(tmp_path, "steps=6", "checkpoint_every=4")
    train(cfg, log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Lose the last checkpoint as a crash after step 6 would: steps 5 and 6 will be redone.
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    train(cfg, log=lambda m: None)
    redone = [json.loads(l) for l in next(tmp_path.glob("metrics.redone-*.jsonl")).read_text().splitlines()]
    assert {r["step"] for r in redone} == {5, 6}
    now = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in now if r["step"] <= 4] == [r for r in rows if r["step"] <= 4]
    assert sorted(r["step"] for r in now if "loss" in r) == [1, 2, 3, 4, 5, 6]


def test_metrics_are_strict_json_when_the_loss_is_not_finite(tmp_path):
    # lr 1e6 blows the weights up within a few steps: the loss turns inf/NaN and the updates are skipped.
    train(small(tmp_path, "steps=6", "checkpoint_every=100", "optim.lr=1e6", "optim.warmup_ratio=0"),
          log=lambda m: None)

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

    rows = [json.loads(l, parse_constant=refuse) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert any(r["skipped"] and None in (r["loss"], r["grad_norm"]) for r in losses), losses
