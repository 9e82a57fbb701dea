"""Model families by name (`model_type` in run configs, `--model-type` in CLIs).

A family's config class has `from_dict`, `to_dict`, `chunk_size`, `vocab_size` and `check_length(T)`;
its model class is built as `Model(cfg, rngs=...)` and called as `model(ids (N, T), train=, rng=,
remat=, scan_layers=)` -> logits (N, T, V) fp32 aligned with the input tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from hsa_jax.config import ConfigError, SWAHSAConfig
from hsa_jax.drt import DRTForCausalLM, strip_buffers
from hsa_jax.drt_config import DRTConfig
from hsa_jax.model import SWAHSAForCausalLM


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    config_cls: type
    model_cls: type
    # original PyTorch state_dict -> the parameters hsa_jax.interop.load_state_dict takes (checked)
    from_original: Callable = lambda cfg, state_dict: state_dict


FAMILIES: dict[str, ModelFamily] = {
    "swa_hsa": ModelFamily(SWAHSAConfig, SWAHSAForCausalLM),
    "drt": ModelFamily(DRTConfig, DRTForCausalLM, strip_buffers),
}


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"config field model_type={name!r} is invalid: must be one of {sorted(FAMILIES)}")
    return FAMILIES[name]
