"""DRT state_dict interop: what hsa_jax/common/interop.py does not know about the original's keys (the
ALiBi buffers `...self_attn.m`, recomputed from the config, and the tied `lm_head.weight`)."""

from __future__ import annotations

import numpy as np

from hsa_jax.common.interop import TIED_HEAD_KEY, CheckpointMismatchError, export_state_dict, load_state_dict
from hsa_jax.models.drt.config import DRTConfig
from hsa_jax.models.drt.model import EMBED_KEY, DRTForCausalLM


def _alibi_buffer_keys(cfg: DRTConfig) -> list[str]:
    keys = [f"model.lower_layers.{i}.self_attn.m" for i in range(cfg.num_lower_layers)]
    keys += [f"model.upper_layers.{g}.{i}.self_attn.m"
             for g, n in enumerate(cfg.upper_group_layers) for i in range(n)]
    return keys


def strip_buffers(cfg: DRTConfig, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original state_dict without what is not a parameter here, after checking it: the tied
    `lm_head.weight` must equal the embedding, and each ALiBi buffer must hold the slopes the
    config implies (they are recomputed, never loaded)."""
    sd = dict(state_dict)
    problems = []
    head = sd.pop(TIED_HEAD_KEY, None)
    if head is not None and EMBED_KEY in sd and not np.array_equal(head, sd[EMBED_KEY]):
        problems.append(f"{TIED_HEAD_KEY} differs from {EMBED_KEY}, but DRT ties them")
    slopes = np.asarray(cfg.alibi_slopes(), np.float32)
    for key in _alibi_buffer_keys(cfg):
        if key in sd:
            m = np.asarray(sd.pop(key), np.float32)
            if m.shape != slopes.shape or not np.allclose(m, slopes, rtol=1e-6, atol=0):
                problems.append(f"{key} = {m.tolist()} is not the ALiBi slopes 2^(-8(h+1)/H) = {slopes.tolist()}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the model:\n" + "\n".join(f"  {p}" for p in problems))
    return sd


def load_original_state_dict(model: DRTForCausalLM, state_dict: dict[str, np.ndarray]) -> None:
    """Copies an original DRT state_dict into the model in place (interop.load_state_dict rules)."""
    load_state_dict(model, strip_buffers(model.cfg, state_dict))


def export_original_state_dict(model: DRTForCausalLM) -> dict[str, np.ndarray]:
    """The original state_dict: parameters, the tied head and the ALiBi buffers, float32."""
    sd = export_state_dict(model)  # the tied head included
    if model.cfg.enable_alibi:
        slopes = np.asarray(model.cfg.alibi_slopes(), np.float32)
        sd.update({k: slopes.copy() for k in _alibi_buffer_keys(model.cfg)})
    return sd
