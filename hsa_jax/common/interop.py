"""PyTorch interop: original state_dicts in, original state_dicts out.

The NNX attribute paths mirror the original module names, so a parameter's original key is its path
joined by dots, with two renames: a Dense `kernel` is torch's Linear `weight` transposed, and an Embed
`embedding` is torch's Embedding `weight`. Readers: `.safetensors`, `.npz` (keys `param/<key>` or bare
keys) and `.bin`/`.pt` (torch.save's zip format, read without torch by `torch_format`, which like
`torch.load(weights_only=True)` never runs code from the file; the legacy pre-1.6 format needs torch).
The writer produces `.safetensors`.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.common.torch_format import read_torch_file

TIED_HEAD_KEY = "lm_head.weight"  # the LM head of both originals; with tied embeddings it is the embedding


def _tied_keys(module: nnx.Module) -> tuple[bool, str | None]:
    """(does the module tie an LM head to its embedding, the embedding's original key): a model class
    names its embedding key as EMBED_KEY; any other module (a single layer) has no head."""
    key = getattr(module, "EMBED_KEY", None)
    return key is not None and bool(getattr(module.cfg, "tie_word_embeddings", False)), key


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model; the message lists every problem."""


def param_paths(model: nnx.Module) -> dict[str, tuple[tuple, bool]]:
    """{original key: (NNX state path, transpose?)} for every parameter of the model."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *head, leaf = (str(p) for p in path)
        transpose = leaf == "kernel"
        name = "weight" if leaf in ("kernel", "embedding") else leaf
        out[".".join([*head, name])] = (path, transpose)
    return out


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads an original checkpoint file into {key: float/int numpy array}."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.flax import load_file  # handles bf16, which numpy cannot hold natively
        return {k: np.asarray(v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v)
                for k, v in load_file(str(path)).items()}
    if suffix == ".npz":
        with np.load(path) as data:
            keys = data.files
            if any(k.startswith("param/") for k in keys):
                return {k[len("param/"):]: data[k] for k in keys if k.startswith("param/")}
            return {k: data[k] for k in keys}
    if suffix in (".bin", ".pt", ".pth"):
        try:  # torch.save's zip format (torch >= 1.6): read without torch, weights only
            sd = read_torch_file(path)
        except NotImplementedError as legacy:
            try:
                import torch
            except ImportError:
                raise ValueError(f"{legacy}; reading it needs torch: pip install 'hsa-jax[torch]'") from None
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict):
                sd = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() if hasattr(v, "numpy") else v
                      for k, v in sd.items()}
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds a {type(sd).__name__}, not a state_dict")
        return {k: v.astype(np.float32) if v.dtype == jnp.bfloat16 else v for k, v in sd.items()
                if isinstance(v, np.ndarray)}
    raise ValueError(f"unknown checkpoint format {path.suffix!r} for {path}: use .safetensors, .npz, .bin or .pt")


def load_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Copies an original state_dict into the model in place. Every parameter must be present with
    its original shape; unknown keys are an error. All problems are reported together."""
    sd = dict(state_dict)
    # The original's load hook renames a legacy `embedding.` key.
    for k in list(sd):
        if "embedding." in k and k.replace("embedding.", "embeddings.") not in sd:
            sd[k.replace("embedding.", "embeddings.")] = sd.pop(k)
            break
    targets = param_paths(model)
    tied, embed_key = _tied_keys(model)
    if tied and TIED_HEAD_KEY in sd:
        # The tied head is the embedding itself; its own copy in the state_dict must agree.
        head = sd.pop(TIED_HEAD_KEY)
        if embed_key in sd and not np.array_equal(head, sd[embed_key]):
            raise CheckpointMismatchError(
                f"tie_word_embeddings is true but {TIED_HEAD_KEY} differs from {embed_key}; "
                "load it with tie_word_embeddings=false")
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    missing = sorted(set(targets) - set(sd))
    unexpected = sorted(set(sd) - set(targets))
    wrong = []
    for key in sorted(set(targets) & set(sd)):
        path, transpose = targets[key]
        want = flat[path].shape
        got = tuple(np.shape(sd[key]))
        if (got[::-1] if transpose else got) != tuple(want):
            wrong.append(f"{key}: checkpoint {got}, model expects {want[::-1] if transpose else want}")
    if missing or unexpected or wrong:
        lines = ["checkpoint does not match the model:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  wrong shape: {w}" for w in wrong]
        raise CheckpointMismatchError("\n".join(lines))
    for key, (path, transpose) in targets.items():
        value = np.asarray(sd[key])
        var = flat[path]
        var.set_value(jnp.asarray(value.T if transpose else value, dtype=var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters under their original keys, torch layouts, float32."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for key, (path, transpose) in param_paths(model).items():
        value = np.asarray(flat[path][...], np.float32)
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    tied, embed_key = _tied_keys(model)
    if tied:
        out[TIED_HEAD_KEY] = out[embed_key]  # the original state_dict lists the tied head too
    return out


def save_safetensors(model: nnx.Module, path: str | pathlib.Path) -> None:
    from safetensors.numpy import save_file
    sd = export_state_dict(model)
    # safetensors refuses shared buffers: give the tied head its own copy.
    save_file({k: np.array(v, copy=True) for k, v in sd.items()}, str(path))
