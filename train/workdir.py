"""The training workdir: one writer at a time, and an explicit decision before anything is written.

    resume (default)   continue from the latest readable checkpoint, if the workdir's run is of the same
                       model (a different model is a config mismatch, exit 2, naming field and values)
    --resume never     start over: the old run's files move into DIR/replaced-<time>/, never mixed
                       with the new run's, never deleted

config.json is written once the run really starts (after the index, mesh and checkpoint checks), so a
failed start leaves an existing run's files as they were. Process 0 holds the lock and moves files;
every process makes the same decision from the same files.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib

from data_pipeline import DirLock
from data_pipeline.index import atomic_write_json
from hsa_jax.common.config import ConfigError
from hsa_jax.registry import family

RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json", "profile")


def stamp() -> str:
    """A time for names of moved-aside files: sortable, no characters a shell or Orbax trips on."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def model_mismatch(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every model setting that differs between two run configs (to_dict form),
    except the family's inference-time fields (dtype, kernel choice, top-k), which a resumed run may
    change."""
    if old.get("model_type") != new.get("model_type"):
        return [f"model_type: {old.get('model_type')!r} -> {new.get('model_type')!r}"]
    free = family(new["model_type"]).config_cls.INFERENCE_FIELDS
    a, b = old.get("model", {}), new.get("model", {})
    return [f"model.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in free and a.get(k) != b.get(k)]


class Workdir:
    def __init__(self, path: str | os.PathLike, primary: bool = True):
        self.path = pathlib.Path(path).absolute()
        self.primary = primary
        self.lock = DirLock(self.path, what="training workdir")

    def open(self, config: dict, resume: bool, log=print) -> None:
        """Takes the lock (process 0) and applies the resume decision; raises ConfigError (or the lock's
        LockedError) without having changed anything of an existing run."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"config field run.workdir={str(self.path)!r} is invalid: it is a file, not a folder")
        if self.primary:
            self.lock.acquire()
        previous = self.path / "config.json"
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not resume:
            if present and self.primary:
                aside = self.path / f"replaced-{stamp()}"
                aside.mkdir()
                for name in present:
                    os.replace(self.path / name, aside / name)
                log(f"--resume never: moved the previous run's {', '.join(present)} to {aside}")
            return
        if previous.exists():
            try:
                old = json.loads(previous.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{previous}: unreadable ({e}); move it away or use --resume never") from None
            diff = model_mismatch(old, config)
            if diff:
                raise ConfigError(f"run.workdir={self.path} holds a run of another model ({'; '.join(diff)}); use "
                                  f"another workdir, or --resume never to move that run aside")
        elif (self.path / "checkpoints").exists() and any((self.path / "checkpoints").iterdir()):
            raise ConfigError(f"run.workdir={self.path} has checkpoints but no config.json, so it cannot be "
                              f"checked against this config; use --resume never to move them aside")

    def start(self, config: dict) -> None:
        """The run is starting: record its config (process 0; atomic)."""
        if self.primary:
            atomic_write_json(self.path / "config.json", config)

    def close(self) -> None:
        self.lock.release()
