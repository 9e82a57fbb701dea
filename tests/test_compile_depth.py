"""Depth-independent compilation: identical consecutive blocks run as one jax.lax.scan
(hsa_jax/layers.py scan_blocks) over their per-layer parameters, so the program, and the time to
compile it, hardly grow with the number of layers; gradients still reach every layer's own parameters,
with or without remat. Also: every run config in configs/ loads, and the 1.3B config has that size."""

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.drt.model import DRTForCausalLM
from hsa_jax.models.drt.config import DRTConfig
from hsa_jax.common.layers import rope_cos_sin
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM
from hsa_jax.registry import family
from train.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

# The model section of configs/tiny.yaml, without its layer counts.
TINY = dict(vocab_size=257, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            num_kv_heads=1, chunk_size=32, chunk_topk=4, retrieval_dim=128, encoder_layers=1, sliding_window=64,
            initializer_range=0.02)


def next_token_nll(model, ids_NxL1, **kwargs):
    logp = jax.nn.log_softmax(model(ids_NxL1[:, :-1], **kwargs), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids_NxL1[:, 1:, None], axis=-1))


def loss_and_grads_fn(graphdef, **kwargs):
    """(params, ids (N, L+1)) -> (loss, grads wrt the per-layer parameters), as the train step takes them."""
    return jax.value_and_grad(lambda params, ids: next_token_nll(nnx.merge(graphdef, params), ids, **kwargs))


def random_ids(n, length, vocab):
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (n, length)), jnp.int32)


def test_train_step_program_size_is_depth_independent():
    """4 vs 32 SWA layers (half below the HSA group, half above): the compiled loss+grad program of
    the 32-layer model is < 1.5x the 4-layer one (unrolled, it was ~4.8x). What still grows is the
    per-layer stacking of parameters and unstacking of their gradients: a few cheap ops per tensor."""
    sizes = {}
    for layers in (4, 32):
        cfg = SWAHSAConfig(**TINY, num_lower_layers=layers // 2, num_upper_layers=layers // 2)
        graphdef, params = nnx.split(nnx.eval_shape(lambda: SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(0))))
        ids = jax.ShapeDtypeStruct((2, 4 * cfg.chunk_size + 1), jnp.int32)
        start = time.perf_counter()
        lowered = jax.jit(loss_and_grads_fn(graphdef, remat=True)).lower(params, ids)
        lowered_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lowered_s
        sizes[layers] = len(compiled.as_text())
        print(f"\n{layers} SWA layers: StableHLO {len(lowered.as_text())} chars, compiled HLO {sizes[layers]} chars, "
              f"lowering {lowered_s:.2f} s, compiling {compile_s:.2f} s")
    assert sizes[32] < 1.5 * sizes[4], sizes


def swa_layer_grads(grads, cfg: SWAHSAConfig) -> list[np.ndarray]:
    """Each SWA block's q_proj kernel gradient, in layer order."""
    kinds = cfg.layer_kinds()
    return [np.asarray(grads["backbone"]["layers"][i]["self_attn"]["q_proj"]["kernel"][...])
            for i, kind in enumerate(kinds) if kind == "swa"]


def assert_distinct_nonzero(grads_per_layer):
    """Each layer's gradient of one parameter is non-zero and differs from every other layer's."""
    assert all(float(jnp.abs(g).max()) > 0 for g in grads_per_layer)
    for i in range(len(grads_per_layer)):
        for j in range(i):
            assert rel_err(grads_per_layer[i], grads_per_layer[j]) > 1e-3, (i, j)


def test_swa_hsa_remat_gradients_equal_and_reach_every_layer():
    """3 lower layers (a scan) and two groups of 1 upper layer (single blocks, no loop)."""
    cfg = SWAHSAConfig(**TINY, num_lower_layers=3, num_upper_layers=2, num_upper_groups=2)
    graphdef, params = nnx.split(SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(0)))
    ids = random_ids(2, 2 * cfg.chunk_size + 1, cfg.vocab_size)
    (loss0, g0), *others = (jax.jit(loss_and_grads_fn(graphdef, remat=r, scan_layers=s))(params, ids)
                            for r, s in ((False, True), (True, True), (False, False), (True, False)))
    for loss1, g1 in others:  # remat and unrolled layers (scan_layers=False) compute the same gradients
        assert abs(float(loss0) - float(loss1)) < 1e-6
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    per_layer = swa_layer_grads(g0, cfg)
    assert len(per_layer) == 5
    assert_distinct_nonzero(per_layer)


def test_scanned_hidden_states_equal_the_layer_by_layer_loop():
    """return_hidden still gives one output per backbone layer, and the scan computes what calling the
    blocks one after the other does."""
    cfg = SWAHSAConfig(**TINY, num_lower_layers=3, num_upper_layers=2)
    model = SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(1))
    ids = random_ids(1, 2 * cfg.chunk_size, cfg.vocab_size)
    _, aux = model(ids, return_hidden=True)
    assert len(aux["hidden_states"]) == len(cfg.layer_kinds()) + 1
    h = model.backbone.embeddings(ids, jnp.float32)
    cos, sin = rope_cos_sin(jnp.arange(ids.shape[1])[None], cfg.head_dim, cfg.rope_theta, jnp.float32)
    for i in range(cfg.num_lower_layers):
        h = model.backbone.layers[i](h, cos, sin, window=cfg.sliding_window)
        assert rel_err(aux["hidden_states"][i], h) < 1e-6, i


def test_drt_remat_gradients_equal_and_reach_every_layer():
    """Lower layers and the upper layers of each group run as scans."""
    cfg = DRTConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                    decoder_layers=[3, 2, 2], encoder_layers=1, enc_chunk_size=63, chunk_topk=2, chunk_id=60,
                    pad_id=59, slide_window=40, initializer_range=0.2, gca_impl="xla")
    graphdef, params = nnx.split(DRTForCausalLM(cfg, rngs=nnx.Rngs(0)))
    ids = random_ids(1, 3 * cfg.enc_chunk_size + 1, 58)
    (_, g0), *others = (jax.jit(loss_and_grads_fn(graphdef, remat=r, scan_layers=s))(params, ids)
                        for r, s in ((False, True), (True, True), (False, False)))
    for _, g1 in others:
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    m = g0["model"]
    assert_distinct_nonzero([m["lower_layers"][i]["mlp"]["up_proj"]["kernel"][...] for i in range(3)])
    assert_distinct_nonzero([m["upper_layers"][g][i]["gca"]["q_proj"]["kernel"][...] for g in range(2) for i in range(2)])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_load(path):
    cfg = load_config(path)
    model = nnx.eval_shape(lambda: family(cfg.model_type).model_cls(cfg.model, rngs=nnx.Rngs(0)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if path.name == "swa_hsa_1b.yaml":  # the count its header states
        assert n_params == 1_281_041_664
