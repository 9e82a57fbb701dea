"""Optimizer, loss and the jitted train/eval steps.

TrainState = {"params": nnx.State (fp32 master weights), "opt_state": optax state, "step": int32}.
The model computes in `model.dtype` (bf16 for real runs) from the fp32 parameters.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hsa_jax.common.layers import batch_sharded

from train.config import OptimConfig, TrainConfig

IGNORE_INDEX = -100  # label id excluded from the loss (the original pads with -100)


def lr_schedule(cfg: OptimConfig, steps: int):
    """Linear warmup over ceil(warmup_ratio * steps) steps, then cosine decay to min_lr_ratio * lr
    (HF `cosine_with_min_lr`, as the original recipe)."""
    warmup = math.ceil(cfg.warmup_ratio * steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return cfg.lr * jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params: nnx.State):
    """AdamW decays every parameter except biases and norm weights (HF's rule; our norms are the only
    parameters named `weight`)."""
    flat = nnx.to_flat_state(params)
    return nnx.from_flat_state([(path, path[-1] not in ("bias", "weight")) for path, _ in flat])


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(lr_schedule(o, cfg.run.steps), b1=o.beta1, b2=o.beta2, eps=o.eps,
                    weight_decay=o.weight_decay, mask=decay_mask(params)),
    )


def token_nll(model, ids_NxL1, **kwargs):
    """Per-token negative log-likelihood (fp32) of ids[:, 1:] given ids[:, :-1], and the valid-token mask
    (labels >= 0), from the model's labels= mode (LM head + log-softmax, chunked with loss_chunk > 0)."""
    lp, valid = model(ids_NxL1[:, :-1], labels=ids_NxL1[:, 1:], **kwargs)
    return -lp, valid


def make_loss_and_grads(graphdef, cfg: TrainConfig, mesh=None):
    """-> loss_and_grads(params, batch_ids (B, L+1) int32, rng) -> (loss, grads). Gradients are
    accumulated over `grad_accum` micro-batches; the loss is the mean over all valid tokens of the
    global batch, so accumulation equals one big batch. With a mesh, activations are kept split over
    the batch axes only."""
    from train.sharding import BATCH_AXES
    A, remat = cfg.optim.grad_accum, cfg.run.remat == "layer"

    def nll_sum(params, ids, rng, total_valid):
        model = nnx.merge(graphdef, params)
        with batch_sharded(mesh, BATCH_AXES) if mesh is not None else contextlib.nullcontext():
            nll, _ = token_nll(model, ids, train=True, rng=rng, remat=remat, scan_layers=cfg.run.scan_layers,
                               loss_chunk=cfg.run.loss_chunk)
        return jnp.sum(nll) / total_valid

    def loss_and_grads(params, ids_BxL1, rng):
        total_valid = jnp.maximum(jnp.sum(ids_BxL1[:, 1:] >= 0), 1).astype(jnp.float32)
        micro = ids_BxL1.reshape(A, ids_BxL1.shape[0] // A, ids_BxL1.shape[1])

        def accumulate(carry, xs):
            loss, grads = carry
            ids, i = xs
            l, g = jax.value_and_grad(nll_sum)(params, ids, jax.random.fold_in(rng, i), total_valid)
            return (loss + l, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (micro, jnp.arange(A)))
        return loss, grads

    return loss_and_grads


def make_train_step(graphdef, tx, cfg: TrainConfig, mesh=None):
    """-> train_step(state, batch_ids (B, L+1) int32, rng) -> (state, metrics): `make_loss_and_grads`,
    then clipping + AdamW; a non-finite loss or gradient drops the update (run.nan_policy=skip)."""
    loss_and_grads, nan_policy = make_loss_and_grads(graphdef, cfg, mesh), cfg.run.nan_policy

    def train_step(state, ids_BxL1, rng):
        params = state["params"]
        loss, grads = loss_and_grads(params, ids_BxL1, rng)
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if nan_policy == "skip":  # drop a non-finite update entirely; the step counter still advances
            keep = lambda new, old: jnp.where(finite, new, old)
            new_params = jax.tree.map(keep, new_params, params)
            opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


def make_eval_step(graphdef, mesh=None, loss_chunk: int = 0):
    """-> eval_step(params, ids (B, L+1)) -> (nll sum, valid token count)."""
    from train.sharding import BATCH_AXES

    def eval_step(params, ids_BxL1):
        model = nnx.merge(graphdef, params)
        with batch_sharded(mesh, BATCH_AXES) if mesh is not None else contextlib.nullcontext():
            nll, valid = token_nll(model, ids_BxL1, loss_chunk=loss_chunk)
        return jnp.sum(nll), jnp.sum(valid)
    return eval_step
