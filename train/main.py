"""`hsa-train`: sharded pre-training of SWA+HSA models with resumable Orbax checkpoints.

    hsa-train                                   # embedded default: tiny model, bundled corpus, CPU-sized
    hsa-train --config configs/swa_hsa_125m.yaml data.index=/data/pile_neox workdir=/ckpt/run1
    hsa-train steps=50 eval_every=25            # overrides: key=value (see train/config.py)
    hsa-train --coordinator node0:9476 --num-processes 4 --process-id $I ...   # one of 4 processes

Rerunning the same command on the same workdir resumes from its latest checkpoint, on any number of
processes and devices (README "Running on a cluster").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from data_pipeline import DataPipelineError
from data_pipeline.index import atomic_write
from hsa_jax.common.config import ConfigError
from hsa_jax.registry import family
from train import distributed
from train.checkpoint import Checkpointer
from train.config import TrainConfig, load_config
from train.flops import peak_flops_per_device, train_flops_per_token
from train.sharding import (batch_sharding, global_batch, make_mesh, merge_rules, param_shardings, place, replicate,
                            replicated, unsharded_report)
from train.step import lr_schedule, make_eval_step, make_optimizer, make_train_step
from train.trace import StepTracer
from train.workdir import Workdir, stamp
from train.xla_flags import add_overlap_flags

BUNDLED_CACHE = pathlib.Path(os.environ.get("HSA_DATA_CACHE", pathlib.Path.home() / ".cache" / "hsa-jax")) / "bundled"


def resolve_index(path: str) -> pathlib.Path:
    from data_pipeline import ensure_bundled_corpus
    return ensure_bundled_corpus(BUNDLED_CACHE) if path == "bundled" else pathlib.Path(path)


def init_params(cfg: TrainConfig, mesh):
    """-> (graphdef, parameters placed in their shardings). The model is built eagerly in host memory
    (the CPU backend; the first local device where there is none) and each device then receives its
    shard. Jitting the whole initialisation instead takes XLA's GPU compiler minutes (one module of
    hundreds of threefry draws: 51 s for 125M, over 9 min for 370M on an H200), while eager creation
    compiles one tiny program per distinct shape (370M: 7 s, 1.3B: 25 s on 2 CPU cores). Threefry
    draws the same values either way."""
    model_cls = family(cfg.model_type).model_cls
    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        host = jax.local_devices()[0]
    with jax.default_device(host):
        graphdef, params = nnx.split(model_cls(cfg.model, rngs=nnx.Rngs(cfg.run.seed)), nnx.Param)
    return graphdef, jax.tree.map(place, params, param_shardings(params, mesh, merge_rules(cfg.mesh.rules)))


def init_state(cfg: TrainConfig, mesh):
    """Parameters (never whole on one accelerator) and optimizer state, in their shardings."""
    graphdef, params = init_params(cfg, mesh)
    tx = make_optimizer(cfg, params)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": replicate(np.int32(0), mesh)}
    # One sharding per leaf, so the step's inputs and outputs agree and it compiles once.
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated(mesh),
                             state)
    return graphdef, tx, jax.jit(lambda s: s, out_shardings=shardings)(state)


class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard event files under workdir, written by
    process 0 only (`enabled=False` on the others)."""

    def __init__(self, workdir: pathlib.Path, resumed_step: int, enabled: bool = True, log=print):
        self.enabled = enabled
        if not enabled:
            return
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():  # entries past the checkpoint we resume from will be redone: set them aside
            lines = [l for l in self.path.read_text().splitlines() if l.strip()]
            later = [json.loads(l)["step"] > resumed_step for l in lines]
            if any(later):
                keep = "".join(l + "\n" for l, redo in zip(lines, later) if not redo)
                aside = workdir / f"metrics.redone-{stamp()}.jsonl"
                aside.write_text("".join(l + "\n" for l, redo in zip(lines, later) if redo))
                atomic_write(self.path, keep.encode())
                log(f"metrics past step {resumed_step} ({sum(later)} lines) will be redone; kept in {aside.name}")
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict):
        if not self.enabled:
            return
        # JSON has no NaN/Infinity: a non-finite value is written as null (with "skipped" saying why).
        clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.tb.close()


def process_rows(cfg: TrainConfig) -> int:
    """First row of this process's block of every global batch (what make_loader reads for it)."""
    return jax.process_index() * (cfg.data.global_batch_size // jax.process_count())


def evaluate(eval_step, params, cfg: TrainConfig, index, mesh, batches: int) -> dict:
    """Loss over the first `batches` global batches of the index in order: sums over every process's
    rows (the step's outputs are global), so each process gets the same global mean."""
    from data_pipeline import make_loader
    loader = make_loader(index, seq_len=cfg.data.seq_len, global_batch_size=cfg.data.global_batch_size,
                         mode="sequential", seed=0)
    nll, count = 0.0, 0
    for _, batch in zip(range(batches), loader):
        ids = global_batch(batch["input_ids"], batch_sharding(mesh), process_rows(cfg))
        s, n = eval_step(params, ids)
        nll, count = nll + float(s), count + int(n)
    loss = nll / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))}


