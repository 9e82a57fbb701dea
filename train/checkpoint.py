"""Orbax checkpoints of the whole run state: params, optimizer state, step, rng, data position and
config. Saves are async and atomic (Orbax writes to a temporary directory and renames); restore falls
back to the previous checkpoint when the latest is corrupt or partial, and reshards onto whatever mesh
and process count the restoring run uses. Every saved array is a global jax.Array and every process
calls save/restore (Orbax writes each process's shards and the JSON items once).
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    def save(self, step: int, state, config: dict, rng_data) -> None:
        """`step` steps are done: the data position (the next global batch) is `step` too, whatever the
        process count, so it is stored as that rather than as one process's iterator."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({**state, "rng": rng_data}),
            data=ocp.args.JsonSave({"next_step": step}),
            config=ocp.args.JsonSave(config),
        ))

    def restore_latest(self, target_state, rng_data, log=print):
        """-> (step, state) of the newest readable checkpoint, or None if none exist.
        `target_state` (concrete arrays on the current mesh) gives the shapes and shardings to restore to."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**target_state, "rng": rng_data})
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as e:  # a partial or corrupt checkpoint: report it and try the previous one
                log(f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); trying the previous one")
                continue
            state = dict(out.state)
            state.pop("rng")
            return step, state
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
