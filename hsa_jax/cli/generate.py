"""`hsa-generate`: text continuation of a prompt by a trained model of any family.

    hsa-generate --checkpoint runs/extrapolation_tiny --tokenizer bytes --prompt "Hello" --max-new-tokens 64
    hsa-generate --weights model.safetensors --config config.json --tokenizer tokenizer.json --prompt "..." \
        --temperature 0.8 --top-k 40 --stop 0 chunk_topk=16 dtype=bfloat16
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from hsa_jax.cli.common import add_model_source, comma_ints, load_model_from_args, run_cli
from hsa_jax.common.config import ConfigError
from hsa_jax.generate import generate
from hsa_jax.registry import make_decoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hsa-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(p)
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizer.json path (default bytes)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--prompt-ids", default=None, help="comma-separated prompt token ids (instead of --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--stop", default=None, help="comma-separated stop token ids (default: the tokenizer's EOS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment", type=int, default=4096, help="prefill segment length")
    return p.parse_args(argv)


def _main(args) -> int:
    from data_pipeline import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    if args.prompt_ids is not None:
        ids = comma_ints("--prompt-ids", args.prompt_ids)
    elif args.prompt is not None:
        ids = tok.encode(args.prompt)
    else:
        raise ConfigError("give --prompt or --prompt-ids")
    if not ids:
        raise ConfigError("--prompt: the prompt is empty")
    stop = [tok.eos_id] if args.stop is None else comma_ints("--stop", args.stop)
    model = load_model_from_args(args)
    dec = make_decoder(model, segment_len=args.segment)
    g = generate(dec, np.asarray([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 stop_tokens=stop, seed=args.seed)
    n = int(g.lengths[0])
    print(tok.decode([int(i) for i in g.tokens[0, :n] if i < tok.vocab_size]))  # ids past the tokenizer: dropped
    print(f"hsa-generate: {len(ids)} prompt tokens, {n} generated; prefill {g.prefill_s:.2f} s, decode "
          f"{g.decode_s:.2f} s ({max(n - 1, 0) / max(g.decode_s, 1e-9):.1f} tokens/s incl. compilation)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_cli("hsa-generate", lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
