"""Run configuration: typed sections loaded from YAML, overridable as key=value on the command line.

    model_type: model family (hsa_jax/registry.py), default swa_hsa
    model:  that family's config fields (original HF-style names)
    data:   token index and batch shape
    optim:  AdamW, warmup + cosine decay to a floor, clipping, gradient accumulation
    mesh:   device mesh axes (data, fsdp, tensor); -1 fills with the remaining devices
    run:    workdir, steps, cadence of logs/evals/checkpoints, seed, precision policy

An override is `section.field=value` or just `field=value` when the field name is unique across
sections (`steps=100`, `workdir=/tmp/run`, `model.hidden_size=256`). Values are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import yaml

from hsa_jax.common.config import ConfigError, require, typed_fields
from hsa_jax.common.config import apply_overrides as common_overrides
from hsa_jax.registry import family
from train.sharding import merge_rules

DATA_MODES = ("random", "across_docs", "sequential")
NAN_POLICIES = ("skip", "stop")
REMAT_POLICIES = ("none", "layer")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    index: str = "bundled"  # a token index dir (hsa-preprocess build), or "bundled" (pydoc corpus)
    eval_index: str | None = None  # default: the training index
    seq_len: int = 256  # model input length L; batches hold L + 1 tokens (inputs and shifted labels)
    global_batch_size: int = 8
    mode: str = "random"
    worker_count: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.001
    warmup_ratio: float = 0.02
    min_lr_ratio: float = 0.2  # cosine decays to min_lr_ratio * lr
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict | None = None  # logical axis -> mesh axis or null, over train/sharding.py RULES


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str = "runs/default"
    steps: int = 300
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    nan_policy: str = "skip"
    remat: str = "none"
    # true: identical consecutive layers run as one scan (compile time independent of depth; use with
    # remat=layer: a scan without remat keeps every layer's intermediates, 370M at 8K ran out of memory).
    # false: unrolled, faster per step (H200: 125M 0.141 vs 0.176 s; docs/benchmarks.md)
    scan_layers: bool = False
    # > 0: the LM head + log-softmax run over that many positions at a time (the N x T x V logits never
    # whole: 13 GiB fp32 at 8 x 8192 x 50K); 0: whole logits, faster on H200 (125M: 147 vs 156 ms per step)
    loss_chunk: int = 0
    collective_overlap: bool = True  # GPU: XLA flags that overlap FSDP/data-parallel collectives (train/xla_flags.py)
    profile_steps: int = 0  # > 0: trace that many steps with jax.profiler into WORKDIR/profile (process 0)
    profile_from: int = 10  # the traced steps start after this step (compilation and warm-up excluded)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig, "run": RunConfig}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: Any  # the config class of `model_type`
    model_type: str = "swa_hsa"
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self):
        d, o, r, m = self.data, self.optim, self.run, self.mesh
        require(d.mode in DATA_MODES, "data.mode", d.mode, f"one of {DATA_MODES}")
        require(d.seq_len > 0 and d.seq_len % self.model.chunk_size == 0, "data.seq_len", d.seq_len,
                 f"a positive multiple of model.chunk_size={self.model.chunk_size}")
        require(d.global_batch_size > 0, "data.global_batch_size", d.global_batch_size, "> 0")
        require(o.grad_accum > 0 and d.global_batch_size % o.grad_accum == 0, "optim.grad_accum", o.grad_accum,
                 f"a positive divisor of data.global_batch_size={d.global_batch_size}")
        require(o.lr > 0, "optim.lr", o.lr, "> 0")
        require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "in [0, 1)")
        require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
        require(o.clip_norm > 0, "optim.clip_norm", o.clip_norm, "> 0")
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
            require(isinstance(getattr(r, name), int) and getattr(r, name) > 0, f"run.{name}", getattr(r, name),
                     "a positive integer")
        require(r.nan_policy in NAN_POLICIES, "run.nan_policy", r.nan_policy, f"one of {NAN_POLICIES}")
        require(r.remat in REMAT_POLICIES, "run.remat", r.remat, f"one of {REMAT_POLICIES}")
        require(r.loss_chunk >= 0, "run.loss_chunk", r.loss_chunk, "0 (whole logits) or a chunk length > 0")
        for name in ("profile_steps", "profile_from"):
            require(isinstance(getattr(r, name), int) and getattr(r, name) >= 0, f"run.{name}", getattr(r, name),
                     "an integer >= 0")
        require(isinstance(r.collective_overlap, bool), "run.collective_overlap", r.collective_overlap, "true or false")
        for name in ("data", "fsdp", "tensor"):
            v = getattr(m, name)
            require(isinstance(v, int) and (v > 0 or v == -1), f"mesh.{name}", v, "a positive integer or -1")
        require([m.data, m.fsdp, m.tensor].count(-1) <= 1, "mesh", dataclasses.asdict(m), "at most one axis = -1")
        require(m.rules is None or isinstance(m.rules, dict), "mesh.rules", m.rules,
                "a mapping of logical axis to mesh axis, e.g. {vocab: fsdp}")
        merge_rules(m.rules)  # unknown axis names fail here, before any work

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "model": self.model.to_dict(),
                **{k: dataclasses.asdict(getattr(self, k)) for k in SECTIONS}}


def _build(raw: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(raw) - {"model_type", "model", *SECTIONS})
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}; allowed: {['model_type', 'model', *SECTIONS]}")
    if "model" not in raw:
        raise ConfigError("config has no 'model' section")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping of fields, got {values!r}")
        sections[name] = cls(**typed_fields(cls, values, name))
    model_type = raw.get("model_type", "swa_hsa")
    model_cls = family(model_type).config_cls
    if not isinstance(raw["model"], dict):
        raise ConfigError(f"config section 'model' must be a mapping of fields, got {raw['model']!r}")
    # A run config names model fields on purpose: a misspelt one is an error, not a warning.
    model = model_cls.from_dict(typed_fields(model_cls, raw["model"], "model", model_cls.IGNORED_FIELDS))
    return TrainConfig(model=model, model_type=model_type, **sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The run config's override syntax (hsa_jax.common.config.apply_overrides) over its sections; the
    model section's fields are those of the model family named by `model_type`."""
    model_type = raw.get("model_type", "swa_hsa")
    for item in overrides:  # a model_type override changes which fields the model section has
        key, sep, value = item.partition("=")
        if sep and key.strip() == "model_type":
            model_type = yaml.safe_load(value)
    sections = {"": {"model_type"}, **{name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()},
                "model": {f.name for f in dataclasses.fields(family(model_type).config_cls)}}
    return common_overrides(raw, overrides, sections)


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Loads a YAML run config (None: the embedded default, configs/tiny.yaml) and applies overrides."""
    path = pathlib.Path(path) if path else default_config()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read run config {path}: {e}") from e
    try:
        return _build(apply_overrides(raw, list(overrides)))
    except TypeError as e:  # a dataclass got a field of the wrong kind
        raise ConfigError(f"{path}: {e}") from e


def default_config() -> pathlib.Path:
    """configs/tiny.yaml: in a source checkout beside this package; in an installed wheel under
    <prefix>/share/hsa-jax/configs/ (pyproject's data-files), the prefix being the environment's or the
    one the package was installed into (<prefix>/lib/pythonX.Y/site-packages/train/config.py)."""
    here = pathlib.Path(__file__).resolve()
    candidates = [here.parent.parent / "configs" / "tiny.yaml",
                  *(pathlib.Path(base) / "share" / "hsa-jax" / "configs" / "tiny.yaml"
                    for base in (here.parents[4] if len(here.parents) > 4 else here.parent, sys.prefix))]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"the embedded default run config is missing from this install (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)}); pass --config FILE")
