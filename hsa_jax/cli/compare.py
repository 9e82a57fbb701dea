"""`hsa-compare`: check our forward against outputs of the original PyTorch model.

REF.npz holds `param/<original state_dict key>` arrays, `input_ids` (N, L) and `logits` (N, L, V), and
optionally `hidden_states/<i>` (output of backbone layer i; the last is norm_f's output),
`chunking/{mem_k,mem_v,landmarks}` and `retrieval/<g>/dense_chunk_weights`. The tool loads the weights
into our model, runs the fp32 forward and reports max-abs and relative errors per output. It exits 0
iff the logits match within --atol.

With `--decode DECODE.npz` it checks the cached decoder (registry.make_decoder) instead: DECODE.npz holds
`prompt_ids` (N, P), `prompt_logits` (N, P, V), `fed_tokens` (N, s), `step_logits` (N, s, V) and optionally
`seg128_last_segment_logits` (the last segment's logits of a prefill in 128-token segments); the weights
come from `--reference MODEL.npz` or from DECODE.npz's own `param/` arrays. The tool prefills the prompt,
feeds the continuation tokens one at a time and exits 0 iff every compared output is within --atol.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

from hsa_jax.cli.common import run_cli
from hsa_jax.common.config import IMPLS, ConfigError
from hsa_jax.common.interop import read_state_dict
from hsa_jax.common.parity import reference_params
from hsa_jax.registry import FAMILIES, family


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hsa-compare",
        description="Compare hsa-jax's forward with reference outputs of the original PyTorch model. "
                    "Exits 0 iff the logits match within --atol.")
    p.add_argument("--model-type", choices=sorted(FAMILIES), required=True,
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
    p.add_argument("--impl", default="auto", choices=IMPLS,
                   help="attention backend, hsa_impl or gca_impl (default auto: Pallas on GPU, XLA reference elsewhere)")
    return p.parse_args(argv)


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable .npz ({e})") from None


def _config(args):
    fam = family(args.model_type)
    return fam, fam.config_cls.from_json(args.config, **{fam.impl_field: args.impl})


def _main(args) -> int:
    if args.decode is not None:
        return _main_decode(args)
    if args.reference is None:
        raise ConfigError("--reference is required (unless --decode is given)")
    ref = _read_npz(args.reference)
    for key in ("input_ids", "logits"):
        if key not in ref:
            raise ConfigError(f"--reference {args.reference} has no '{key}' array")
    if args.weights is not None:
        ref = {k: v for k, v in ref.items() if not k.startswith("param/")}
        ref.update({f"param/{k}": v for k, v in read_state_dict(args.weights).items()})
    fam, cfg = _config(args)
    report = fam.compare(cfg, ref, atol=args.atol)
    print(f"hsa-compare: {args.reference} (config {args.config}, backend {jax.default_backend()})")
    print(report.format())
    return 0 if report.ok else 1


def _main_decode(args) -> int:
    fam, cfg = _config(args)
    if fam.compare_decode is None:
        raise ConfigError(f"--decode is not available for --model-type {args.model_type} (available: "
                          f"{sorted(n for n, f in FAMILIES.items() if f.compare_decode is not None)})")
    decode = _read_npz(args.decode)
    params = reference_params(decode)
    if args.weights is not None:
        params = read_state_dict(args.weights)
    elif args.reference is not None:
        params = read_state_dict(args.reference)
    if not params:
        raise ConfigError(f"--decode {args.decode} holds no param/ arrays: pass the weights with --reference "
                          f"MODEL.npz or --weights")
    report = fam.compare_decode(cfg, fam.from_original(cfg, params), decode, atol=args.atol, segment=args.segment)
    print(f"hsa-compare --decode: {args.decode} (config {args.config}, weights "
          f"{args.weights or args.reference or args.decode}, segment {args.segment}, backend {jax.default_backend()})")
    print(report.format())
    return 0 if report.ok else 1


def main(argv=None) -> int:
    return run_cli("hsa-compare", lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
