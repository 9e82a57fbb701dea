"""Cached decoding (hsa_jax/decode.py): prefill + step logits equal the training forward's, on random
models across config switches, prompt lengths (incl. non-multiples of chunk_size) and segmentations;
the original's decode fixtures through `hsa-compare --decode`; cache capacity errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsa_jax.cli import compare
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.common.decoding import CacheCapacityError
from hsa_jax.common.layers import sliding_window_attention
from hsa_jax.models.swa_hsa.decode import SWAHSADecoder, swa_over_ring
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM
from conftest import current_rng, fixture_names, fixture_path

ATOL = 1e-4
STEPS = 40

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            num_kv_heads=1, num_lower_layers=1, num_upper_layers=1, chunk_size=16, chunk_topk=3,
            retrieval_dim=64, encoder_layers=1, sliding_window=24, initializer_range=0.1, hsa_impl="xla")

# name -> (config switches, prompt length, prefill segment length[, SWA query block])
CASES = {
    "base_len77_seg32_block8": ({}, 77, 32, 8),
    "hsa_swa_softmax1_len50_seg16_block4": (dict(hsa_only=False, enable_softmax1=True, hsa_sliding_window=20), 50, 16, 4),
    "mask_slide_window_len64_seg4096_block16": (dict(mask_slide_window=True), 64, 4096, 16),
    "two_groups_len33_seg7": (dict(num_upper_layers=2, num_upper_groups=2), 33, 7),
    "softmax_posdecay_qknorm_len17": (dict(enable_softmax=True, enable_pos_decay=True, enable_qk_norm=True,
                                           enable_lmk_norm=True, reset_hsa_residual=True), 17, 4096),
    "no_encoder_singlehead_len15": (dict(encoder_layers=0, num_kv_heads=2, singlehead_retrieval=True,
                                         enc_prenorm=True), 15, 4096),
}


def make_model(seed=0, **switches):
    cfg = SWAHSAConfig.from_dict({**BASE, **switches})
    model = SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(seed))
    if cfg.enable_pos_decay:  # non-zero so that it matters
        model.backbone.layers[cfg.num_lower_layers + 1].pos_decay[...] = np.array([-0.3], np.float32)
    return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def full_logits(model, ids):
    """Training-forward logits of ids (N, T), T padded up to a multiple of chunk_size (causal)."""
    S = model.cfg.chunk_size
    N, T = ids.shape
    pad = np.full((N, -(-T // S) * S - T), 5, ids.dtype)
    return np.asarray(_forward(*nnx.split(model), np.concatenate([ids, pad], 1)))[:, :T]


def decode_errors(model, ids, prompt_len, segment_len, swa_block=512, impl=None):
    """Max abs error of prefill logits (all prompt positions) and of the teacher-forced steps after them
    (ids past the prompt). impl: the decoder's HSA backend for prefill and steps (default the model's)."""
    ref = full_logits(model, ids)
    dec = SWAHSADecoder(model, segment_len=segment_len, swa_block=swa_block, hsa_impl=impl, step_hsa_impl=impl)
    logits, cache = dec.prefill(ids[:, :prompt_len], logits="all", capacity=ids.shape[1])
    e_prompt = float(np.abs(np.asarray(logits) - ref[:, :prompt_len]).max())
    e_step = 0.0
    for s in range(prompt_len, ids.shape[1]):
        step_logits, cache = dec.step(ids[:, s], cache)
        e_step = max(e_step, float(np.abs(np.asarray(step_logits) - ref[:, s]).max()))
    assert cache.pos == ids.shape[1]
    return e_prompt, e_step


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_equals_forward(name):
    switches, prompt_len, segment, *block = CASES[name]
    model = make_model(**switches)
    rng = np.random.default_rng(len(name))
    ids = rng.integers(3, model.cfg.vocab_size, (2, prompt_len + STEPS)).astype(np.int32)
    e_prompt, e_step = decode_errors(model, ids, prompt_len, segment, *block)
    assert e_prompt <= ATOL and e_step <= ATOL, (name, e_prompt, e_step)


@pytest.mark.parametrize("name", ["base_len77_seg32_block8", "two_groups_len33_seg7"])
def test_pallas_decode_equals_forward(name):
    """The GPU default path: prefill and one-token steps through the Pallas HSA kernel (interpret mode
    here) against the training forward with the XLA reference."""
    switches, prompt_len, segment, *block = CASES[name]
    model = make_model(**switches)
    ids = current_rng().integers(3, model.cfg.vocab_size, (2, prompt_len + 6)).astype(np.int32)
    e_prompt, e_step = decode_errors(model, ids, prompt_len, segment, *block, impl="interpret")
    assert e_prompt <= ATOL and e_step <= ATOL, (name, e_prompt, e_step)


def test_prefill_lengths_and_continuation():
    """Several prompt lengths around chunk boundaries, and a prefill continued in pieces of odd sizes:
    every position's logits equal the forward's."""
    model = make_model(seed=1)
    rng = np.random.default_rng(7)
    ids = rng.integers(3, model.cfg.vocab_size, (1, 130)).astype(np.int32)
    ref = full_logits(model, ids)
    dec = SWAHSADecoder(model, segment_len=32)
    for T in (1, 16, 31, 48):
        logits, _ = dec.prefill(ids[:, :T], logits="all")
        np.testing.assert_allclose(np.asarray(logits), ref[:, :T], atol=ATOL, rtol=0)
    # continuation in pieces (crossing chunk and segment boundaries), then "last" and label log-probs
    cache = dec.init_cache(1, 130)
    got, start = [], 0
    for piece in (5, 11, 16, 40, 3):
        out, cache = dec.prefill(ids[:, start:start + piece], cache, logits="all")
        got.append(np.asarray(out))
        start += piece
    np.testing.assert_allclose(np.concatenate(got, 1), ref[:, :start], atol=ATOL, rtol=0)
    last, cache = dec.prefill(ids[:, start:start + 20], cache, logits="last")
    np.testing.assert_allclose(np.asarray(last), ref[:, start + 19], atol=ATOL, rtol=0)
    lp, _ = SWAHSADecoder(model, segment_len=32).prefill(ids[:, :-1], labels=ids[:, 1:])
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want, atol=ATOL, rtol=0)


def test_cache_capacity_errors():
    model = make_model()
    dec = SWAHSADecoder(model, segment_len=16)
    ids = np.full((1, 20), 4, np.int32)
    with pytest.raises(CacheCapacityError, match="capacity exceeded: 0 tokens cached \\+ 20 new > capacity 10"):
        dec.prefill(ids, capacity=10)
    _, cache = dec.prefill(ids[:, :10], capacity=11)
    with pytest.raises(CacheCapacityError, match="10 tokens cached \\+ 2 new > capacity 11"):
        dec.greedy([4], cache, 2)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        dec.greedy([4], cache, 0)
    _, cache = dec.step([4], cache)
    with pytest.raises(CacheCapacityError, match="11 tokens cached \\+ 1 new > capacity 11"):
        dec.step([4], cache)
    with pytest.raises(CacheCapacityError, match="made for batch 1, got 2 rows"):
        dec.prefill(np.full((2, 3), 4, np.int32), dec.init_cache(1, 8))
    with pytest.raises(ValueError, match="logits="):
        dec.prefill(ids, logits="every")


# Every decode_<x> fixture goes with the model_<x> fixture whose weights it decodes.
DECODE_FIXTURES = [n[:-len(".npz")] for n in fixture_names("swa_hsa", "decode_*.npz")]


def model_of(decode_name: str) -> str:
    return decode_name.replace("decode_", "model_", 1)


@pytest.mark.parametrize("name", DECODE_FIXTURES)
def test_decode_fixture_via_hsa_compare(name, capsys):
    """The original inference path's prompt and step logits, via `hsa-compare --decode`."""
    decode = fixture_path("swa_hsa", f"{name}.npz")
    model_name = model_of(name)
    args = ["--model-type", "swa_hsa", "--config", str(fixture_path("swa_hsa", f"{model_name}.config.json")),
            "--reference", str(fixture_path("swa_hsa", f"{model_name}.npz")), "--decode", str(decode),
            "--segment", "128"]
    assert compare.main(args) == 0
    out = capsys.readouterr().out
    assert "prompt_logits" in out and "step_logits" in out and "PASS" in out
    if name == "decode_a_base":
        assert "seg128_last_segment_logits" in out


