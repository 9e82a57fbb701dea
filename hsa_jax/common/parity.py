"""Parity reports: our fp32 forward (or decoder) against arrays written by the original PyTorch model.
Each family's parity module builds the rows; hsa-compare prints the report."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.common.interop import load_state_dict


@dataclasses.dataclass
class Row:
    name: str
    max_abs: float
    rel: float  # max |ours - ref| / max |ref|


@dataclasses.dataclass
class Report:
    rows: list[Row]
    atol: float

    @property
    def logits(self) -> Row:
        return next(r for r in self.rows if r.name == "logits")

    @property
    def ok(self) -> bool:
        return self.logits.max_abs <= self.atol

    def format(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"{'output':<{width}}  {'max_abs':>10}  {'rel':>10}"]
        lines += [f"{r.name:<{width}}  {r.max_abs:10.3e}  {r.rel:10.3e}" for r in self.rows]
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: logits max_abs {self.logits.max_abs:.3e} {'<=' if self.ok else '>'} atol {self.atol:g}")
        return "\n".join(lines)


@dataclasses.dataclass
class DecodeReport(Report):
    """Every row must be within atol (prompt logits, step logits, segmented-prefill logits)."""

    @property
    def logits(self) -> Row:
        return max(self.rows, key=lambda r: r.max_abs)

    @property
    def ok(self) -> bool:
        return all(r.max_abs <= self.atol for r in self.rows)


def row(name, ours, ref) -> Row:
    """Max-abs and relative error of ours against ref (shapes must agree)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: our shape {ours.shape} != reference shape {ref.shape}")
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return Row(name, err, err / scale if scale else err)


def reference_params(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `param/<key>` arrays of a reference file, keyed by the original state_dict key."""
    return {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}


def build_model(cfg, state_dict: dict[str, np.ndarray], model_cls):
    """A model holding the given weights (initialised abstractly, then filled)."""
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    # eval_shape leaves ShapeDtypeStructs; give every parameter a concrete buffer before loading.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    model = nnx.merge(graphdef, state)
    load_state_dict(model, state_dict)
    return model


def compare_decode(model, make_decoder, decode: dict[str, np.ndarray], *, atol: float = 1e-4,
                   segment: int = 16384) -> DecodeReport:
    """Prefills decode["prompt_ids"] through make_decoder(model) (segments of `segment` tokens), then feeds
    decode["fed_tokens"] one per step; compares prompt and step logits (fp32)."""
    for key in ("prompt_ids", "prompt_logits", "fed_tokens", "step_logits"):
        if key not in decode:
            raise ValueError(f"the decode file has no '{key}' array")
    prompt, fed = np.asarray(decode["prompt_ids"]), np.asarray(decode["fed_tokens"])
    capacity = prompt.shape[1] + fed.shape[1]
    rows = []
    with jax.default_matmul_precision("highest"):
        dec = make_decoder(model, segment_len=segment)
        logits, cache = dec.prefill(prompt, logits="all", capacity=capacity)
        rows.append(row("prompt_logits", logits, decode["prompt_logits"]))
        steps = []
        for s in range(fed.shape[1]):
            step_logits, cache = dec.step(fed[:, s], cache)
            steps.append(np.asarray(step_logits))
        rows.append(row("step_logits", np.stack(steps, 1), decode["step_logits"]))
        if "seg128_last_segment_logits" in decode:
            ref = decode["seg128_last_segment_logits"]
            logits, _ = make_decoder(model, segment_len=128).prefill(prompt, logits="all")
            rows.append(row("seg128_last_segment_logits", np.asarray(logits)[:, -ref.shape[1]:], ref))
    return DecodeReport(rows, atol)


def dense_chunk_weights(weights_NxTxHxK, indices_NxTxHxK, num_chunks: int):
    """Scatter-add of slot weights onto chunk ids: (N, T, H, C); independent of slot order and ties."""
    onehot = jax.nn.one_hot(indices_NxTxHxK, num_chunks, dtype=jnp.float32)
    return jnp.einsum("nthk,nthkc->nthc", weights_NxTxHxK, onehot)
