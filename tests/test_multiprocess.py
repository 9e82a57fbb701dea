"""The cluster path with real OS processes: 2 `hsa-train` processes x 2 CPU devices (gloo collectives)
against one process with 4 devices; SIGTERM to one process; resume on another process count.

Cross-process reductions run in another order than one process's, so losses agree to 2e-3 relative
(measured: ~1e-7); a wrong batch or a wrong average shows at the percent level.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
MODEL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_lower_layers=1",
         "model.num_upper_layers=1", "model.encoder_layers=0", "model.chunk_size=16", "model.sliding_window=16",
         "model.retrieval_dim=64", "seq_len=64", "global_batch_size=8", "log_every=1", "eval_batches=2",
         "mesh.data=2", "mesh.fsdp=2", "optim.warmup_ratio=0"]
TIMEOUT = 240  # seconds for any one run of processes (a hang fails the test instead of blocking CI)


def free_port() -> int:
    """A port nobody listens on now; parallel test workers each get their own from the kernel."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    launch_vars = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")
    return {**{k: v for k, v in os.environ.items() if k not in launch_vars}, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONUNBUFFERED": "1"}


def launch(workdir, overrides, processes: int, devices: int, log_dir: pathlib.Path,
           via_env: bool = False) -> list[subprocess.Popen]:
    """Starts the processes of one run: the launch flags, or (via_env) JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID as a cluster script would set them."""
    base = [sys.executable, "-m", "train.main", "--init-timeout", "120", *MODEL, f"workdir={workdir}", *overrides]
    port = free_port()
    procs = []
    for i in range(processes):
        flags, extra = [], {}
        if processes > 1 and via_env:
            extra = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(processes),
                     "JAX_PROCESS_ID": str(i)}
        elif processes > 1:
            flags = ["--coordinator", f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        path = log_dir / f"{pathlib.Path(workdir).name}-{i}.log"
        with open(path, "w") as out:
            proc = subprocess.Popen([*base[:3], *flags, *base[3:]], cwd=REPO, env={**env(devices), **extra},
                                    stdout=out, stderr=subprocess.STDOUT)
        proc.log_path = path
        procs.append(proc)
    return procs


def finish(procs, deadline=None) -> None:
    """Waits for every process; kills them all on a timeout (the wait then raises)."""
    deadline = deadline or time.time() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def logs(procs) -> list[str]:
    return [pathlib.Path(p.log_path).read_text() for p in procs]


def metric_rows(workdir) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(workdir) if "loss" in r}


def run(workdir, overrides, processes, devices, log_dir):
    procs = launch(workdir, overrides, processes, devices, log_dir)
    finish(procs)
    out = logs(procs)
    assert [p.returncode for p in procs] == [0] * processes, "\n\n".join(out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with 4 devices, 10 uninterrupted steps."""
    d = tmp_path_factory.mktemp("ref")
    run(d / "run", ["steps=10", "eval_every=5", "checkpoint_every=100"], 1, 4, d)
    return d / "run"


def test_two_processes_train_like_one(reference, tmp_path):
    workdir = tmp_path / "two"
    out = run(workdir, ["steps=10", "eval_every=5", "checkpoint_every=5"], 2, 2, tmp_path)
    ref, got = losses(reference), losses(workdir)
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-3)
    assert got[10] < got[1] - 0.3  # real updates happened (warmup 0): a loss at lr 0 would not move
    # Written once, by process 0: no line twice; eval is the global mean over both processes' rows.
    steps = [(r["step"], "loss" in r) for r in metric_rows(workdir)]
    assert len(steps) == len(set(steps))
    ref_eval = {r["step"]: r["eval_loss"] for r in metric_rows(reference) if "eval_loss" in r}
    got_eval = {r["step"]: r["eval_loss"] for r in metric_rows(workdir) if "eval_loss" in r}
    assert sorted(got_eval) == [5, 10]
    np.testing.assert_allclose([got_eval[5], got_eval[10]], [ref_eval[5], ref_eval[10]], rtol=2e-3)
    assert "%|" in out[0] and "%|" not in out[1]  # one progress bar (tqdm: "train:  50%|...")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]


def test_sigterm_to_one_process_stops_both_then_resumes_on_one(reference, tmp_path):
    workdir = tmp_path / "run"
    procs = launch(workdir, ["steps=10", "eval_every=100", "checkpoint_every=100"], 2, 2, tmp_path, via_env=True)
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and 3 not in (losses(workdir) if (workdir / "metrics.jsonl").exists() else {}):
            assert all(p.poll() is None for p in procs), "\n\n".join(logs(procs))
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # not the coordinator
    finally:
        finish(procs, deadline)
    out = logs(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(out)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 10, (saved, out[0])
    stopped = saved[0]
    assert f"SIGTERM: saved checkpoint {stopped}" in out[0]
    assert max(losses(workdir)) == stopped  # both stopped after the same step, the checkpointed one

    # The 2-process checkpoint resumes on 1 process (4 devices) and continues as the uninterrupted run.
    out = run(workdir, ["steps=10", "eval_every=100", "checkpoint_every=100"], 1, 4, tmp_path)
    assert f"resumed from {workdir / 'checkpoints' / str(stopped)}" in out[0]
    ref, got = losses(reference), losses(workdir)
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in range(1, 11)], [ref[s] for s in range(1, 11)], rtol=2e-3)


def test_launch_errors_are_one_line(tmp_path):
    def cli(*args, timeout=120):
        return subprocess.run([sys.executable, "-m", "train.main", *args, f"workdir={tmp_path / 'w'}"], cwd=REPO,
                              env=env(1), capture_output=True, text=True, timeout=timeout)
    cases = [
        (["--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1"], "--process-id=2 is invalid"),
        (["--num-processes", "2", "--coordinator", "localhost:1"], "missing: --process-id"),
        (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
        (["--local-devices", "0,x"], "--local-devices='0,x' is invalid"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # Nobody listens: process 1 gives up after the timeout, naming the address and the wait.
    port = free_port()
    r = cli("--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "1", "--init-timeout", "3")
    assert r.returncode == 2 and f"coordinator localhost:{port} unreachable: waited 3 s" in r.stderr, r.stderr
    # Process 0 alone: the others never join.
    r = cli("--coordinator", f"localhost:{free_port()}", "--num-processes", "2", "--process-id", "0",
            "--init-timeout", "3")
    assert r.returncode == 2 and "not all 2 processes joined within 3 s" in r.stderr, r.stderr
