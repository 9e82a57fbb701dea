"""`hsa-export CHECKPOINT OUT_DIR`: an hsa-train checkpoint of either family -> the original's config.json
+ model.safetensors, which load back (registry from_original) into the same logits."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from hsa_jax.cli import export
from hsa_jax.common.interop import read_state_dict
from hsa_jax.common.parity import build_model
from hsa_jax.registry import FAMILIES, family
from train.checkpoint import Checkpointer


def _checkpoint(workdir, name, model, step=5):
    ck = Checkpointer(workdir / "checkpoints", keep=2)
    state = {"params": nnx.state(model, nnx.Param), "opt_state": {}, "step": np.int32(step)}
    ck.save(step, state, {"model_type": name, "model": model.cfg.to_dict()}, jax.random.key_data(jax.random.key(0)))
    ck.wait()
    ck.close()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_export_round_trip(name, tmp_path, capsys):
    fam = family(name)
    cfg = fam.config_cls.from_dict(fam.tiny)
    model = fam.model_cls(cfg, rngs=nnx.Rngs(1))
    _checkpoint(tmp_path / "run", name, model)
    assert export.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == name
    cfg2 = fam.config_cls.from_dict(config)
    back = build_model(cfg2, fam.from_original(cfg2, read_state_dict(tmp_path / "out" / "model.safetensors")),
                       fam.model_cls)
    ids = np.random.default_rng(0).integers(0, 50, (1, 2 * cfg.chunk_size))
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(model(ids)))


def test_export_errors_are_one_line_and_create_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert export.main([str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and err[0].startswith("hsa-export: error:")
    assert not missing.exists() and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert list((tmp_path / "empty").iterdir()) == []
