"""What every hsa_jax command line shares: the error-to-exit-code wrapper, the model-source argument
group and its `key=value` overrides.

Exit codes: 0 success; 2 an expected failure (bad flag, field, file or value), printed as ONE line
`<prog>: error: <what>` naming it; 3 a bug, printed as its traceback followed by a line saying so.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

from hsa_jax.common.config import ConfigError
from hsa_jax.loading import load_model
from hsa_jax.registry import FAMILIES

EXIT_BAD_INPUT = 2
EXIT_BUG = 3


def expected_errors() -> tuple[type, ...]:
    """Exceptions that mean bad input rather than a bug: ConfigError (fields, overrides, checkpoints),
    CheckpointMismatchError and CacheCapacityError (ValueErrors), missing/unreadable files, data errors."""
    from data_pipeline import DataPipelineError
    return (ConfigError, ValueError, OSError, DataPipelineError)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (multi-line listings joined with '; ')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__


def run_cli(prog: str, body, *args) -> int:
    """body(*args) -> exit code; expected failures -> 2 with one line, bugs -> traceback + a line, 3."""
    try:
        return body(*args)
    except expected_errors() as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: show where
        traceback.print_exc()
        print(f"{prog}: internal error (a bug, not a problem with your input): please report the traceback above",
              file=sys.stderr)
        return EXIT_BUG


def add_model_source(p: argparse.ArgumentParser):
    """--checkpoint/--step or --weights/--config/--model-type, and positional key=value overrides of the
    model's inference-time fields."""
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", type=pathlib.Path,
                     help="hsa-train workdir (or checkpoints/ or a checkpoints/<step> dir); newest readable step")
    src.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable one)")
    src.add_argument("--weights", type=pathlib.Path, help="original weights (.safetensors/.npz/.bin), with --config")
    src.add_argument("--config", type=pathlib.Path, help="original HF-style config.json (with --weights)")
    src.add_argument("--model-type", choices=sorted(FAMILIES), default="swa_hsa",
                     help="model family of --weights/--config (default swa_hsa; checkpoints record theirs)")
    fields = sorted({f for fam in FAMILIES.values() for f in fam.inference_fields})
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"model overrides (the hsa-train syntax, YAML values; `model.` prefix optional), "
                        f"limited to the inference-time fields: {', '.join(fields)}")


def load_model_from_args(args, log=None):
    log = log or (lambda msg: print(msg, file=sys.stderr))
    return load_model(checkpoint=args.checkpoint, weights=args.weights, config=args.config,
                      model_type=args.model_type, step=args.step, settings=args.overrides, log=log)


def comma_ints(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None
