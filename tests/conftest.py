"""Shared test helpers: golden fixtures of the original PyTorch code, and fp32 matmuls on CPU.

Where the golden fixtures are read from (the first that applies):

1. `$HSA_FIXTURES`, when set: the full set. A file a test asks for that is missing there FAILS the
   test (never skips), so a CI run that points at the fixtures cannot silently lose parity checks.
2. `../shared/fixtures` beside the repository, when that folder exists (the README's default): the
   full set, under the same fail-when-missing rule.
3. `tests/golden/`, the subset bundled with the repository (see tests/golden/README.md), so a fresh
   clone checks parity too. `fixture_names` lists only the files that are there, so parametrised
   tests are generated for the bundled cases alone; a test that asks `fixture_path` by name for a
   file outside the subset is skipped, with a reason naming the file and how to get the full set.
"""

import os
import pathlib

import jax
import numpy as np
import pytest

# Parity tests compare against fp32 PyTorch outputs; TF32/bf16 passes would give ~1e-3 errors.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
BUNDLED_FIXTURES = REPO / "tests" / "golden"


def fixtures_root() -> tuple[pathlib.Path, str]:
    """(root folder, where it came from): 'HSA_FIXTURES', '../shared/fixtures' or 'bundled'."""
    env = os.environ.get("HSA_FIXTURES")
    if env:
        return pathlib.Path(env), "HSA_FIXTURES"
    if SHARED_FIXTURES.is_dir():
        return SHARED_FIXTURES, "../shared/fixtures"
    return BUNDLED_FIXTURES, "bundled"


def fixture_path(family: str, name: str) -> pathlib.Path:
    """Path of a golden fixture `<root>/<family>/<name>` (root: see the module docstring). Fails (never
    skips) when the full set ($HSA_FIXTURES or ../shared/fixtures) lacks the file; skips, naming the
    file, when only the bundled subset is available and it is not part of it."""
    root, source = fixtures_root()
    path = root / family / name
    if path.exists():
        return path
    if source == "bundled":
        pytest.skip(f"{family}/{name} is not in the bundled subset {BUNDLED_FIXTURES}; "
                    f"set HSA_FIXTURES to the full fixture set (or place it at {SHARED_FIXTURES})")
    where = f"HSA_FIXTURES={root}" if source == "HSA_FIXTURES" else f"{root} (the default fixture folder)"
    pytest.fail(f"{where} is in use but {path} does not exist")


def fixture_names(family: str, pattern: str) -> list[str]:
    """Fixture file names matching `pattern` in the chosen root, for parametrisation: only what that
    root holds, so with the bundled subset only the bundled cases are generated. No match at all gives
    one sentinel name, which fails in fixture_path (full set) or skips naming the pattern (bundled
    subset; every pattern the tests use has at least one bundled file)."""
    root, _ = fixtures_root()
    names = sorted(p.name for p in (root / family).glob(pattern))
    return names or [f"<no {pattern} in {root / family}>"]


def load_npz(family: str, name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_path(family, name)) as data:
        return {k: data[k] for k in data.files}


def rel_err(actual, expected) -> float:
    """max |a - e| / max |e| (0 when both are 0)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    err = np.max(np.abs(actual - expected))
    return float(err / scale) if scale > 0 else float(err)


def pytest_report_header(config):
    root, source = fixtures_root()
    return f"golden fixtures: {root} ({source})"


_CURRENT_RNG: list[np.random.Generator] = []


@pytest.fixture(autouse=True)
def seed(request):
    """Every test gets a fresh random seed, printed with its id (shown when it fails); $KERNEL_TEST_SEED
    reproduces a run (pallas_kernels/testing.py). Tests draw from `rng` or, in helpers, current_rng()."""
    from pallas_kernels.testing import announce_seed

    s = announce_seed(request)
    _CURRENT_RNG[:] = [np.random.default_rng([s, 1])]  # a stream of its own, not the `rng` fixture's
    return s


def current_rng() -> np.random.Generator:
    """The running test's seeded generator, for module-level helpers (random_ids, ...)."""
    return _CURRENT_RNG[0]


@pytest.fixture
def rng(seed):
    """numpy Generator from `seed` (the kernel tests' inputs)."""
    return np.random.default_rng(seed)
