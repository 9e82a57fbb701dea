"""A short CPU run of `hsa-train --config configs/drt_tiny.yaml`: the DRT family trains and evaluates
through the same loop, metrics and checkpoints as SWA+HSA."""

import json
import pathlib

import numpy as np

from hsa_jax.cli import evaluate, generate
from train.config import load_config
from train.flops import train_flops_per_token
from train.main import resolve_index, train

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "drt_tiny.yaml"


def test_drt_tiny_trains_and_evaluates(tmp_path, capsys):
    cfg = load_config(CONFIG, [f"workdir={tmp_path}", "steps=30", "log_every=1", "eval_every=30",
                               "checkpoint_every=30", "eval_batches=1", "model.hidden_size=64",
                               "model.intermediate_size=128", "model.decoder_layers=[1, 1]"])
    assert cfg.model_type == "drt" and cfg.data.seq_len % cfg.model.chunk_size == 0
    summary = train(cfg, log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and all(np.isfinite(losses)) and not any(r.get("skipped") for r in rows)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5  # from ~ln(259) = 5.56 towards byte statistics
    assert np.isfinite(summary["eval_loss"]) and summary["eval_loss"] < losses[0]
    assert (tmp_path / "checkpoints" / "30").exists()
    assert train_flops_per_token("drt", cfg.model, cfg.data.seq_len) > 0
    # The trained checkpoint through hsa-eval (S-NIAH + perplexity) and hsa-generate.
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(tmp_path), "--haystack", str(resolve_index("bundled")), "--lengths",
                          "512", "--samples", "2", "--ppl", "--ppl-samples", "1", "--out", str(out)]) == 0
    ppl = json.loads((out / "results.json").read_text())["perplexity"]["512"]["ppl"]
    assert 1.0 < ppl < 259.0
    assert generate.main(["--checkpoint", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "8", "--stop", ""]) == 0
    assert "8 generated" in capsys.readouterr().err


def test_drt_real_size_config_mirrors_the_original_recipe():
    cfg = load_config(CONFIG.with_name("drt_pg19.yaml"))
    m = cfg.model
    assert (m.vocab_size, m.hidden_size, m.num_attention_heads, m.decoder_layers, m.encoder_layers) == \
        (50265, 768, 12, (6, 6), 2)
    assert (m.enc_chunk_size, m.chunk_topk, m.slide_window, m.enable_alibi, m.window) == (63, 8, 512, True, 512)
    assert cfg.data.seq_len == 260 * 63 and cfg.optim.lr == 2e-3
