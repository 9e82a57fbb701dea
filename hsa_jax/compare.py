"""`hsa-compare`: check our forward against outputs of the original PyTorch model.

REF.npz holds `param/<original state_dict key>` arrays, `input_ids` (N, L) and `logits` (N, L, V), and
optionally `hidden_states/<i>` (output of backbone layer i; the last is norm_f's output),
`chunking/{mem_k,mem_v,landmarks}` and `retrieval/<g>/dense_chunk_weights`. The tool loads the weights
into our model, runs the fp32 forward and reports max-abs and relative errors per output. It exits 0
iff the logits match within --atol.

With `--decode DECODE.npz` it checks the cached decoder (hsa_jax/decode.py) instead: DECODE.npz holds
`prompt_ids` (N, P), `prompt_logits` (N, P, V), `fed_tokens` (N, s), `step_logits` (N, s, V) and optionally
`seg128_last_segment_logits` (the last segment's logits of a prefill in 128-token segments); the weights
come from `--reference MODEL.npz` or from DECODE.npz's own `param/` arrays. The tool prefills the prompt,
feeds the continuation tokens one at a time and exits 0 iff every compared output is within --atol.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.config import ConfigError, SWAHSAConfig
from hsa_jax.drt import compare_drt
from hsa_jax.interop import CheckpointMismatchError, load_state_dict, read_state_dict
from hsa_jax.model import SWAHSAForCausalLM



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


def build_model(cfg, state_dict: dict[str, np.ndarray], model_cls=SWAHSAForCausalLM):
    """A model holding the given original weights (initialised abstractly, then filled)."""
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    # eval_shape leaves ShapeDtypeStructs; give every parameter a concrete buffer before loading.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    model = nnx.merge(graphdef, state)
    load_state_dict(model, state_dict)
    return model


def _row(name, ours, ref) -> Row:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: our shape {ours.shape} != reference shape {ref.shape}")
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return Row(name, err, err / scale if scale else err)


@dataclasses.dataclass
class DecodeReport(Report):
    """Every row must be within atol (prompt logits, step logits, segmented-prefill logits)."""

    @property
    def logits(self) -> Row:
        return max(self.rows, key=lambda r: r.max_abs)

    @property
    def ok(self) -> bool:
        return all(r.max_abs <= self.atol for r in self.rows)


def compare_decode(cfg, params: dict[str, np.ndarray], decode: dict[str, np.ndarray], *, atol: float = 1e-4,
                   segment: int = 16384, model_cls=SWAHSAForCausalLM) -> DecodeReport:
    """Prefills decode["prompt_ids"] through the cached decoder (segments of `segment` tokens), then feeds
    decode["fed_tokens"] one per step; compares prompt and step logits (fp32)."""
    from hsa_jax.decode import make_decoder

    for key in ("prompt_ids", "prompt_logits", "fed_tokens", "step_logits"):
        if key not in decode:
            raise ValueError(f"the decode file has no '{key}' array")
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    model = build_model(cfg, params, model_cls)
    prompt, fed = np.asarray(decode["prompt_ids"]), np.asarray(decode["fed_tokens"])
    capacity = prompt.shape[1] + fed.shape[1]
    rows = []
    with jax.default_matmul_precision("highest"):
        dec = make_decoder(model, segment_len=segment)
        logits, cache = dec.prefill(prompt, logits="all", capacity=capacity)
        rows.append(_row("prompt_logits", logits, decode["prompt_logits"]))
        steps = []
        for s in range(fed.shape[1]):
            step_logits, cache = dec.step(fed[:, s], cache)
            steps.append(np.asarray(step_logits))
        rows.append(_row("step_logits", np.stack(steps, 1), decode["step_logits"]))
        if "seg128_last_segment_logits" in decode:
            ref = decode["seg128_last_segment_logits"]
            logits, _ = make_decoder(model, segment_len=128).prefill(prompt, logits="all")
            rows.append(_row("seg128_last_segment_logits", np.asarray(logits)[:, -ref.shape[1]:], ref))
    return DecodeReport(rows, atol)


def compare_decode_swa_hsa(config_path: pathlib.Path, params: dict[str, np.ndarray], decode: dict[str, np.ndarray],
                           *, atol: float, impl: str, segment: int) -> DecodeReport:
    return compare_decode(SWAHSAConfig.from_json(config_path, hsa_impl=impl), params, decode, atol=atol,
                          segment=segment)


def dense_chunk_weights(weights_NxTxHxK, indices_NxTxHxK, num_chunks: int):
    """Scatter-add of slot weights onto chunk ids: (N, T, H, C); independent of slot order and ties."""
    onehot = jax.nn.one_hot(indices_NxTxHxK, num_chunks, dtype=jnp.float32)
    return jnp.einsum("nthk,nthkc->nthc", weights_NxTxHxK, onehot)


def compare_reference(cfg: SWAHSAConfig, ref: dict[str, np.ndarray], *, atol: float = 1e-4) -> Report:
    """Runs our fp32 forward on ref's weights and inputs; compares every output ref holds."""
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    model = build_model(cfg, {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")})
    with jax.default_matmul_precision("highest"):
        logits, aux = model(jnp.asarray(ref["input_ids"]), return_hidden=True)
    rows = [_row("logits", logits, ref["logits"])]
    for key in sorted(k for k in ref if k.startswith("hidden_states/")):
        rows.append(_row(key, aux["hidden_states"][int(key.split("/")[1])], ref[key]))
    for name in ("mem_k", "mem_v", "landmarks"):
        if f"chunking/{name}" in ref:
            rows.append(_row(f"chunking/{name}", aux["chunking"][name], ref[f"chunking/{name}"]))
    for g, r in enumerate(aux["retrieval"]):
        key = f"retrieval/{g}/dense_chunk_weights"
        if key in ref:
            ours = dense_chunk_weights(r["chunk_weights"], r["indices"], ref[key].shape[-1])
            rows.append(_row(key, ours, ref[key]))
    return Report(rows, atol)


def compare_swa_hsa(config_path: pathlib.Path, ref: dict[str, np.ndarray], *, atol: float, impl: str) -> Report:
    return compare_reference(SWAHSAConfig.from_json(config_path, hsa_impl=impl), ref, atol=atol)


# --model-type -> comparison: (config path, reference arrays, atol, impl) -> Report.
MODEL_TYPES = {"swa_hsa": compare_swa_hsa, "drt": compare_drt}
# --model-type with --decode -> (config path, params {original key: array}, decode arrays, atol, impl, segment)
# -> DecodeReport.
DECODE_TYPES = {"swa_hsa": compare_decode_swa_hsa}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hsa-compare",
        description="Compare hsa-jax's forward with reference outputs of the original PyTorch model. "
                    "Exits 0 iff the logits match within --atol.")
    p.add_argument("--model-type", choices=sorted(MODEL_TYPES), required=True,
                   help="model family of the reference (swa_hsa: RamstorageAI SWA+HSA; drt: ant-research DRT/GCA)")
    p.add_argument("--config", required=True, type=pathlib.Path,
                   help="original HF-style config.json of the reference model")
    p.add_argument("--reference", type=pathlib.Path, default=None,
                   help="REF.npz with param/<key> weights, input_ids, logits and optional hidden_states/<i> "
                        "(with --decode: only its param/ weights are used; optional when DECODE.npz has them)")
    p.add_argument("--decode", type=pathlib.Path, default=None,
                   help="DECODE.npz (prompt_ids, prompt_logits, fed_tokens, step_logits): check the cached "
                        "decoder: prefill the prompt, feed the tokens one at a time, compare both logits")
    p.add_argument("--segment", type=int, default=16384,
                   help="with --decode: prefill segment length (default 16384, the original's inference_segment)")
    p.add_argument("--weights", type=pathlib.Path, default=None,
                   help="take the weights from this checkpoint (.safetensors/.npz/.bin) instead of REF.npz")
    p.add_argument("--atol", type=float, default=1e-4, help="max-abs tolerance on the logits (default 1e-4)")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas", "interpret"),
                   help="HSA attention backend (default auto: Pallas on GPU, XLA reference elsewhere)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.decode is not None:
        return _main_decode(args)
    if args.reference is None:
        print("hsa-compare: error: --reference is required (unless --decode is given)", file=sys.stderr)
        return 2
    try:
        with np.load(args.reference) as data:
            ref = {k: data[k] for k in data.files}
        for key in ("input_ids", "logits"):
            if key not in ref:
                raise ValueError(f"{args.reference} has no '{key}' array")
        if args.weights is not None:
            ref = {k: v for k, v in ref.items() if not k.startswith("param/")}
            ref.update({f"param/{k}": v for k, v in read_state_dict(args.weights).items()})
        report = MODEL_TYPES[args.model_type](args.config, ref, atol=args.atol, impl=args.impl)
    except (ConfigError, CheckpointMismatchError, ValueError, FileNotFoundError) as e:
        print(f"hsa-compare: error: {e}", file=sys.stderr)
        return 2
    print(f"hsa-compare: {args.reference} (config {args.config}, backend {jax.default_backend()})")
    print(report.format())
    return 0 if report.ok else 1


def _main_decode(args) -> int:
    try:
        if args.model_type not in DECODE_TYPES:
            raise ValueError(f"--decode is not available for --model-type {args.model_type} "
                             f"(available: {sorted(DECODE_TYPES)})")
        with np.load(args.decode) as data:
            decode = {k: data[k] for k in data.files}
        params = {k[len("param/"):]: v for k, v in decode.items() if k.startswith("param/")}
        if args.weights is not None:
            params = read_state_dict(args.weights)
        elif args.reference is not None:
            params = read_state_dict(args.reference)
        if not params:
            raise ValueError(f"{args.decode} holds no param/ arrays: pass the weights with --reference MODEL.npz "
                             f"or --weights")
        report = DECODE_TYPES[args.model_type](args.config, params, decode, atol=args.atol, impl=args.impl,
                                               segment=args.segment)
    except (ConfigError, CheckpointMismatchError, ValueError, FileNotFoundError) as e:
        print(f"hsa-compare: error: {e}", file=sys.stderr)
        return 2
    print(f"hsa-compare --decode: {args.decode} (config {args.config}, weights "
          f"{args.weights or args.reference or args.decode}, segment {args.segment}, backend {jax.default_backend()})")
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
