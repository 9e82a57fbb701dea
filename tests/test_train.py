"""Training loop: resume after a kill is bit-identical, sharding and accumulation do not change the
maths, checkpoints reshard and survive corruption, configs fail clearly. 8 simulated CPU devices."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsa_jax.common.config import ConfigError
from train.checkpoint import Checkpointer
from train.config import load_config
from train.main import init_state, resolve_index, train
from train.sharding import batch_sharding, make_mesh
from train.step import make_loss_and_grads, make_train_step

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_lower_layers=1",
         "model.num_upper_layers=1", "model.encoder_layers=0", "model.chunk_size=16", "model.sliding_window=16", "model.retrieval_dim=64",
         "seq_len=64", "global_batch_size=8", "log_every=1", "eval_batches=1"]


def small(tmp_path, *overrides):
    return load_config(None, [*SMALL, f"workdir={tmp_path}", *overrides])


def losses(workdir):
    rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_kill_and_resume_is_bit_identical(tmp_path):
    steps = ["steps=24", "checkpoint_every=4", "eval_every=100"]
    straight = train(small(tmp_path / "a", *steps), log=lambda m: None)
    # Same run in a subprocess, SIGTERMed mid-way: it saves where it stands and exits cleanly.
    workdir = tmp_path / "b"
    cmd = [sys.executable, "-m", "train.main", *SMALL, f"workdir={workdir}", *steps]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(workdir) if (workdir / "metrics.jsonl").exists() else {}) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    killed_at = max(losses(workdir))
    assert killed_at < 24, "the run finished before the signal: nothing was interrupted"
    assert "SIGTERM" in out
    resumed = train(small(workdir, *steps), log=lambda m: None)
    assert resumed["start_step"] >= killed_at - 1
    assert losses(workdir) == losses(tmp_path / "a")  # every step's loss, bit for bit
    for x, y in zip(leaves(straight["params"]), leaves(resumed["params"])):
        np.testing.assert_array_equal(x, y)


def test_sigterm_before_the_first_log_line(tmp_path):
    # Stopped before any step was due to be logged: the step it stops at is logged and summarised.
    cmd = [sys.executable, "-m", "train.main", *SMALL, f"workdir={tmp_path}", "steps=500", "log_every=1000",
           "checkpoint_every=2", "eval_every=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "checkpoints" / "2").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = max(losses(tmp_path))
    assert 2 <= stopped < 500 and f"SIGTERM: saved checkpoint {stopped}" in out
    assert f"hsa-train: steps 0->{stopped}: loss " in out, out[-2000:]


def _batches(cfg, n):
    from data_pipeline import make_loader
    loader = iter(make_loader(resolve_index("bundled"), seq_len=cfg.data.seq_len,
                              global_batch_size=cfg.data.global_batch_size, seed=1, process_index=0, process_count=1))
    return [next(loader)["input_ids"] for _ in range(n)]


def _run_steps(cfg, mesh, n=3):
    """n train steps (warmup 0: every step updates) -> (losses, final state, gradients of the first batch)."""
    graphdef, tx, state = init_state(cfg, mesh)
    step = jax.jit(make_train_step(graphdef, tx, cfg, mesh))
    batches = [jax.device_put(b, batch_sharding(mesh)) for b in _batches(cfg, n)]
    _, grads = jax.jit(make_loss_and_grads(graphdef, cfg, mesh))(state["params"], batches[0], jax.random.key(0))
    out = []
    for i, ids in enumerate(batches):
        state, m = step(state, ids, jax.random.key(i))
        out.append(float(m["loss"]))
    return out, state, grads


def assert_trees_close(a, b, rtol):
    """Every leaf within rtol of the larger leaf's scale (|a - b| <= rtol * max|b|)."""
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(float(np.max(np.abs(y))), 1e-12))