def train(cfg: TrainConfig, *, resume: bool = True, log=print) -> dict:
    """Runs (or resumes) training; returns a summary {first_loss, last_loss, eval_loss, steps_run, ...}.
    In a multi-process run every process calls this (after `distributed.initialize`) with the same cfg.
    resume=False starts over, moving an existing run's files aside (train/workdir.py)."""
    workdir = Workdir(cfg.run.workdir, primary=distributed.is_primary())
    try:
        workdir.open(cfg.to_dict(), resume, log)
        distributed.barrier("workdir-open")  # nobody reads the workdir while process 0 moves files
        return _run(cfg, workdir, log)
    finally:
        workdir.close()


def _run(cfg: TrainConfig, workdir: Workdir, log) -> dict:
    from data_pipeline import check_vocab, make_loader, read_manifest

    primary = workdir.primary
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    index = resolve_index(cfg.data.index)
    eval_index = resolve_index(cfg.data.eval_index) if cfg.data.eval_index else index
    manifest = read_manifest(index)
    for path in {index, eval_index}:  # every token id must have an embedding row
        check_vocab(path, cfg.model.vocab_size)

    graphdef, tx, state = init_state(cfg, mesh)
    left = unsharded_report(state["params"], mesh, merge_rules(cfg.mesh.rules))
    if left:
        log(f"sharding: {len(left)} parameter dimension(s) left replicated (size not divisible): "
            + "; ".join(left[:5]) + (f"; ... ({len(left) - 5} more)" if len(left) > 5 else ""))
    rng_data = replicate(jax.random.key_data(jax.random.key(cfg.run.seed)), mesh)
    epoch_steps = (manifest["total_tokens"] - 1) // cfg.data.seq_len // cfg.data.global_batch_size
    if cfg.data.mode == "sequential" and cfg.run.steps > epoch_steps:
        log(f"data: {index} holds {epoch_steps} sequential batches; steps beyond them start a new epoch "
            f"(run.steps={cfg.run.steps} = {cfg.run.steps / epoch_steps:.2f} epochs)")
    ckpt = Checkpointer(workdir.path / "checkpoints", cfg.run.keep_checkpoints)
    start = 0
    restored = ckpt.restore_latest(state, rng_data, cfg.to_dict(), log=log)
    if restored is not None:
        start, state = restored
        log(f"resumed from {ckpt.directory / str(start)} (step {start})")
    # The data position is the step: the global batch of step s is the same on any process count.
    batches = iter(make_loader(index, seq_len=cfg.data.seq_len, global_batch_size=cfg.data.global_batch_size,
                               mode=cfg.data.mode, seed=cfg.run.seed, worker_count=cfg.data.worker_count,
                               repeat=True, start_step=start))
    workdir.start(cfg.to_dict())
    metrics = MetricsLog(workdir.path, start, enabled=primary, log=log)

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(make_train_step(graphdef, tx, cfg, mesh), donate_argnums=0,
                         out_shardings=(state_shardings, replicated(mesh)))
    eval_step = jax.jit(make_eval_step(graphdef, mesh, cfg.run.loss_chunk))
    schedule = lr_schedule(cfg.optim, cfg.run.steps)
    base_rng = jax.random.key(cfg.run.seed)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = train_flops_per_token(cfg.model_type, cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops_per_device()

    # SIGTERM: a single process catches it itself; in a multi-process run jax's preemption notifier
    # catches it on whichever process gets it and every process stops at the same step.
    stop = {"signal": None}
    multi = jax.distributed.is_initialized()
    previous = None if multi else signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    summary = {"first_loss": None, "last_loss": None, "eval_loss": None, "start_step": start}
    bar = tqdm(total=cfg.run.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not primary)
    window_start, window_steps = time.perf_counter(), 0
    step, row_start = start, process_rows(cfg)
    tracer = StepTracer(workdir.path / "profile", cfg.run.profile_from, cfg.run.profile_steps, enabled=primary,
                        log=log)
    try:
        while step < cfg.run.steps:
            ids = global_batch(next(batches)["input_ids"], batch_sharding(mesh), row_start)
            tracer.before(step)
            state, m = train_step(state, ids, jax.random.fold_in(base_rng, step))
            step += 1
            if tracer.after(step, state):
                log(f"traced steps {tracer.first + 1}-{step} into {tracer.directory}")
            window_steps += 1
            bar.update(1)
            if step == start + 1:  # keep compilation out of the throughput numbers
                jax.block_until_ready(state)
                summary["compile_s"] = time.perf_counter() - window_start
                metrics.write({"step": step, "first_step_s": summary["compile_s"]})  # compile + one step
                log(f"first step (compilation included) took {summary['compile_s']:.1f} s")
                window_start, window_steps = time.perf_counter(), 0
            if cfg.run.nan_policy == "stop" and not bool(m["finite"]):
                raise FloatingPointError(f"non-finite loss or gradient at step {step} (run.nan_policy=stop); "
                                         f"the last checkpoint is kept in {ckpt.directory}")
            if distributed.preemption_reached(step):
                stop["signal"] = signal.SIGTERM
            stopping = stop["signal"] is not None  # read once: a stopping step is logged, saved, then left
            if step % cfg.run.log_every == 0 or step == cfg.run.steps or stopping:
                loss = float(m["loss"])
                record = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                          "grad_norm": float(m["grad_norm"]), "skipped": not bool(m["finite"])}
                if window_steps:  # throughput over the steps since the last log (compilation excluded)
                    dt = (time.perf_counter() - window_start) / window_steps
                    record.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt)
                    if peak:
                        record["mfu"] = flops_per_step / dt / (peak * jax.device_count())
                metrics.write(record)
                summary["first_loss"] = summary["first_loss"] if summary["first_loss"] is not None else loss
                summary["last_loss"] = loss
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.run.eval_every == 0 or step == cfg.run.steps:
                ev = evaluate(eval_step, state["params"], cfg, eval_index, mesh, cfg.run.eval_batches)
                metrics.write({"step": step, **ev})
                summary["eval_loss"] = ev["eval_loss"]
                if primary:
                    bar.write(f"step {step}: eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f})")
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps or stopping:
                ckpt.save(step, state, cfg.to_dict(), rng_data)
            if stopping:
                log(f"SIGTERM: saved checkpoint {step}, exiting")
                break
    finally:
        tracer.close()
        bar.close()
        metrics.close()
        ckpt.wait()
        ckpt.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    summary.update(steps_run=step - start, final_step=step, params=state["params"])
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hsa-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=pathlib.Path, default=None,
                   help="YAML run config (default: the embedded tiny CPU config, configs/tiny.yaml)")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto (default): continue from the workdir's latest readable checkpoint (the workdir's "
                        "model must match the config); never: start over, moving the previous run's "
                        "checkpoints, metrics and config into WORKDIR/replaced-<time>/")
    c = p.add_argument_group("multi-process launch", "one hsa-train process per host (or per GPU); without these "
                             "flags JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are read, then "
                             "a SLURM or Open MPI job is detected; otherwise the run is one process")
    c.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="address of process 0, where the others join (the same on every process)")
    c.add_argument("--num-processes", type=int, metavar="N", default=None, help="number of processes in the run")
    c.add_argument("--process-id", type=int, metavar="I", default=None, help="this process's index, 0 .. N-1")
    c.add_argument("--local-devices", metavar="IDS", default=None,
                   help="comma-separated GPU ids this process uses, e.g. 0 or 0,1 (default: every visible GPU; "
                        "env JAX_LOCAL_DEVICE_IDS)")
    c.add_argument("--init-timeout", type=float, metavar="SECONDS", default=300,
                   help="how long to wait for the coordinator and all processes to join (default 300)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. steps=100 workdir=/tmp/run model.hidden_size=256 optim.lr=1e-3; "
                        "sections: model, data, optim, mesh, run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    say = lambda msg: print(f"hsa-train: {msg}", flush=True)
    try:
        # Config errors first (no waiting for a cluster to say them); nothing here touches a backend.
        cfg = load_config(args.config, args.overrides)
        launch = distributed.resolve(args.coordinator, args.num_processes, args.process_id, args.local_devices)
        if cfg.run.collective_overlap:
            add_overlap_flags()
        distributed.initialize(launch, args.init_timeout, log=say)
        primary = distributed.is_primary()
        log = say if primary else (lambda msg: None)
        where = f"{jax.process_count()} processes, " if jax.process_count() > 1 else ""
        log(f"workdir {pathlib.Path(cfg.run.workdir).absolute()}, {where}{jax.device_count()} "
            f"{jax.default_backend()} device(s), mesh {cfg.mesh}")
        s = train(cfg, resume=args.resume == "auto", log=log)
    except (ConfigError, DataPipelineError, FloatingPointError) as e:
        print(f"hsa-train: error: {e}", file=sys.stderr)
        return 2
    if not primary:
        return 0
    if s["steps_run"]:
        ev = "not run" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        print(f"hsa-train: steps {s['start_step']}->{s['final_step']}: loss {s['first_loss']:.4f} -> "
              f"{s['last_loss']:.4f}; eval loss {ev}")
    else:
        print(f"hsa-train: nothing to do: the workdir is already at step {s['final_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
