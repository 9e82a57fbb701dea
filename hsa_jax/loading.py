"""Models for inference, of any registered family: from an hsa-train checkpoint (its run config names
the family) or from original weights + an HF-style config.json; `key=value` overrides may then change
the family's inference-time fields (dtype, attention backend, retrieval top-k)."""

from __future__ import annotations

import pathlib

from flax import nnx

from hsa_jax.common.checkpoint import fill_model, resolve, restore_params
from hsa_jax.common.config import ConfigError
from hsa_jax.common.interop import read_state_dict
from hsa_jax.common.parity import build_model
from hsa_jax.registry import family


def restore_checkpoint(path: str | pathlib.Path, step: int | None = None, log=print):
    """The model of an hsa-train checkpoint: `path` is the run workdir, its checkpoints/ dir or one step
    dir; the newest readable step unless `step`. Parameters only, on the default device whatever mesh
    saved them. -> (model, run config dict)."""
    raw, run_cfg, step = restore_params(path, step, log=log)
    fam = family(run_cfg.get("model_type", "swa_hsa"))
    cfg = fam.config_cls.from_dict(run_cfg["model"])
    return fill_model(fam.model_cls, cfg, raw, f"{resolve(path)[0]}/{step}"), run_cfg


def load_model(*, checkpoint=None, weights=None, config=None, model_type: str = "swa_hsa", step=None,
               settings=(), log=print):
    """From an hsa-train checkpoint, or from original weights + an HF-style config.json of `model_type`;
    `settings` ("key=value" overrides) change the config's inference-time fields."""
    if checkpoint is not None:
        model, _ = restore_checkpoint(checkpoint, step, log=log)
    else:
        if weights is None or config is None:
            raise ConfigError("give --checkpoint, or both --weights and --config")
        fam = family(model_type)
        cfg = fam.config_cls.from_json(config)
        model = build_model(cfg, fam.from_original(cfg, read_state_dict(weights)), fam.model_cls)
    cfg = model.cfg.with_inference_settings(list(settings))
    if cfg != model.cfg:
        set_config(model, cfg)
    return model


def set_config(module, cfg):
    """Propagates a replaced config to every submodule holding one (they share the same object)."""
    for _, m in nnx.iter_graph(module):
        if isinstance(m, nnx.Module) and hasattr(m, "cfg"):
            m.cfg = cfg
