"""PyTorch interop (original state_dict keys in and out) and the hsa-compare CLI."""

import numpy as np
import pytest
from flax import nnx

from conftest import fixture_names, fixture_path, load_npz
from hsa_jax.cli import compare
from hsa_jax.common.interop import (CheckpointMismatchError, export_state_dict, load_state_dict, read_state_dict,
                             save_safetensors)
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM
from test_model import random_ids, tiny


@pytest.mark.parametrize("tied", [False, True])
def test_safetensors_roundtrip_gives_identical_logits(tmp_path, tied):
    cfg = tiny(tie_word_embeddings=tied)
    a = SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(1))
    b = SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(2))
    save_safetensors(a, tmp_path / "model.safetensors")
    sd = read_state_dict(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in sd) and sd["backbone.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    load_state_dict(b, sd)
    ids = random_ids(1, 64)
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_original_keys_match_fixture_state_dict():
    """Our parameter set, under original keys and torch shapes, is exactly the original state_dict."""
    from hsa_jax.models.swa_hsa.config import SWAHSAConfig
    cfg = SWAHSAConfig.from_json(fixture_path("swa_hsa", "model_b_hsa_swa_softmax1.config.json"))
    ref = {k[6:]: v.shape for k, v in load_npz("swa_hsa", "model_b_hsa_swa_softmax1.npz").items() if k.startswith("param/")}
    ours = {k: v.shape for k, v in export_state_dict(SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(0))).items()}
    assert ours == ref


def test_mismatched_checkpoint_lists_every_problem():
    cfg = tiny()
    sd = export_state_dict(SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(0)))
    sd.pop("backbone.norm_f.weight")
    sd["backbone.layers.9.extra.weight"] = np.zeros(3)
    sd["lm_head.weight"] = np.zeros((5, 5))
    with pytest.raises(CheckpointMismatchError) as e:
        load_state_dict(SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(0)), sd)
    msg = str(e.value)
    assert "missing key: backbone.norm_f.weight" in msg
    assert "unexpected key: backbone.layers.9.extra.weight" in msg
    assert "wrong shape: lm_head.weight: checkpoint (5, 5), model expects (97, 64)" in msg


def test_npz_and_legacy_embedding_key(tmp_path):
    cfg = tiny()
    a = SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(4))
    sd = export_state_dict(a)
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")  # pre-rename checkpoints
    np.savez(tmp_path / "w.npz", **{f"param/{k}": v for k, v in sd.items()})
    b = SWAHSAForCausalLM(cfg, rngs=nnx.Rngs(5))
    load_state_dict(b, read_state_dict(tmp_path / "w.npz"))
    ids = random_ids(1, 32)
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
    (tmp_path / "w.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="unknown checkpoint format '.txt'"):
        read_state_dict(tmp_path / "w.txt")


def test_hsa_compare_cli_exit_codes(tmp_path, capsys):
    name = fixture_names("swa_hsa", "model_*.npz")[-1][:-len(".npz")]  # one with per-layer hidden states
    config = fixture_path("swa_hsa", f"{name}.config.json")
    ref = load_npz("swa_hsa", f"{name}.npz")
    assert compare.main(["--model-type", "swa_hsa", "--config", str(config), "--reference",
                         str(fixture_path("swa_hsa", f"{name}.npz"))]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "hidden_states/04" in out
    bad = dict(ref, logits=ref["logits"] + 1e-3)
    np.savez(tmp_path / "bad.npz", **bad)
    assert compare.main(["--model-type", "swa_hsa", "--config", str(config), "--reference", str(tmp_path / "bad.npz")]) == 1
    assert "FAIL" in capsys.readouterr().out
    np.savez(tmp_path / "broken.npz", **{k: v for k, v in ref.items() if k != "param/backbone.norm_f.weight"})
    assert compare.main(["--model-type", "swa_hsa", "--config", str(config), "--reference", str(tmp_path / "broken.npz")]) == 2
    assert "missing key: backbone.norm_f.weight" in capsys.readouterr().err
