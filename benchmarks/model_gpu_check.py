"""GPU check of the SWA+HSA model on the Pallas HSA kernel: hsa-compare parity (fp32) on golden
fixtures with impl=pallas vs impl=xla, and jax.grad through the whole model with the Pallas kernel
against the XLA-reference model. Prints a table.

    PYTHONPATH=. python3 benchmarks/model_gpu_check.py --fixtures ../shared/fixtures/swa_hsa
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.models.swa_hsa.parity import compare_reference
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM


def grad_check(dtype: str, seed: int) -> tuple[float, float]:
    """max relative gradient difference (over parameters) and loss difference, Pallas vs XLA."""
    cfg = SWAHSAConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=16,
                       num_key_value_heads=4, num_kv_heads=1, num_lower_layers=1, num_upper_layers=1,
                       chunk_size=64, chunk_topk=4, sliding_window=128, initializer_range=0.05, dtype=dtype)
    ids = jax.random.randint(jax.random.key(seed), (2, 1025), 0, cfg.vocab_size)  # inputs + shifted labels

    def loss_and_grads(impl):
        model = SWAHSAForCausalLM(cfg.replace(hsa_impl=impl), rngs=nnx.Rngs(seed))

        def loss(m):
            logp = jax.nn.log_softmax(m(ids[:, :-1]))
            return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

        return nnx.jit(nnx.value_and_grad(loss))(model)

    (l_p, g_p), (l_x, g_x) = loss_and_grads("pallas"), loss_and_grads("xla")
    rel = max(float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))
              for a, b in zip(jax.tree.leaves(nnx.state(g_p, nnx.Param)), jax.tree.leaves(nnx.state(g_x, nnx.Param))))
    return rel, abs(float(l_p) - float(l_x))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", type=pathlib.Path, required=True, help="folder with model_*.npz and *.config.json")
    a = p.parse_args()
    print(f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}")
    print("| fixture | impl | logits max_abs | worst rel (all outputs) | pass (atol 1e-4) |\n|---|---|---|---|---|")
    for ref_path in sorted(a.fixtures.glob("model_*.npz")):
        with np.load(ref_path) as data:
            ref = {k: data[k] for k in data.files}
        for impl in ("pallas", "xla"):
            cfg = SWAHSAConfig.from_json(ref_path.with_name(ref_path.stem + ".config.json"), hsa_impl=impl)
            r = compare_reference(cfg, ref, atol=1e-4)
            print(f"| {ref_path.stem} | {impl} | {r.logits.max_abs:.2e} | {max(x.rel for x in r.rows):.2e} | {r.ok} |", flush=True)
    print("\n| grad check | dtype | max rel grad diff | loss diff |\n|---|---|---|---|")
    with jax.default_matmul_precision("highest"):
        rel, dl = grad_check("float32", 0)
    print(f"| model, Pallas vs XLA | float32 | {rel:.2e} | {dl:.2e} |")
    rel, dl = grad_check("bfloat16", 1)
    print(f"| model, Pallas vs XLA | bfloat16 | {rel:.2e} | {dl:.2e} |")


if __name__ == "__main__":
    main()
