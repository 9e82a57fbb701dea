"""Helpers of the kernel tests (tests/test_hsa_kernel.py, tests/test_gca_kernel.py); the ops never
import this module.

Seeds: every random input of those tests comes from their `rng` fixture, seeded by `seed`
(announce_seed): a fresh seed per test and run, printed (pytest shows it under 'Captured stdout
setup' of a failing test, and it is in the assertion messages), or the value of $KERNEL_TEST_SEED to
reproduce a failure:
    KERNEL_TEST_SEED=1234 pytest tests/test_hsa_kernel.py -k G4_batch2

Backends: KERNEL_IMPLS is the kernel backends the tests run, "interpret" everywhere and also
"pallas" (the compiled Triton kernels) when JAX's default backend is a GPU, as JAX's own Pallas
tests pair interpret-mode and hardware runs. On CPU the GPU variants are not collected.
"""

from __future__ import annotations

import os

import jax
import numpy as np

SEED_ENV = "KERNEL_TEST_SEED"
KERNEL_IMPLS = ("interpret",) + (("pallas",) if jax.default_backend() == "gpu" else ())


def draw_seed() -> int:
    """$KERNEL_TEST_SEED if set, else a fresh 32-bit seed from the OS's entropy."""
    env = os.environ.get(SEED_ENV)
    return int(env) if env else int(np.random.SeedSequence().generate_state(1)[0])


def announce_seed(request) -> int:
    """draw_seed(), printed with the test's id: the body of the test modules' `seed` fixture."""
    s = draw_seed()
    print(f"{SEED_ENV}={s}  # {request.node.nodeid}")
    return s
