"""GPU decode benchmark of the cached SWA+HSA decoder (hsa_jax/models/swa_hsa/decode.py): prefill time, decode
tokens/s per sequence and memory, for context lengths x batch sizes, with the ~125M config
(configs/swa_hsa_125m.yaml: D 768, 12 heads, 6+6 layers, S 64, K 8, W 512, vocab 50280) and random
weights (speed does not depend on the values).

    PYTHONPATH=. python3 benchmarks/decode.py                                   # 32K,128K,1M x batch 1,8
    PYTHONPATH=. python3 benchmarks/decode.py --contexts 32K --batches 1 --steps 32   # quick

Needs jax, flax (no grain, no orbax). Per row: the prefill of `context` random tokens in segments of
--segment (compilation excluded: each shape is compiled on a warm-up first), then --steps one-token
decode steps from Python (timed after one warm-up step; "step ms"), then --steps greedy tokens as one
device program (`dec.greedy`, what generate() runs; "greedy ms" per token, the better of two blocks
after a compiling one). Memory: the cache's bytes and the device's peak bytes in
use. Rows that run out of memory are reported as OOM and the sweep goes on.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.swa_hsa.decode import SWAHSADecoder
from hsa_jax.eval.longctx import parse_length
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM

CONFIG_125M = dict(vocab_size=50280, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                   num_key_value_heads=4, num_kv_heads=1, num_lower_layers=6, num_upper_layers=6, num_upper_groups=1,
                   chunk_size=64, chunk_topk=8, retrieval_dim=768, encoder_layers=1, sliding_window=512,
                   initializer_range=0.02, tie_word_embeddings=True, dtype="bfloat16", param_dtype="float32")


def peak_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", 0))


def bench(dec: SWAHSADecoder, context: int, batch: int, steps: int, seed: int = 0, trace: pathlib.Path | None = None) -> dict:
    rng = np.random.default_rng(seed)
    V = dec.cfg.vocab_size
    capacity = context + 6 * steps + 2  # warm-up, timed and traced steps, and four greedy blocks
    seg = dec.segment_len
    # warm-up: compile every program the timed prefill runs (first segment, empty SWA ring; full middle
    # segments; the last, bucketed segment with logits) and the step
    rem = context % seg
    warm = np.asarray(rng.integers(0, V, (batch, 2 * seg + (rem or seg))), np.int32)
    _, c = dec.prefill(warm, logits="last", capacity=capacity)
    logits, c = dec.step(np.zeros(batch, np.int32), c)
    jax.block_until_ready(logits)
    del c, logits

    ids = np.asarray(rng.integers(0, V, (batch, context)), np.int32)
    t0 = time.perf_counter()
    logits, cache = dec.prefill(ids, logits="last", capacity=capacity)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - t0
    tok = jnp.argmax(logits, -1)
    logits, cache = dec.step(tok, cache)  # warm
    jax.block_until_ready(logits)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = jnp.argmax(logits, -1)
        logits, cache = dec.step(tok, cache)
    jax.block_until_ready(logits)
    decode_s = time.perf_counter() - t0
    # the same number of tokens as greedy blocks (dec.greedy: `steps` steps in one device program)
    tok = jnp.argmax(logits, -1)
    toks, cache = dec.greedy(tok, cache, steps)  # compiles
    jax.block_until_ready(toks)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        toks, cache = dec.greedy(toks[:, -1], cache, steps)
        jax.block_until_ready(toks)
        times.append(time.perf_counter() - t0)
    greedy_s = min(times)
    if trace is not None:  # after the timed work: a traced prefill and `steps` traced steps
        with jax.profiler.trace(str(trace / f"prefill_{context}x{batch}"), create_perfetto_trace=True):
            jax.block_until_ready(dec.prefill(ids, logits="last", capacity=capacity)[0])
        with jax.profiler.trace(str(trace / f"step_{context}x{batch}"), create_perfetto_trace=True):
            for _ in range(steps):
                logits, cache = dec.step(jnp.argmax(logits, -1), cache)
            jax.block_until_ready(logits)
        with jax.profiler.trace(str(trace / f"greedy_{context}x{batch}"), create_perfetto_trace=True):
            jax.block_until_ready(dec.greedy(toks[:, -1], cache, steps)[0])
    return {"context": context, "batch": batch, "prefill_s": prefill_s,
            "prefill_tok_s": batch * context / prefill_s, "step_ms": 1e3 * decode_s / steps,
            "tok_s_per_seq": steps / decode_s, "tok_s_total": batch * steps / decode_s,
            "greedy_ms": 1e3 * greedy_s / steps, "greedy_tok_s_total": batch * steps / greedy_s,
            "cache_gib": cache.nbytes() / 2 ** 30, "peak_gib": peak_bytes() / 2 ** 30}


def check(model, dec: SWAHSADecoder, T: int, steps: int = 8) -> None:
    """The decoder against the batch forward (cuDNN SWA over the whole sequence): prefill of T - steps
    tokens in segments, then `steps` greedy tokens, on one random sequence."""
    ids = np.random.default_rng(1).integers(0, dec.cfg.vocab_size, (1, T)).astype(np.int32)
    logits, cache = dec.prefill(ids[:, :T - steps], capacity=T)
    toks, _ = dec.greedy(ids[:, T - steps], cache, steps)
    fed = ids.copy()
    fed[:, T - steps + 1:] = np.asarray(toks)[:, :-1]
    ref = np.asarray(model(jnp.asarray(fed)), np.float32)
    err = float(np.abs(np.asarray(logits) - ref[:, T - steps - 1]).max())
    agree = float((np.asarray(toks) == ref[:, T - steps:].argmax(-1)).mean())
    print(f"check ({T} tokens): prefill last-logit max abs error {err:.3g} (logit range "
          f"{float(ref[:, T - steps - 1].min()):.2f}..{float(ref[:, T - steps - 1].max()):.2f}); greedy tokens "
          f"equal to the forward's argmax: {100 * agree:.0f}%", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="32K,128K,1M")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=128, help="timed decode steps per row")
    p.add_argument("--segment", type=int, default=8192, help="prefill segment length")
    p.add_argument("--swa-block", type=int, default=512, help="SWA query block inside a prefill segment")
    p.add_argument("--hsa-impl", default="auto", choices=("auto", "xla", "pallas"), help="HSA backend of the prefill")
    p.add_argument("--step-hsa-impl", default="auto", choices=("auto", "xla", "pallas"),
                   help="HSA backend of the decode step (auto: Pallas on GPU)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights as stored for inference (default bf16: half the bytes read per token)")
    p.add_argument("--trace", type=pathlib.Path, default=None, help="also trace one prefill and --steps decode "
                   "steps per row into TRACE/prefill_CONTEXTxBATCH and TRACE/step_CONTEXTxBATCH "
                   "(summarise with benchmarks/trace_summary.py --steps N)")
    p.add_argument("--check-len", type=int, default=16384, help="first compare the decoder (prefill, then "
                   "greedy steps) with the model's batch forward on this many random tokens: max logit error, "
                   "argmax agreement (0: skip)")
    a = p.parse_args(argv)
    cfg = SWAHSAConfig.from_dict({**CONFIG_125M, "dtype": a.dtype, "param_dtype": a.param_dtype,
                                  "hsa_impl": a.hsa_impl})
    model = SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    dec = SWAHSADecoder(model, segment_len=a.segment, swa_block=a.swa_block, step_hsa_impl=a.step_hsa_impl)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"~125M SWA+HSA ({n_params / 1e6:.1f}M params, {a.param_dtype} weights, {a.dtype} compute), segment "
          f"{a.segment}, prefill HSA {a.hsa_impl}, step HSA {a.step_hsa_impl}")
    head = f"{'context':>8} {'batch':>5} {'prefill s':>10} {'prefill tok/s':>14} {'step ms':>8} " \
           f"{'tok/s/seq':>10} {'tok/s total':>12} {'greedy ms':>10} {'greedy tok/s':>13} {'cache GiB':>10} " \
           f"{'peak GiB':>9}"
    if a.check_len:
        check(model, dec, a.check_len)
    print(head)
    print("-" * len(head))
    for ctx in [parse_length(x) for x in a.contexts.split(",")]:
        for batch in [int(x) for x in a.batches.split(",")]:
            try:
                r = bench(dec, ctx, batch, a.steps, trace=a.trace)
            except Exception as e:  # OOM and the like: report and go on
                msg = str(e).splitlines()[0][:80]
                print(f"{ctx:>8} {batch:>5}  FAILED: {type(e).__name__}: {msg}", flush=True)
                continue
            print(f"{ctx:>8} {batch:>5} {r['prefill_s']:>10.2f} {r['prefill_tok_s']:>14.0f} {r['step_ms']:>8.2f} "
                  f"{r['tok_s_per_seq']:>10.1f} {r['tok_s_total']:>12.1f} {r['greedy_ms']:>10.3f} "
                  f"{r['greedy_tok_s_total']:>13.1f} {r['cache_gib']:>10.2f} "
                  f"{r['peak_gib']:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
