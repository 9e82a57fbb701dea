"""Model FLOPs per trained token (each family's own count, hsa_jax.registry) and the peak rate of the
device, for MFU."""

from __future__ import annotations

import jax

from hsa_jax.registry import family

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def train_flops_per_token(model_type: str, cfg, seq_len: int) -> float:
    return family(model_type).flops_per_token(cfg, seq_len)


def peak_flops_per_device() -> float | None:
    """bf16 dense peak of the first device, or None when unknown (CPU)."""
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