def test_hsa_compare_decode_errors(capsys):
    """--decode without weights anywhere, or a file without the decode arrays: exit 2 with a message."""
    name = DECODE_FIXTURES[0]
    decode = fixture_path("swa_hsa", f"{name}.npz")
    config = str(fixture_path("swa_hsa", f"{model_of(name)}.config.json"))
    assert compare.main(["--model-type", "swa_hsa", "--config", config, "--decode", str(decode)]) == 2
    assert "holds no param/ arrays" in capsys.readouterr().err
    model_npz = str(fixture_path("swa_hsa", f"{model_of(name)}.npz"))
    assert compare.main(["--model-type", "swa_hsa", "--config", config, "--decode", model_npz,
                         "--reference", model_npz]) == 2
    assert "no 'prompt_ids' array" in capsys.readouterr().err
    assert compare.main(["--model-type", "swa_hsa", "--config", config]) == 2


@pytest.mark.parametrize("ring_state,Wc", [("empty", 24), ("full", 24), ("full", 40)])
def test_swa_over_ring_equals_banded_attention(rng, ring_state, Wc):
    """The prefill's flash-attention form of the cached SWA (one causal local-window call, queries
    front-padded by the ring) against the banded attention at the same cache position; with an empty
    ring its entries are garbage that must not be read."""
    N, L, H, Hkv, D, window = 2, 64, 4, 2, 16, 24
    P = 0 if ring_state == "empty" else 1000
    q = jnp.asarray(rng.normal(size=(N, L, H, D)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(N, Wc + L, Hkv, D)), jnp.float32)
    vals = jnp.asarray(rng.normal(size=(N, Wc + L, Hkv, D)), jnp.float32)
    if ring_state == "empty":
        keys, vals = keys.at[:, :Wc].set(1e3), vals.at[:, :Wc].set(1e3)
    want = sliding_window_attention(q, keys, vals, window, start=P)
    got = swa_over_ring(q, keys, vals, window, ring_state, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
