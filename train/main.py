"""`hsa-train`: sharded pre-training of SWA+HSA models with resumable Orbax checkpoints.

    hsa-train                                   # embedded default: tiny model, bundled corpus, CPU-sized
    hsa-train --config configs/swa_hsa_125m.yaml data.index=/data/pile_neox workdir=/ckpt/run1
    hsa-train steps=50 eval_every=25            # overrides: key=value (see train/config.py)

Rerunning the same command on the same workdir resumes from its latest checkpoint.
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
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from hsa_jax.config import ConfigError
from hsa_jax.registry import family
from train.checkpoint import Checkpointer
from train.config import TrainConfig, load_config
from train.flops import peak_flops_per_device, train_flops_per_token
from train.sharding import batch_sharding, make_mesh, param_shardings, replicated
from train.step import lr_schedule, make_eval_step, make_optimizer, make_train_step

BUNDLED_CACHE = pathlib.Path(os.environ.get("HSA_DATA_CACHE", pathlib.Path.home() / ".cache" / "hsa-jax")) / "bundled"


def maybe_initialize_distributed():
    """Multi-process runs: let JAX autodetect the cluster (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()


def resolve_index(path: str) -> pathlib.Path:
    from data_pipeline import ensure_bundled_corpus
    return ensure_bundled_corpus(BUNDLED_CACHE) if path == "bundled" else pathlib.Path(path)


def init_state(cfg: TrainConfig, mesh):
    """Parameters created directly in their shardings (never whole on one device), optimizer state."""
    model_cls = family(cfg.model_type).model_cls
    make = lambda: nnx.state(model_cls(cfg.model, rngs=nnx.Rngs(cfg.run.seed)), nnx.Param)
    abstract_model = nnx.eval_shape(lambda: model_cls(cfg.model, rngs=nnx.Rngs(cfg.run.seed)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    params = jax.jit(make, out_shardings=param_shardings(abstract_params, mesh))()
    tx = make_optimizer(cfg, params)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))}
    return graphdef, tx, state