def assert_updates_close(params_a, params_b, params_init, rtol):
    """The parameter changes agree per leaf in norm: ||da - db|| <= rtol ||db||. (Element-wise, Adam's
    first steps move a weight by ~lr * sign(g), so a gradient of 1e-9 vs -1e-9 flips a few elements.)"""
    for x, y, x0 in zip(leaves(params_a), leaves(params_b), leaves(params_init)):
        dx, dy = x - x0, y - x0
        assert np.linalg.norm(dx - dy) <= rtol * np.linalg.norm(dy) + 1e-12, (np.linalg.norm(dx - dy), np.linalg.norm(dy))


def test_fsdp_on_8_devices_matches_one_device(tmp_path):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    cfg = small(tmp_path, "optim.warmup_ratio=0")
    one, s1, g1 = _run_steps(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    fsdp, s8, g8 = _run_steps(cfg, make_mesh(1, 8, 1))
    mixed, s222, g222 = _run_steps(cfg, make_mesh(2, 2, 2))
    # Same maths, different reduction orders: gradients agree to fp32 rounding; after 3 real updates
    # (lr > 0 from the first step) the parameters and losses too.
    assert one[2] < one[0] - 0.05, one  # the updates changed something
    for g in (g8, g222):
        assert_trees_close(g, g1, rtol=1e-5)
    init = init_state(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))[2]["params"]
    for s in (s8, s222):
        assert_updates_close(s["params"], s1["params"], init, rtol=1e-2)
    np.testing.assert_allclose(fsdp, one, rtol=2e-5)
    np.testing.assert_allclose(mixed, one, rtol=2e-5)
    emb = s8["params"]["backbone"]["embeddings"]["embedding"][...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert len({d for d in emb.sharding.device_set}) == 8


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    big, s_big, g_big = _run_steps(small(tmp_path, "optim.warmup_ratio=0"), mesh, n=2)
    acc, s_acc, g_acc = _run_steps(small(tmp_path, "optim.warmup_ratio=0", "optim.grad_accum=4"), mesh, n=2)
    # A sum-vs-mean slip would scale the gradients by 4: Adam would hide it, the gradients do not.
    assert_trees_close(g_acc, g_big, rtol=1e-5)
    np.testing.assert_allclose(acc, big, rtol=1e-5)
    init = init_state(small(tmp_path), mesh)[2]["params"]
    assert_updates_close(s_acc["params"], s_big["params"], init, rtol=1e-2)


def test_swa_hsa_loss_decreases(tmp_path):
    out = train(small(tmp_path, "steps=40", "checkpoint_every=100", "optim.lr=3e-3"), log=lambda m: None)
    assert out["last_loss"] < out["first_loss"] - 1.0, out  # bytes: ~5.5 at init


def test_checkpoint_written_on_8_devices_restores_on_one(tmp_path):
    cfg = small(tmp_path)
    _, _, state8 = init_state(cfg, make_mesh(1, 8, 1))
    state8["params"] = jax.tree.map(lambda x: x + 1.0, state8["params"])  # not the init values
    rng = jax.random.key_data(jax.random.key(0))
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(7, state8, cfg.to_dict(), rng)
    ckpt.wait()
    _, _, state1 = init_state(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    step, restored = ckpt.restore_latest(state1, rng, cfg.to_dict())
    assert step == 7
    assert json.loads((tmp_path / "ckpt" / "7" / "data" / "metadata").read_text()) == {"next_step": 7}
    for x, y in zip(leaves(state8["params"]), leaves(restored["params"])):
        np.testing.assert_array_equal(x, y)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored["params"]))
    ckpt.close()


