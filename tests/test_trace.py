"""`run.profile_steps` traces a window of real training steps, and benchmarks/trace_summary.py's interval
arithmetic (union, uncovered length) agrees with a brute-force count on random intervals."""

import gzip
import json
import sys

import numpy as np
import pytest

from train.config import load_config
from train.main import train
from test_train import SMALL, losses

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
import trace_summary  # noqa: E402


def test_profiled_steps_land_in_a_perfetto_trace(tmp_path):
    cfg = load_config(None, [*SMALL, f"workdir={tmp_path}", "steps=5", "checkpoint_every=100",
                             "run.profile_from=2", "run.profile_steps=2"])
    train(cfg, log=lambda m: None)
    (trace,) = (tmp_path / "profile").rglob("perfetto_trace.json.gz")
    events = json.loads(gzip.open(trace).read())["traceEvents"]
    steps, rows, top, count = trace_summary.summarise(events, "/host:CPU", None)
    assert steps == 2  # steps 3 and 4 exactly: neither the compiling first step nor the last
    (proc, span, busy, comp, coll, exposed, kernels), = rows
    assert kernels == sum(count.values()) > 0 and set(count) == set(top)
    assert 0 < busy <= span and 0 < comp <= busy and 0 <= exposed <= coll <= busy  # 8 devices: all-reduces
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]  # tracing does not disturb the run


def test_trace_table_excludes_the_traced_window(tmp_path):
    import train_table
    cfg = load_config(None, [*SMALL, f"workdir={tmp_path}", "steps=6", "checkpoint_every=100",
                             "run.profile_from=4", "run.profile_steps=2"])
    train(cfg, log=lambda m: None)
    row = train_table.summarise(tmp_path, from_step=1)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    untraced = sorted(r["step_time_s"] for r in rows if "step_time_s" in r and 1 < r["step"] <= 4)
    assert row["step_s"] == pytest.approx(float(np.median(untraced)))


@pytest.mark.parametrize("seed", range(5))
def test_interval_union_and_uncovered_length_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    make = lambda n: [tuple(sorted(rng.integers(0, 200, 2).tolist())) for _ in range(n)]
    xs, ys = trace_summary.union(make(30)), trace_summary.union(make(30))
    grid = lambda iv: np.any([(np.arange(200) >= a) & (np.arange(200) < b) for a, b in iv] or [np.zeros(200, bool)], axis=0)
    assert trace_summary.length(xs) == grid(xs).sum()
    assert trace_summary.minus(xs, ys) == (grid(xs) & ~grid(ys)).sum()


def test_train_step_breakdown_attributes_every_kernel_to_a_model_part(capsys):
    import train_step
    assert train_step.category("jit(train_step)/transpose(jvp(mlp))/dot_general", "fusion.3") == "MLP"
    assert train_step.category("jit(train_step)/jvp(chunking)/mlp/dense/dot_general", "dot.1").startswith("chunk")
    assert train_step.category("jit(train_step)/while/body/hsa_core/pallas_call", "x") == "HSA attention (kernels)"
    assert train_step.category("jit(train_step)/dense_layer/add", "add.2").startswith("other")  # whole names only
    assert train_step.category("", "all-gather-start.1") == "collectives"
    assert train_step.main(["global_batch_size=8", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| *"): line for line in out.splitlines() if line.startswith("| ")}
    for part in ("MLP", "SWA / self-attention core", "HSA attention (kernels)", "chunk encoder, memory K/V, landmarks",
                 "retrieval scores, top-k", "LM head and log-softmax",
                 "optimizer (grad norm, clip, AdamW)", "attention / HSA projections"):
        assert float(rows[part].split(" | ")[1]) > 0, part  # every scope of the model shows up
    assert "had no HLO op name" not in out  # every traced kernel was found in the compiled program