class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard event files under workdir."""

    def __init__(self, workdir: pathlib.Path, resumed_step: int):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():  # drop entries past the checkpoint we resume from: they will be redone
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resumed_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict):
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()


def evaluate(eval_step, params, cfg: TrainConfig, index, mesh, batches: int) -> dict:
    from data_pipeline import make_loader
    loader = make_loader(index, seq_len=cfg.data.seq_len, global_batch_size=cfg.data.global_batch_size,
                         mode="sequential", seed=0)
    nll, count = 0.0, 0
    for _, batch in zip(range(batches), loader):
        ids = jax.make_array_from_process_local_data(batch_sharding(mesh), batch["input_ids"])
        s, n = eval_step(params, ids)
        nll, count = nll + float(s), count + int(n)
    loss = nll / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))}


def train(cfg: TrainConfig, *, resume: bool = True, log=print) -> dict:
    """Runs (or resumes) training; returns a summary {first_loss, last_loss, eval_loss, steps_run, ...}."""
    from data_pipeline import make_loader, read_manifest

    maybe_initialize_distributed()
    workdir = pathlib.Path(cfg.run.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    index = resolve_index(cfg.data.index)
    eval_index = resolve_index(cfg.data.eval_index) if cfg.data.eval_index else index
    manifest = read_manifest(index)
    vocab = manifest["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"config field model.vocab_size={cfg.model.vocab_size} is invalid: the token index "
                          f"{index} has vocab_size {vocab}; the model needs at least that")

    graphdef, tx, state = init_state(cfg, mesh)
    rng_data = jax.random.key_data(jax.random.key(cfg.run.seed))
    loader = make_loader(index, seq_len=cfg.data.seq_len, global_batch_size=cfg.data.global_batch_size,
                         mode=cfg.data.mode, seed=cfg.run.seed, worker_count=cfg.data.worker_count, repeat=True)
    epoch_steps = (manifest["total_tokens"] - 1) // cfg.data.seq_len // cfg.data.global_batch_size
    if cfg.data.mode == "sequential" and cfg.run.steps > epoch_steps:
        log(f"data: {index} holds {epoch_steps} sequential batches; steps beyond them start a new epoch "
            f"(run.steps={cfg.run.steps} = {cfg.run.steps / epoch_steps:.2f} epochs)")
    batches = iter(loader)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.run.keep_checkpoints)
    start = 0
    restored = ckpt.restore_latest(state, rng_data, log=log) if resume else None
    if restored is not None:
        start, state, data_state = restored
        batches.set_state(data_state)
        log(f"resumed from {ckpt.directory / str(start)} (step {start})")
    metrics = MetricsLog(workdir, start)

    # One sharding per leaf, so the step's inputs and outputs agree and it compiles once.
    state_shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated(mesh), state)
    state = jax.device_put(state, state_shardings)
    train_step = jax.jit(make_train_step(graphdef, tx, cfg, mesh), donate_argnums=0,
                         out_shardings=(state_shardings, replicated(mesh)))
    eval_step = jax.jit(make_eval_step(graphdef, mesh))
    schedule = lr_schedule(cfg.optim, cfg.run.steps)
    base_rng = jax.random.key(cfg.run.seed)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = train_flops_per_token(cfg.model_type, cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops_per_device()

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    summary = {"first_loss": None, "last_loss": None, "eval_loss": None, "start_step": start}
    bar = tqdm(total=cfg.run.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    window_start, window_steps = time.perf_counter(), 0
    step = start
    try:
        while step < cfg.run.steps:
            batch = next(batches)["input_ids"]
            ids = jax.make_array_from_process_local_data(batch_sharding(mesh), batch)
            state, m = train_step(state, ids, jax.random.fold_in(base_rng, step))
            step += 1
            window_steps += 1
            bar.update(1)
            if step == start + 1:  # keep compilation out of the throughput numbers
                jax.block_until_ready(state)
                summary["compile_s"] = time.perf_counter() - window_start
                window_start, window_steps = time.perf_counter(), 0
            if cfg.run.nan_policy == "stop" and not bool(m["finite"]):
                raise FloatingPointError(f"non-finite loss or gradient at step {step} (run.nan_policy=stop); "
                                         f"the last checkpoint is kept in {ckpt.directory}")
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
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
                bar.write(f"step {step}: eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f})")
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps or stop["signal"]:
                ckpt.save(step, state, batches.get_state(), cfg.to_dict(), rng_data)
            if stop["signal"]:
                bar.write(f"SIGTERM: saved checkpoint {step}, exiting")
                break
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        signal.signal(signal.SIGTERM, previous)
    summary.update(steps_run=step - start, final_step=step, params=state["params"])
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hsa-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=pathlib.Path, default=None,
                   help="YAML run config (default: the embedded tiny CPU config, configs/tiny.yaml)")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto (default): continue from the workdir's latest checkpoint if there is one; "
                        "never: start from scratch (existing checkpoints of later steps are overwritten)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. steps=100 workdir=/tmp/run model.hidden_size=256 optim.lr=1e-3; "
                        "sections: model, data, optim, mesh, run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        print(f"hsa-train: workdir {pathlib.Path(cfg.run.workdir).absolute()}, {jax.device_count()} "
              f"{jax.default_backend()} device(s), mesh {cfg.mesh}")
        s = train(cfg, resume=args.resume == "auto", log=lambda msg: print(f"hsa-train: {msg}"))
    except (ConfigError, FloatingPointError) as e:
        print(f"hsa-train: error: {e}", file=sys.stderr)
        return 2
    if s["steps_run"]:
        ev = "not run" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        print(f"hsa-train: steps {s['start_step']}->{s['final_step']}: loss {s['first_loss']:.4f} -> "
              f"{s['last_loss']:.4f}; eval loss {ev}")
    else:
        print(f"hsa-train: nothing to do: the workdir is already at step {s['final_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