def test_checkpoint_written_on_one_device_restores_sharded_on_eight(tmp_path):
    cfg = small(tmp_path)
    _, _, state1 = init_state(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    state1["params"] = jax.tree.map(lambda x: x * 3.0 + 0.5, state1["params"])  # not the init values
    rng = jax.random.key_data(jax.random.key(0))
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(5, state1, cfg.to_dict(), rng)
    ckpt.wait()
    _, _, state8 = init_state(cfg, make_mesh(2, 4, 1))
    step, restored = ckpt.restore_latest(state8, rng, cfg.to_dict())
    ckpt.close()
    assert step == 5
    for x, y in zip(leaves(state1["params"]), leaves(restored["params"])):
        np.testing.assert_array_equal(x, y)
    emb = restored["params"]["backbone"]["embeddings"]["embedding"][...]
    assert emb.sharding.spec[1] == "fsdp" and emb.addressable_shards[0].data.shape == (257, 64 // 4)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    cfg = small(tmp_path, "steps=4", "checkpoint_every=2", "eval_every=100")
    train(cfg, log=lambda m: None)
    latest = tmp_path / "checkpoints" / "4"
    for f in latest.rglob("*"):
        if f.is_file() and "state" in str(f):
            f.write_bytes(b"garbage")
    messages = []
    out = train(small(tmp_path, "steps=4", "checkpoint_every=2", "eval_every=100"), log=messages.append)
    assert any("unreadable" in m and str(latest) in m for m in messages), messages
    assert out["start_step"] == 2 and out["final_step"] == 4


def test_nan_loss_skips_the_update(tmp_path):
    cfg = small(tmp_path)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, tx, state = init_state(cfg, mesh)
    state["params"]["backbone"]["norm_f"]["weight"][...] = jnp.full((64,), jnp.nan)
    before = leaves(state["params"])
    ids = jnp.zeros((8, 65), jnp.int32)
    new, m = jax.jit(make_train_step(graphdef, tx, cfg))(state, ids, jax.random.key(0))
    assert not bool(m["finite"]) and int(new["step"]) == 1
    for x, y in zip(before, leaves(new["params"])):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("override,field", [
    ("seq_len=60", "data.seq_len"),
    ("optim.grad_accum=3", "optim.grad_accum"),
    ("mesh.fsdp=-1", "mesh"),  # data is -1 too
    ("run.nan_policy=ignore", "run.nan_policy"),
    ("model.num_kv_heads=3", "num_kv_heads"),
])
def test_config_errors_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=f"config field {field}="):
        small(tmp_path, override)


def test_bad_overrides_and_mesh_sizes(tmp_path):
    with pytest.raises(ConfigError, match="no section has it"):
        small(tmp_path, "not_a_field=1")
    with pytest.raises(ConfigError, match="not key=value"):
        small(tmp_path, "steps")
    with pytest.raises(ConfigError, match="needs 6 devices, 8 are available"):
        make_mesh(2, 3, 1)


def test_sharding_rules_are_data_and_unsharded_dimensions_are_reported(tmp_path):
    from train.sharding import merge_rules, param_shardings, unsharded_report
    cfg = small(tmp_path, "mesh.rules={embed: null, vocab: fsdp}")
    assert cfg.mesh.rules == {"embed": None, "vocab": "fsdp"}
    _, _, state = init_state(cfg, make_mesh(1, 8, 1))
    emb = state["params"]["backbone"]["embeddings"]["embedding"][...]  # (vocab 257, embed 64)
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, None)  # vocab 257 does not divide by 8
    q = state["params"]["backbone"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]  # (embed, heads)
    assert q.sharding.spec[0] is None  # embed: null overrides the default fsdp
    report = unsharded_report(state["params"], make_mesh(1, 8, 1), merge_rules(cfg.mesh.rules))
    assert report == ["backbone.embeddings.embedding: dim 0 (size 257, logical axis vocab) not divisible by "
                      "mesh axis fsdp (8)",
                      "lm_head.kernel: dim 1 (size 257, logical axis vocab) not divisible by mesh axis fsdp (8)"]
    default = param_shardings(state["params"], make_mesh(1, 8, 1))
    assert default["backbone"]["layers"][0]["self_attn"]["q_proj"]["kernel"].value.spec[0] == "fsdp"
    with pytest.raises(ConfigError, match="mesh.rules has unknown logical axis 'embd'"):
        small(tmp_path, "mesh.rules={embd: fsdp}")
    with pytest.raises(ConfigError, match=r"mesh.rules.vocab='pipeline' is invalid"):
        small(tmp_path, "mesh.rules={vocab: pipeline}")
