"""DRT parity against the original: logits, the original's loss and the `inter/*` intermediates of the
golden fixtures (hsa-compare --model-type drt, tests/test_drt.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hsa_jax.common.losses import token_logprobs
from hsa_jax.common.parity import Report, build_model, dense_chunk_weights, reference_params, row
from hsa_jax.models.drt.config import DRTConfig
from hsa_jax.models.drt.interop import strip_buffers
from hsa_jax.models.drt.model import DRTForCausalLM


def original_loss(logits_NxLxV, input_ids_NxL):
    """The original's training loss: mean next-token CE over the N*(L-1) real targets (labels =
    input_ids; landmark slots predict nothing, and the logits here are already at real tokens)."""
    lp, _ = token_logprobs(logits_NxLxV[:, :-1], input_ids_NxL[:, 1:])
    return -jnp.mean(lp)


def masked_scores_pair(ours, ref):
    """Masked scores made comparable: the -inf entries must coincide (else an infinite error) and
    count as 0."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if not np.array_equal(np.isfinite(ours), np.isfinite(ref)):
        return np.zeros(1), np.full(1, np.inf)
    return np.where(np.isfinite(ours), ours, 0), np.where(np.isfinite(ref), ref, 0)


def compare_drt_reference(cfg: DRTConfig, ref: dict[str, np.ndarray], *, atol: float = 1e-4) -> Report:
    """Runs our fp32 forward on ref's weights and input_ids; compares logits, loss and every `inter/*`
    intermediate ref holds (names as in the DRT golden fixtures)."""
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    params = strip_buffers(cfg, reference_params(ref))
    model = build_model(cfg, params, DRTForCausalLM)
    ids = jnp.asarray(ref["input_ids"])
    with jax.default_matmul_precision("highest"):
        logits, aux = model(ids, return_aux=True)
    N, C = ids.shape[0], ids.shape[1] // cfg.enc_chunk_size
    rows = [row("logits", logits, ref["logits"])]
    if "loss" in ref:
        rows.append(row("loss", original_loss(logits, ids), ref["loss"]))
    if "logits_lmk_slots" in ref:
        rows.append(row("logits_lmk_slots", aux["logits_lmk"], ref["logits_lmk_slots"]))
    ours = {"inter/lower_out": aux["lower_out"], "inter/enc_out": aux["enc_out"],
            "inter/chunk_k_lmkslot": aux["chunk_k"][:, :, -1], "inter/chunk_v_lmkslot": aux["chunk_v"][:, :, -1]}
    for g, r in enumerate(aux["retrieval"]):
        ours[f"inter/retr{g}_query"] = r["query"]
        ours[f"inter/retr{g}_keys"] = r["keys"]
        ours[f"inter/retr{g}_gca_weights"] = r["weights"][:, :-1].reshape(N * (C - 1), -1)
        ours[f"inter/group{g}_layer0_gca_out"] = aux["gca_out"][g][0]
    for key in sorted(k for k in ours if k in ref):
        rows.append(row(key, ours[key], ref[key]))
    for g, r in enumerate(aux["retrieval"]):
        if f"inter/retr{g}_scores_masked" in ref:
            key = f"inter/retr{g}_scores_masked"
            rows.append(row(key, *masked_scores_pair(r["scores"], ref[key])))
        if f"inter/retr{g}_indices" in ref and f"inter/retr{g}_gca_weights" in ref:
            # Chunk -> weight maps: independent of the order of zero-weight (masked) slots.
            ref_w = ref[f"inter/retr{g}_gca_weights"].reshape(N, C - 1, 1, -1)
            ref_dense = dense_chunk_weights(ref_w, ref[f"inter/retr{g}_indices"][:, :-1, None], C)
            our_dense = dense_chunk_weights(r["weights"][:, :-1, None], r["indices"][:, :-1, None], C)
            rows.append(row(f"inter/retr{g}_dense_weights", our_dense, ref_dense))
    return Report(rows, atol)
