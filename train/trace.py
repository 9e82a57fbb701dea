"""A window of training steps traced with `jax.profiler` (`run.profile_steps`, `run.profile_from`).

The trace lands in WORKDIR/profile/plugins/profile/<time>/: `*.xplane.pb` for TensorBoard's profile
plugin or XProf, and `perfetto_trace.json.gz` for ui.perfetto.dev and `benchmarks/trace_summary.py`
(busy, compute and collective time per GPU, and how much of the collective time no compute hides).
Only process 0 traces. The logged step times of a traced window include the profiler's overhead.
"""

from __future__ import annotations

import pathlib

import jax


class StepTracer:
    def __init__(self, directory: pathlib.Path, after_step: int, steps: int, enabled: bool = True, log=print):
        self.directory, self.first, self.last = directory, after_step, after_step + steps
        self.enabled, self.active, self.log = enabled and steps > 0, False, log

    def before(self, step: int) -> None:
        """Called with the number of steps done, before the next one is dispatched."""
        if self.enabled and step == self.first:
            try:
                jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
                self.active = True
            except Exception as e:  # e.g. no CUPTI on this machine: a lost trace must not stop training
                self.log(f"warning: run.profile_steps: the profiler did not start ({type(e).__name__}: {e})")

    def after(self, step: int, state) -> bool:
        """Called after a step is dispatched; -> True when this call ended the trace."""
        if self.active and step >= self.last:
            jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
