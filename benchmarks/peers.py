"""Our HSA and GCA ops against the original Triton kernels, in one process, on the same inputs and timer,
with an agreement check of outputs and gradients.

    PYTHONPATH=. python3 benchmarks/peers.py --original-repo ~/src/long-context-modeling \
        [--drt-repo ~/src/ant-long-context-modeling] [--hsa-shapes 1,8192,16,1,64,8,64 ...]

--original-repo: a local clone of RamstorageAI/long-context-modeling (its `ops/hsa_triton.py`, and the
native-sparse-attention selection kernel it vendors from fla-org, `native_sparse_attention/ops/parallel.py`).
--drt-repo: a local clone of ant-research/long-context-modeling (its `ltriton/gca.py`). Their code is
imported from those paths as it is; nothing of it lives in this repository. They need PyTorch, Triton and
einops (the HSA file also imports pytest) next to jax.

Rows, each as forward / forward+backward ms (median, `benchmarks.common.time_ms`, the same timer for
both frameworks: back-to-back calls, then a device sync):
  ours                the Pallas op (hsa_attention / gca_attention, impl "pallas")
  original            the original's autograd op as shipped: HSA's forward checks its inputs for NaN on
                      the host (torch.any(torch.isnan(...)) asserts, a device sync each)
  original -O         the same file with its host-side asserts compiled out (as `python -O` would)
  NSA (selection)     fla-org's parallel_nsa with the same chunk indices as block indices (no compression
                      or window branch): a different function (one softmax over all selected keys), timed
                      only
Agreement: max |theirs - ours| / max |ours| of the output and of dq, dk, dv, dw (bf16 inputs; "ok" below
--tol). The HSA inputs are what the model makes: each token retrieves K distinct chunks that lie
wholly before its own, most recent first (padding slots: chunk 0, weight 0).

Needs a CUDA GPU: Triton's CPU interpreter (TRITON_INTERPRET=1, triton 3.1) rejects the original HSA
kernel's block pointers and the GCA kernel's autotuner.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import math
import os
import pathlib
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch as well

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import fwd_and_grad_fns, time_ms  # noqa: E402
from benchmarks.gca_kernel import make_inputs as gca_inputs  # noqa: E402
from benchmarks.hsa_kernel import make_inputs as hsa_inputs  # noqa: E402
from pallas_kernels.gca import gca_attention  # noqa: E402
from pallas_kernels.hsa import hsa_attention  # noqa: E402

HSA_SHAPES = ["1,8192,16,1,64,8,64", "1,32768,16,1,64,8,64", "1,131072,16,1,64,8,64"]  # Z,L,HQ,H,D,K,S
GCA_SHAPES = ["1036,12,12,64,8,64,64"]  # B,HQ,H,Lq,K,Lk,D: the DRT recipe (1036 chunk rows)


def fail(msg: str):
    print(f"peers: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def load_file(repo: pathlib.Path, rel: str, strip_asserts: bool):
    """repo/rel imported under a private module name; strip_asserts compiles its assert statements out."""
    path = repo / rel
    if not path.is_file():
        fail(f"{path} does not exist (is {repo} a clone of the right repository?)")
    name = "_peer_" + rel.replace("/", "_").removesuffix(".py") + ("_O" if strip_asserts else "")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = module  # triton's @jit reads the kernels' source through the module
    exec(compile(path.read_text(), str(path), "exec", optimize=1 if strip_asserts else 0), module.__dict__)
    return module


def shapes_arg(text: list[str], fields: int, flag: str) -> list[tuple[int, ...]]:
    out = []
    for s in text:
        try:
            shape = tuple(int(x) for x in s.split(","))
        except ValueError:
            shape = ()
        if len(shape) != fields or min(shape) < 1:
            fail(f"{flag} {s!r}: expected {fields} comma-separated positive integers")
        out.append(shape)
    return out


class Torch:
    """Moves the jax inputs to torch and times/differentiates torch ops with the common timer."""

    def __init__(self):
        import torch
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            fail("torch sees no CUDA device: the original Triton kernels need a GPU")

    def tensor(self, x, dtype=None):
        t = self.torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x).copy())
        return t.to(self.device, dtype or (self.torch.bfloat16 if x.dtype == jnp.bfloat16 else t.dtype)).contiguous()

    def sync(self, out):
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return out

    def fwd_bwd(self, op, n_diff: int):
        """(*args, do) -> (o, grads of the first n_diff args)."""
        def run(*args_and_do):
            *args, do = args_and_do
            leaves = [a.detach().requires_grad_() for a in args[:n_diff]]
            o = op(*leaves, *args[n_diff:])
            o.backward(do)
            return (o, *(a.grad for a in leaves))
        return run

    def numpy(self, t):
        return t.detach().float().cpu().numpy()


def rel(theirs, ours) -> float:
    ours = np.asarray(jnp.asarray(ours, jnp.float32))
    return float(np.abs(theirs - ours).max() / max(np.abs(ours).max(), 1e-30))


def fmt(ms: float) -> str:
    return f"{ms:.3f}"


def failure(e: Exception) -> str:
    """A table cell for a peer op that raised (their code on a Triton/PyTorch release it was not written for)."""
    lines = str(e).strip().splitlines() or [""]
    return f"fails: {type(e).__name__}: {lines[-1][:120]}"


def verdict(errs: dict, tol: float) -> str:
    if not errs:
        return "not compared"
    return "ok" if max(errs.values()) <= tol else "DIFFERS"


def hsa_rows(repo, shapes, th: Torch, nsa: bool, tol: float):
    """One table row per shape, yielded as soon as it is measured."""
    torch = th.torch
    shipped = load_file(repo, "ops/hsa_triton.py", strip_asserts=False)
    stripped = load_file(repo, "ops/hsa_triton.py", strip_asserts=True)
    parallel_nsa = None
    if nsa:
        sys.path.insert(0, str(repo))  # the vendored fla and native_sparse_attention packages
        parallel_nsa = importlib.import_module("native_sparse_attention.ops.parallel").parallel_nsa
    for Z, L, HQ, H, D, K, S in shapes:
        q, k, v, w, idx, do = hsa_inputs(jax.random.key(0), Z, L, L, HQ, H, D, K, S, jnp.bfloat16)
        scale = 1 / math.sqrt(D)
        ours_f, ours_fb = fwd_and_grad_fns(lambda q, k, v, w, i: hsa_attention(q, k, v, w, i, chunk_size=S, scale=scale,
                                                                               impl="pallas"))
        args = (q, k, v, w, idx)
        o, grads = ours_fb(*args, do)
        t_args = [th.tensor(x) for x in (q, k, v)] + [th.tensor(w, torch.float32), th.tensor(idx, torch.int64)]
        t_do = th.tensor(do)
        row = {"ours": (time_ms(ours_f, *args), time_ms(ours_fb, *args, do))}
        errs = {}
        for name, mod in (("original", shipped), ("original -O", stripped)):
            op = lambda q, k, v, w, i, mod=mod: mod.HSA(q, k, v, w, i, 0.0, S, scale)
            fb = th.fwd_bwd(op, 4)
            try:
                if name == "original":
                    theirs = [th.numpy(t) for t in fb(*t_args, t_do)]
                    errs = {n: rel(t, x) for n, t, x in zip(("o", "dq", "dk", "dv", "dw"), theirs, (o, *grads))}
                row[name] = (time_ms(op, *t_args, sync=th.sync), time_ms(fb, *t_args, t_do, sync=th.sync))
            except Exception as e:  # their code on a Triton/PyTorch release it was not written for
                row[name] = failure(e)
        if parallel_nsa is not None:
            g = torch.ones(Z, L, HQ, device=th.device, dtype=torch.bfloat16)
            op = lambda q, k, v, i: parallel_nsa(q, k, v, g_cmp=None, g_slc=g, g_swa=None, block_indices=i,
                                                 block_counts=K, block_size=S, scale=scale)
            nsa_args = (*t_args[:3], t_args[4])
            try:
                row["NSA (selection)"] = (time_ms(op, *nsa_args, sync=th.sync),
                                          time_ms(th.fwd_bwd(op, 3), *nsa_args, t_do, sync=th.sync))
            except Exception as e:
                row["NSA (selection)"] = failure(e)
        yield (f"| HSA {Z}x{L}, HQ {HQ}, H {H}, D {D}, K {K}, S {S} | "
                    + " | ".join(cell if isinstance(cell, str) else f"{fmt(cell[0])} / {fmt(cell[1])}"
                                 for cell in row.values())
                    + (" | " if parallel_nsa is not None else " | - | ")
                    + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + f" | {verdict(errs, tol)} |")


def gca_rows(repo, shapes, th: Torch, tol: float):
    """One table row per shape, yielded as soon as it is measured."""
    torch = th.torch
    mod = load_file(repo, "ltriton/gca.py", strip_asserts=False)
    for B, HQ, H, Lq, K, Lk, D in shapes:
        q, k, v, w, do = gca_inputs(jax.random.key(0), B, HQ, H, Lq, K, Lk, D, jnp.bfloat16)
        scale = 1 / math.sqrt(D)
        ours_f, ours_fb = fwd_and_grad_fns(lambda q, k, v, w: gca_attention(q, k, v, w, scale=scale, impl="pallas"))
        o, grads = ours_fb(q, k, v, w, do)
        t_args = [th.tensor(x) for x in (q, k, v)] + [th.tensor(w, torch.float32)]
        t_do = th.tensor(do)
        op = lambda q, k, v, w: mod.attention(q, k, v, w, scale, 0.0)
        fb = th.fwd_bwd(op, 4)
        ours = (time_ms(ours_f, q, k, v, w), time_ms(ours_fb, q, k, v, w, do))
        errs = {}
        try:
            theirs = [th.numpy(t) for t in fb(*t_args, t_do)]
            errs = {n: rel(t, x) for n, t, x in zip(("o", "dq", "dk", "dv", "dw"), theirs, (o, *grads))}
            orig = f"{fmt(time_ms(op, *t_args, sync=th.sync))} / {fmt(time_ms(fb, *t_args, t_do, sync=th.sync))}"
        except Exception as e:
            orig = failure(e)
        yield (f"| GCA B {B}, HQ {HQ}, H {H}, Lq {Lq}, K {K}, Lk {Lk}, D {D} | {fmt(ours[0])} / {fmt(ours[1])} | "
               f"{orig} | - | - | " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + f" | {verdict(errs, tol)} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original-repo", type=pathlib.Path, required=True,
                   help="local clone of RamstorageAI/long-context-modeling (HSA Triton op, vendored NSA)")
    p.add_argument("--drt-repo", type=pathlib.Path, default=None,
                   help="local clone of ant-research/long-context-modeling (GCA Triton op); no GCA rows without it")
    p.add_argument("--hsa-shapes", nargs="*", default=HSA_SHAPES, metavar="Z,L,HQ,H,D,K,S",
                   help=f"HSA shapes (default {' '.join(HSA_SHAPES)}); the original needs HQ/H >= 16")
    p.add_argument("--gca-shapes", nargs="*", default=GCA_SHAPES, metavar="B,HQ,H,Lq,K,Lk,D",
                   help=f"GCA shapes (default {' '.join(GCA_SHAPES)}); the original needs Lq, Lk >= 64")
    p.add_argument("--no-nsa", action="store_true", help="skip fla-org's NSA selection kernel")
    p.add_argument("--tol", type=float, default=2e-2, help="agreement bound on the relative errors (default 2e-2, bf16)")
    a = p.parse_args(argv)
    for flag, path in (("--original-repo", a.original_repo), ("--drt-repo", a.drt_repo)):
        if path is not None and not path.is_dir():
            fail(f"{flag} {path}: not a directory")
    hsa_shapes = shapes_arg(a.hsa_shapes, 7, "--hsa-shapes")
    gca_shapes = shapes_arg(a.gca_shapes, 7, "--gca-shapes")
    th = Torch()
    if jax.default_backend() != "gpu":
        fail(f"jax runs on {jax.default_backend()}, not on the GPU (install jax with CUDA, or unset JAX_PLATFORMS)")
    dev = th.torch.cuda.get_device_name()
    print(f"{dev}; jax {jax.__version__} (ours: Pallas), torch {th.torch.__version__}, "
          f"triton {importlib.import_module('triton').__version__}; bf16 inputs; ms fwd / fwd+bwd\n")
    print("| op, shape | ours | original | original -O | NSA (selection) | relative error vs ours | agree |")
    print("|---|---|---|---|---|---|---|")
    agree = True
    rows = hsa_rows(a.original_repo, hsa_shapes, th, not a.no_nsa, a.tol)
    if a.drt_repo is not None:
        rows = itertools.chain(rows, gca_rows(a.drt_repo, gca_shapes, th, a.tol))
    for r in rows:
        print(r, flush=True)
        agree &= r.endswith("| ok |")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
