"""The main job until training lands: a forward pass of a tiny SWA+HSA model, a PyTorch-format
round trip of its weights, and a parity report against the original model's golden outputs
(when $HSA_FIXTURES, default ../shared/fixtures, holds them)."""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from hsa_jax.compare import compare_reference
from hsa_jax.config import SWAHSAConfig
from hsa_jax.interop import load_state_dict, read_state_dict, save_safetensors
from hsa_jax.model import SWAHSAForCausalLM

TINY = SWAHSAConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                    num_key_value_heads=2, num_kv_heads=1, num_lower_layers=2, num_upper_layers=2,
                    chunk_size=64, chunk_topk=4, sliding_window=64, encoder_layers=1)


def main():
    print(f"jax {jax.__version__} on {jax.default_backend()}; tiny SWA+HSA: {TINY.layer_kinds()}")
    model = SWAHSAForCausalLM(TINY, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 1024), 0, TINY.vocab_size)
    forward = nnx.jit(lambda m, x: m(x))
    logits = forward(model, ids).block_until_ready()
    t0 = time.perf_counter()
    forward(model, ids).block_until_ready()
    print(f"forward (2, 1024) -> {logits.shape} in {1e3 * (time.perf_counter() - t0):.1f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.safetensors"
        save_safetensors(model, path)
        other = SWAHSAForCausalLM(TINY, rngs=nnx.Rngs(1))
        load_state_dict(other, read_state_dict(path))
        same = np.array_equal(np.asarray(forward(other, ids)), np.asarray(logits))
        print(f"original-key safetensors round trip ({path.stat().st_size / 1e6:.1f} MB): "
              f"{'identical logits' if same else 'MISMATCH'}")

    root = pathlib.Path(os.environ.get("HSA_FIXTURES", "../shared/fixtures")) / "swa_hsa"
    refs = sorted(root.glob("model_*.npz"))
    if not refs:
        print(f"no golden fixtures under {root}: parity report skipped")
    ok = same
    for ref_path in refs:
        cfg = SWAHSAConfig.from_json(ref_path.with_name(ref_path.stem + ".config.json"))
        with np.load(ref_path) as data:
            report = compare_reference(cfg, {k: data[k] for k in data.files})
        print(f"\nparity vs original PyTorch: {ref_path.name}\n{report.format()}")
        ok &= report.ok
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
