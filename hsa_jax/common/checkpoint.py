"""The on-disk layout of hsa-train checkpoints, and restoring one for inference.

`<workdir>/checkpoints/<step>/` is an Orbax CheckpointManager step with three items:
    state   StandardCheckpointHandler: {"params", "opt_state", "step", "rng"} (global jax.Arrays)
    data    JSON {"next_step": step} (the data position)
    config  JSON: the run config (model_type, model, data, optim, mesh, run)
train/checkpoint.py writes them through `save_args`; inference reads them here (hsa_jax never imports
train/). Reading never creates or changes anything on disk.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from hsa_jax.common.config import ConfigError


class CheckpointNotFound(ConfigError):
    """No readable checkpoint at the path (or not the step asked for)."""


def save_args(state, data: dict, config: dict):
    """The Orbax arguments of one checkpoint step (the three items above)."""
    import orbax.checkpoint as ocp
    return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                              config=ocp.args.JsonSave(config))


def config_restore_args():
    import orbax.checkpoint as ocp
    return ocp.args.Composite(config=ocp.args.JsonRestore())


def state_restore_args(abstract_state):
    import orbax.checkpoint as ocp
    return ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))


def _read_only_manager(directory: pathlib.Path):
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})


def resolve(path: str | pathlib.Path, step: int | None = None) -> tuple[pathlib.Path, int | None]:
    """(the checkpoints/ directory, the step) of a workdir, its checkpoints/ dir or one step dir."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise CheckpointNotFound(f"checkpoint {path}: no such directory (give an hsa-train workdir, its "
                                 f"checkpoints/ dir or a checkpoints/<step> dir)")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "state").is_dir() and path.name.isdigit():
        path, step = path.parent, int(path.name) if step is None else step
    return path, step


def restore_params(path: str | pathlib.Path, step: int | None = None, log=print):
    """-> (raw params pytree, run config dict, step) of the newest readable checkpoint at `path` (or of
    `step`), restored onto the default device whatever mesh saved them. An unreadable newest checkpoint
    is reported through `log` and the previous one is used; an explicit step is never replaced."""
    directory, step = resolve(path, step)
    mgr = _read_only_manager(directory)
    try:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise CheckpointNotFound(f"checkpoint {directory}: no checkpoints there (expected an hsa-train "
                                     f"workdir or its checkpoints/ dir)")
        if step is not None and step not in steps:
            raise CheckpointNotFound(f"checkpoint {directory}: no step {step}; steps there: {steps}")
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        for s in ([step] if step is not None else steps[::-1]):
            try:
                run_cfg = mgr.restore(s, args=config_restore_args()).config
                meta = mgr.item_metadata(s).state
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
                raw = mgr.restore(s, args=state_restore_args(target)).state["params"]
                return raw, run_cfg, s
            except Exception as e:  # a partial or corrupt step
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if step is not None:
                    raise CheckpointNotFound(f"checkpoint {directory / str(s)} is unreadable ({reason})") from e
                log(f"checkpoint {directory / str(s)} is unreadable ({reason}); trying the previous one")
        raise CheckpointNotFound(f"checkpoint {directory}: no readable checkpoint among steps {steps}")
    finally:
        mgr.close()


def fill_model(model_cls, cfg, raw, where: str):
    """A model of `model_cls` holding the parameters of a restored checkpoint tree."""
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = []
    for keys, var in nnx.to_flat_state(state):
        node = raw
        for k in keys:
            node = node[str(k)] if str(k) in node else node[k]
        value = node["value"] if isinstance(node, dict) else node
        if tuple(value.shape) != tuple(var.shape):
            raise ConfigError(f"checkpoint {where}: {'.'.join(map(str, keys))} has shape {value.shape}, "
                              f"the model wants {var.shape}")
        flat.append((keys, var.replace(jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
