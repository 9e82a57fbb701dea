"""Orbax checkpoints of the whole run state: params, optimizer state, step, rng, data iterator
position and config. Saves are async and atomic (Orbax writes to a temporary directory and renames);
restore falls back to the previous checkpoint when the latest is corrupt or partial, and reshards onto
whatever mesh the restoring run uses.
"""

from __future__ import annotations

import json
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

    def save(self, step: int, state, data_state: bytes, config: dict, rng_data) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({**state, "rng": rng_data}),
            data=ocp.args.JsonSave(json.loads(data_state.decode())),
            config=ocp.args.JsonSave(config),
        ))

    def restore_latest(self, target_state, rng_data, log=print):
        """-> (step, state, data_state bytes) of the newest readable checkpoint, or None if none exist.
        `target_state` (concrete arrays on the current mesh) gives the shapes and shardings to restore to."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**target_state, "rng": rng_data})
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            except Exception as e:  # a partial or corrupt checkpoint: report it and try the previous one
                log(f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); trying the previous one")
                continue
            state = dict(out.state)
            state.pop("rng")
            return step, state, json.dumps(out.data).encode()
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
