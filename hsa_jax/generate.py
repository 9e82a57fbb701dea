"""Text generation over a cached decoder, and the `hsa-generate` CLI.

The decoder interface (hsa_jax/decode.py; any model family can provide one):
    prefill(ids (N, T), cache=None, *, logits="last", capacity=None) -> (logits (N, V), cache)
    step(tokens (N,), cache) -> (logits (N, V), cache)

    hsa-generate --checkpoint runs/extrapolation_tiny --tokenizer bytes --prompt "Hello" --max-new-tokens 64
    hsa-generate --weights model.safetensors --config config.json --tokenizer tokenizer.json --prompt "..." \
        --temperature 0.8 --top-k 40 --stop 0
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsa_jax.registry import FAMILIES, family


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # (N, n) generated ids; rows that stopped early are padded with `pad_id` after the stop token
    lengths: np.ndarray  # (N,) generated tokens per row, the stop token included
    prefill_s: float
    decode_s: float


@jax.jit
def _sample(logits_NxV, key, temperature, top_k):
    """Temperature / top-k sampling (top_k <= 0: whole vocabulary)."""
    V = logits_NxV.shape[-1]
    scaled = logits_NxV / jnp.maximum(temperature, 1e-6)
    kth = jnp.sort(scaled, axis=-1)[:, V - jnp.clip(top_k, 1, V)][:, None]
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1)


def generate(decoder, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             stop_tokens=(), seed: int = 0, pad_id: int = 0, cache=None) -> Generation:
    """Greedy (temperature 0) or sampled continuation of prompt_ids (N, T) (equal-length rows).

    A row stops after emitting any of `stop_tokens`; generation ends when every row has stopped or after
    max_new_tokens. The cache is sized for T + max_new_tokens unless one is given."""
    prompt = np.asarray(prompt_ids)
    if prompt.ndim == 1:
        prompt = prompt[None]
    N, T = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    key = jax.random.key(seed)
    stop = np.asarray(sorted(set(int(t) for t in stop_tokens)), np.int64)
    t0 = time.perf_counter()
    logits, cache = decoder.prefill(prompt, cache, logits="last",
                                    capacity=None if cache is not None else T + max_new_tokens)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out = np.full((N, max_new_tokens), pad_id, np.int64)
    done = np.zeros(N, bool)
    lengths = np.zeros(N, np.int64)
    for i in range(max_new_tokens):
        if temperature > 0:
            key, sub = jax.random.split(key)
            tok = np.asarray(_sample(logits, sub, jnp.float32(temperature), jnp.int32(top_k)))
        else:
            tok = np.asarray(jnp.argmax(logits, axis=-1))
        tok = np.where(done, pad_id, tok)
        out[:, i] = tok
        lengths += ~done
        done |= np.isin(tok, stop)
        if done.all() or i == max_new_tokens - 1:
            break
        logits, cache = decoder.step(tok, cache)
    t2 = time.perf_counter()
    n = int(lengths.max())
    return Generation(out[:, :n], lengths, t1 - t0, t2 - t1)


# ----- loading models -----

def restore_checkpoint(path: str | pathlib.Path, step: int | None = None):
    """The model of an hsa-train Orbax checkpoint: `path` is the run workdir, its checkpoints/ dir or
    one step dir. Parameters only, restored onto the default device whatever mesh saved them.
    -> (model, run config dict)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "state").is_dir() and path.name.isdigit():
        path, step = path.parent, int(path.name)
    mgr = ocp.CheckpointManager(path, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                      "data": ocp.JsonCheckpointHandler(),
                                                      "config": ocp.JsonCheckpointHandler()})
    steps = sorted(mgr.all_steps())
    if not steps:
        raise FileNotFoundError(f"{path}: no checkpoints (expected an hsa-train workdir or its checkpoints/ dir)")
    step = steps[-1] if step is None else step
    run_cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    meta = mgr.item_metadata(step).state
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    raw = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state["params"]
    mgr.close()
    fam = family(run_cfg.get("model_type", "swa_hsa"))
    cfg = fam.config_cls.from_dict(run_cfg["model"])
    model = nnx.eval_shape(lambda: fam.model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = []
    for keys, var in nnx.to_flat_state(state):
        node = raw
        for k in keys:
            node = node[str(k)] if str(k) in node else node[k]
        value = node["value"] if isinstance(node, dict) else node
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"checkpoint {path}/{step}: {'.'.join(map(str, keys))} has shape {value.shape}, "
                             f"the model wants {var.shape}")
        flat.append((keys, var.replace(jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), run_cfg


MODEL_TYPES = sorted(FAMILIES)
SET_HELP = ("change an inference-time model setting, repeatable: dtype=bfloat16, chunk_topk=32 (chunks each "
            "token retrieves), hsa_impl=auto|xla|pallas (SWA+HSA) or gca_impl=... (DRT)")


def load_model(*, checkpoint=None, weights=None, config=None, model_type: str = "swa_hsa", step=None,
               settings=()):
    """From an Orbax checkpoint (its model type is recorded), or from converted original weights + an
    HF-style config.json of `model_type`; `settings` ("key=value" strings) change the config's
    inference-time fields (dtype, backend, top-k)."""
    if checkpoint is not None:
        model, _ = restore_checkpoint(checkpoint, step)
    else:
        if weights is None or config is None:
            raise ValueError("give --checkpoint, or both --weights and --config")
        from hsa_jax.compare import build_model
        from hsa_jax.interop import read_state_dict
        fam = family(model_type)
        cfg = fam.config_cls.from_json(config)
        model = build_model(cfg, fam.from_original(cfg, read_state_dict(weights)), fam.model_cls)
    cfg = model.cfg.with_inference_settings(list(settings))
    if cfg != model.cfg:
        _set_cfg(model, cfg)
    return model


def _set_cfg(module, cfg):
    """Propagates a replaced config to every submodule holding one (they share the same object)."""
    for _, m in nnx.iter_graph(module):
        if isinstance(m, nnx.Module) and hasattr(m, "cfg"):
            m.cfg = cfg


# ----- tokenizers -----

def load_text_tokenizer(spec: str):
    """-> (encode(str) -> list[int], decode(list[int]) -> str, eos id)."""
    if spec == "bytes":
        return (lambda t: list(t.encode("utf-8")),
                lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace"), 256)
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(spec)
    eos = tok.token_to_id("<|endoftext|>")
    return (lambda t: tok.encode(t, add_special_tokens=False).ids,
            lambda ids: tok.decode(list(map(int, ids)), skip_special_tokens=False), eos)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hsa-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", type=pathlib.Path, help="hsa-train workdir (or checkpoints/ or a step dir)")
    src.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    src.add_argument("--weights", type=pathlib.Path, help="converted original weights (.safetensors/.npz/.bin)")
    src.add_argument("--config", type=pathlib.Path, help="original HF-style config.json (with --weights)")
    src.add_argument("--model-type", choices=MODEL_TYPES, default="swa_hsa",
                     help="model family of --weights/--config (default swa_hsa; checkpoints record theirs)")
    src.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                     help=SET_HELP)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from hsa_jax.decode import make_decoder

        encode, decode, eos = load_text_tokenizer(args.tokenizer)
        if args.prompt_ids is not None:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        elif args.prompt is not None:
            ids = encode(args.prompt)
        else:
            raise ValueError("give --prompt or --prompt-ids")
        if not ids:
            raise ValueError("the prompt is empty")
        stop = [eos] if args.stop is None else [int(x) for x in args.stop.split(",") if x.strip()]
        model = load_model(checkpoint=args.checkpoint, weights=args.weights, config=args.config,
                           model_type=args.model_type, step=args.step, settings=args.settings)
        dec = make_decoder(model, segment_len=args.segment)
        g = generate(dec, np.asarray([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     stop_tokens=stop, seed=args.seed)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"hsa-generate: error: {e}", file=sys.stderr)
        return 2
    n = int(g.lengths[0])
    print(decode(list(g.tokens[0, :n])))
    print(f"hsa-generate: {len(ids)} prompt tokens, {n} generated; prefill {g.prefill_s:.2f} s, decode "
          f"{g.decode_s:.2f} s ({max(n - 1, 0) / max(g.decode_s, 1e-9):.1f} tokens/s incl. compilation)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
