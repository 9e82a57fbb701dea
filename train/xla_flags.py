"""XLA flags that let sharded GPU steps overlap communication with compute.

Under FSDP every layer all-gathers its parameters and reduce-scatters its gradients. XLA's latency-hiding
scheduler, the pipelined collectives (issue layer i+1's all-gather while layer i computes; inside the
scan over layers too, with while-loop double buffering) and larger combine thresholds (fewer, bigger
NCCL calls) hide most of that time (docs/benchmarks.md has the before/after). The flags must be in
XLA_FLAGS before the first backend use; CPU runs ignore them.
"""

from __future__ import annotations

import os

GPU_OVERLAP_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_all_gather_combine_threshold_bytes": str(1 << 27),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(1 << 26),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(1 << 27),
}


def add_overlap_flags(environ=os.environ) -> list[str]:
    """Appends the flags above to XLA_FLAGS, except those the user set there already (theirs win);
    -> the flags added."""
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in GPU_OVERLAP_FLAGS.items() if f"--{k}=" not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
