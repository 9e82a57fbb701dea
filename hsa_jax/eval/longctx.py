"""Long-context evaluation over any decoder: RULER-style task accuracy and perplexity by context length
(the library of hsa-eval, hsa_jax/cli/evaluate.py).

Every sample is built from a haystack window of the token index (window i of length L starts at i*L,
clamped to total - L - 1, as the original's sequential LongRNNDataset), turned into a task by
hsa_jax.eval.ruler (as the original builds it), and scored as eval_ruler.py does: q ++ a is fed teacher
forced through the cached decoder (segmented prefill), and a sample is a hit iff the argmax predicts
every answer token but the final EOS. Perplexity at length L: mean NLL of windows of L + 1 tokens
(all L predictions, and the second half alone: the tokens with at least L/2 of context).
"""

from __future__ import annotations

import functools
import pathlib
import time

import numpy as np

from hsa_jax.eval.ruler import TASKS, RulerTasks, TextTokenizer, predicted_answer


def parse_length(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    return int(float(t[:-1]) * mult) if t[-1:] in "KM" else int(t)


# Extra tasks for the CPU extrapolation demo (README "Extrapolation demo"): RulerTasks.passkey with a
# shorter key (the RULER builders themselves are unchanged). "passkey2": 2-digit key, "passkey3": 3 digits.
DEMO_TASKS = {f"passkey{d}": functools.partial(RulerTasks.passkey, digits=d) for d in (2, 3)}
DEMO_TASKS["mk_passkey2"] = functools.partial(RulerTasks.mk_passkey, digits=2)  # 4 named 2-digit keys, one asked
DEMO_TASKS["mk_passkey2_keys2"] = functools.partial(RulerTasks.mk_passkey, digits=2, keys=2)  # 2 named keys, one asked
ALL_TASKS = TASKS + tuple(DEMO_TASKS)


def build_task(builder: RulerTasks, name: str, haystack) -> "object":
    """A RulerTasks task, or one of DEMO_TASKS."""
    return DEMO_TASKS[name](builder, haystack) if name in DEMO_TASKS else builder.build(name, haystack)


def window_starts(total_tokens: int, L: int, samples: int, seed: int = 0) -> list[int]:
    """Where the haystack windows of L tokens start. seed 0: consecutive windows from the start of the
    index (the samples of every earlier evaluation); another seed: uniform draws, i.e. fresh samples
    (needle positions and keys follow from each window's tokens, as the original's seeding does)."""
    if total_tokens < L + 2:
        raise ValueError(f"the haystack index has {total_tokens} tokens, fewer than a window of {L}")
    last = total_tokens - L - 1
    if seed == 0:
        return [min(i * L, last) for i in range(samples)]
    return np.random.default_rng([seed, L]).integers(0, last + 1, size=samples).tolist()


def haystack_window(index, start: int, L: int) -> np.ndarray:
    return index.read(start, L).astype(np.int64)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a hit rate (sound at 0 and n hits, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def run_task(decoder, task, *, capacity=None) -> np.ndarray:
    """One task sample through the decoder, teacher forced: the prompt is prefilled without logits,
    the answer's tail with them. -> the predicted answer tokens (ruler.predicted_answer)."""
    ids = np.asarray(task.ids)[None]
    tail = task.scored + 2
    cache = None
    if ids.shape[1] > tail:
        _, cache = decoder.prefill(ids[:, :-tail], logits="none", capacity=ids.shape[1])
    logits, _ = decoder.prefill(ids[:, -tail:], cache, logits="all", capacity=ids.shape[1])
    return predicted_answer(np.asarray(logits[0]), task)


def evaluate_tasks(decoder, index, tok: TextTokenizer, tasks, lengths, samples: int, log=print,
                   seed: int = 0) -> dict:
    builder = RulerTasks(tok)
    results = {}
    for name in tasks:
        results[name] = {}
        for L in lengths:
            t0 = time.perf_counter()
            per_sample = []
            for start in window_starts(index.total_tokens, L, samples, seed):
                task = build_task(builder, name, haystack_window(index, start, L))
                guess, answer = run_task(decoder, task), np.asarray(task.a[:task.scored])
                per_sample.append({"window_start": int(start), "hit": bool(np.array_equal(guess, answer)),
                                   "predicted": guess.tolist(), "answer": answer.tolist()})
            hits = sum(s["hit"] for s in per_sample)
            dt = time.perf_counter() - t0
            lo, hi = wilson(hits, samples)
            results[name][str(L)] = {"accuracy": hits / samples, "hits": hits, "samples": samples,
                                     "wilson95": [lo, hi], "seed": seed, "seconds": dt, "per_sample": per_sample}
            log(f"hsa-eval: {name} L={L}: {hits}/{samples} (95% CI {100 * lo:.0f}-{100 * hi:.0f}%, {dt:.1f} s)")
    return results


def evaluate_ppl(decoder, index, lengths, samples: int, log=print, seed: int = 0) -> dict:
    out = {}
    for L in lengths:
        t0 = time.perf_counter()
        nll, nll_tail, n, n_tail = 0.0, 0.0, 0, 0
        for start in window_starts(index.total_tokens, L + 1, samples, seed):
            w = haystack_window(index, start, L + 1)[None]
            lp, _ = decoder.prefill(w[:, :-1], labels=w[:, 1:], capacity=L)
            lp = -np.asarray(lp[0], np.float64)
            nll, n = nll + lp.sum(), n + L
            nll_tail, n_tail = nll_tail + lp[L // 2:].sum(), n_tail + L - L // 2
        out[str(L)] = {"nll": nll / n, "ppl": float(np.exp(nll / n)), "ppl_second_half": float(np.exp(nll_tail / n_tail)),
                       "tokens": n, "samples": samples, "seconds": time.perf_counter() - t0}
        log(f"hsa-eval: ppl L={L}: {out[str(L)]['ppl']:.3f}")
    return out


def format_table(results: dict, ppl: dict | None, lengths) -> str:
    head = ["task"] + [_fmt_len(L) for L in lengths]
    cell = lambda x: f"{100 * x['accuracy']:.1f}% [{100 * x['wilson95'][0]:.0f}-{100 * x['wilson95'][1]:.0f}]"
    rows = [[name] + [cell(r[str(L)]) if str(L) in r else "-" for L in lengths] for name, r in results.items()]
    if ppl:
        rows.append(["ppl"] + [f"{ppl[str(L)]['ppl']:.3f}" if str(L) in ppl else "-" for L in lengths])
        rows.append(["ppl (2nd half)"] + [f"{ppl[str(L)]['ppl_second_half']:.3f}" if str(L) in ppl else "-"
                                          for L in lengths])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt_len(L: int) -> str:
    if L % (1024 * 1024) == 0:
        return f"{L // (1024 * 1024)}M"
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def plot(results: dict, lengths, path: pathlib.Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        xs = [L for L in lengths if str(L) in r]
        ax.plot(xs, [100 * r[str(L)]["accuracy"] for L in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_fmt_len(L) for L in lengths])
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
