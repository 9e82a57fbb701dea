"""Shared test helpers: golden fixtures of the original PyTorch code, and fp32 matmuls on CPU."""

import os
import pathlib

import jax
import numpy as np
import pytest

# Parity tests compare against fp32 PyTorch outputs; TF32/bf16 passes would give ~1e-3 errors.
jax.config.update("jax_default_matmul_precision", "highest")


def fixture_path(family: str, name: str) -> pathlib.Path:
    """Path of a golden fixture under $HSA_FIXTURES/<family>/. Skips when HSA_FIXTURES is unset; fails
    (never skips) when it is set and the file is missing, so CI cannot silently lose parity checks."""
    root = os.environ.get("HSA_FIXTURES")
    if not root:
        pytest.skip("HSA_FIXTURES is not set")
    path = pathlib.Path(root) / family / name
    if not path.exists():
        pytest.fail(f"HSA_FIXTURES={root} is set but {path} does not exist")
    return path


def fixture_names(family: str, pattern: str) -> list[str]:
    """Fixture file names matching `pattern`, for parametrisation. Returns a sentinel that fails in
    fixture_path when HSA_FIXTURES is set but holds no match."""
    root = os.environ.get("HSA_FIXTURES")
    if not root:
        return ["<HSA_FIXTURES unset>"]
    names = sorted(p.name for p in (pathlib.Path(root) / family).glob(pattern))
    return names or [f"<no {pattern} in {root}/{family}>"]


def load_npz(family: str, name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_path(family, name)) as data:
        return {k: data[k] for k in data.files}


def rel_err(actual, expected) -> float:
    """max |a - e| / max |e| (0 when both are 0)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    err = np.max(np.abs(actual - expected))
    return float(err / scale) if scale > 0 else float(err)
