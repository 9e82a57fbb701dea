"""`hsa-export CHECKPOINT OUT_DIR`: an hsa-train checkpoint (a workdir, its checkpoints/ dir or one
checkpoints/<step> dir) of any family -> OUT_DIR/config.json (the original's HF-style fields) and
OUT_DIR/model.safetensors (the original state_dict keys), loadable by the original PyTorch code and by
`hsa-generate/hsa-eval --weights OUT_DIR/model.safetensors --config OUT_DIR/config.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from hsa_jax.cli.common import run_cli
from hsa_jax.common.config import ConfigError
from hsa_jax.loading import restore_checkpoint
from hsa_jax.registry import family_of


def export(checkpoint, out_dir, step: int | None = None, log=print) -> pathlib.Path:
    """Writes OUT_DIR/config.json and OUT_DIR/model.safetensors; -> OUT_DIR."""
    from safetensors.numpy import save_file

    model, run_cfg = restore_checkpoint(checkpoint, step, log=log)
    fam = family_of(model)
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT_DIR {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": fam.name, **model.cfg.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors refuses shared buffers (the tied head is the embedding): one copy per key.
    save_file({k: np.array(v, copy=True) for k, v in fam.to_original(model).items()}, str(out / "model.safetensors"))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hsa-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=pathlib.Path, metavar="CHECKPOINT", help="hsa-train workdir or checkpoint dir")
    p.add_argument("out_dir", type=pathlib.Path, metavar="OUT_DIR", help="where config.json and model.safetensors go")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable one)")
    return p.parse_args(argv)


def _main(args) -> int:
    out = export(args.checkpoint, args.out_dir, args.step, log=lambda m: print(f"hsa-export: {m}", file=sys.stderr))
    print(f"hsa-export: wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


def main(argv=None) -> int:
    return run_cli("hsa-export", lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
