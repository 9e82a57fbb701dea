"""Orbax checkpoints of the whole run state: params, optimizer state, step, rng, data position and
config. Saves are async and atomic (Orbax writes to a temporary directory and renames); restore falls
back to the previous checkpoint when the latest is corrupt or partial, and reshards onto whatever mesh
and process count the restoring run uses. Every saved array is a global jax.Array and every process
calls save/restore (Orbax writes each process's shards and the JSON items once).
"""

from __future__ import annotations

import os
import pathlib

import jax
import orbax.checkpoint as ocp

from hsa_jax.common.checkpoint import config_restore_args, save_args, state_restore_args
from hsa_jax.common.config import ConfigError
from train.distributed import barrier
from train.workdir import model_mismatch, stamp


class CheckpointError(ConfigError):
    """A checkpoint could not be written, or does not belong to this run's model."""


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )
        self.pending: list[int] = []  # steps saved asynchronously, checked by wait()

    def save(self, step: int, state, config: dict, rng_data) -> None:
        """`step` steps are done: the data position (the next global batch) is `step` too, whatever the
        process count, so it is stored as that rather than as one process's iterator. Orbax silently skips
        a step it already holds (or one below its latest): that is an error here, never lost work."""
        saved = self.manager.save(step, args=save_args({**state, "rng": rng_data}, {"next_step": step}, config))
        if not saved:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} was not written: the folder already "
                                  f"holds steps {sorted(self.manager.all_steps())}")
        self.pending.append(step)

    def restore_latest(self, target_state, rng_data, config: dict, log=print):
        """-> (step, state) of the newest readable checkpoint, or None if none exist.
        `target_state` (concrete arrays on the current mesh) gives the shapes and shardings to restore to.
        A checkpoint of another model (its stored config vs `config`) is a CheckpointError; an unreadable
        one is moved aside to <step>.corrupt-<time> (so that the step can be saved again) and the previous
        one is tried."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**target_state, "rng": rng_data})
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = self.directory / str(step)
            try:
                saved_config = self.manager.restore(step, args=config_restore_args()).config
                diff = model_mismatch(saved_config, config)
                if not diff:
                    out = self.manager.restore(step, args=state_restore_args(abstract))
            except Exception as e:  # a partial or corrupt checkpoint: move it aside, try the previous one
                aside = path.with_name(f"{step}.corrupt-{stamp()}")
                log(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    f"moved to {aside.name}, trying the previous one")
                if jax.process_index() == 0:
                    os.replace(path, aside)
                barrier(f"checkpoint-aside-{step}")
                self.manager.reload()
                continue
            if diff:
                raise CheckpointError(f"checkpoint {path} is of another model ({'; '.join(diff)}); use another "
                                      f"workdir, or --resume never to move the old run aside")
            state = dict(out.state)
            state.pop("rng")
            return step, state
        return None

    def wait(self):
        """Blocks until every save is on disk, and checks that each one is there."""
        self.manager.wait_until_finished()
        newest = max(self.pending, default=None)  # older ones may be gone by max_to_keep, as they should
        self.pending.clear()
        if newest is not None and newest not in self.manager.all_steps():
            raise CheckpointError(f"checkpoint {self.directory / str(newest)} is missing after saving it")

    def close(self):
        self.manager.close()
