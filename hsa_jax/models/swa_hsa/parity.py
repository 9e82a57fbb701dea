"""SWA+HSA parity against the original: the forward (logits, per-layer hidden states, chunk memory,
retrieval weights) and the cached decoder, as hsa-compare and the parity tests run them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hsa_jax.common.parity import DecodeReport, Report, build_model, compare_decode, dense_chunk_weights, \
    reference_params, row
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.swa_hsa.decode import SWAHSADecoder
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM


def compare_reference(cfg: SWAHSAConfig, ref: dict[str, np.ndarray], *, atol: float = 1e-4) -> Report:
    """Runs our fp32 forward on ref's weights and inputs; compares every output ref holds: `logits`,
    `hidden_states/<i>` (backbone layer i; the last is norm_f's output), `chunking/{mem_k,mem_v,landmarks}`
    and `retrieval/<g>/dense_chunk_weights`."""
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    model = build_model(cfg, reference_params(ref), SWAHSAForCausalLM)
    with jax.default_matmul_precision("highest"):
        logits, aux = model(jnp.asarray(ref["input_ids"]), return_hidden=True)
    rows = [row("logits", logits, ref["logits"])]
    for key in sorted(k for k in ref if k.startswith("hidden_states/")):
        rows.append(row(key, aux["hidden_states"][int(key.split("/")[1])], ref[key]))
    for name in ("mem_k", "mem_v", "landmarks"):
        if f"chunking/{name}" in ref:
            rows.append(row(f"chunking/{name}", aux["chunking"][name], ref[f"chunking/{name}"]))
    for g, r in enumerate(aux["retrieval"]):
        key = f"retrieval/{g}/dense_chunk_weights"
        if key in ref:
            ours = dense_chunk_weights(r["chunk_weights"], r["indices"], ref[key].shape[-1])
            rows.append(row(key, ours, ref[key]))
    return Report(rows, atol)


def compare_decode_reference(cfg: SWAHSAConfig, params: dict[str, np.ndarray], decode: dict[str, np.ndarray], *,
                             atol: float = 1e-4, segment: int = 16384) -> DecodeReport:
    """The cached decoder against the original's decode fixture (common.parity.compare_decode)."""
    model = build_model(cfg.replace(dtype="float32", param_dtype="float32"), params, SWAHSAForCausalLM)
    return compare_decode(model, SWAHSADecoder, decode, atol=atol, segment=segment)
