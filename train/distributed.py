"""Multi-process launch: which process this is, joining the others, and agreeing on when to stop.

Resolution order for the cluster shape: the `hsa-train` flags, then JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, then jax's own detection (SLURM, Open MPI) when such a job is seen;
otherwise the run is a single process and nothing is initialised. `initialize` must run before anything
touches a JAX backend (jax refuses to join a cluster afterwards).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time

import jax

from hsa_jax.common.config import ConfigError


class LaunchError(ConfigError):
    """The processes of a run could not be started or joined (bad flags, unreachable coordinator)."""


@dataclasses.dataclass(frozen=True)
class Launch:
    coordinator: str | None  # host:port of process 0's coordination service
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None  # GPUs this process uses (None: all it sees)
    auto: bool  # let jax detect a SLURM / Open MPI job

    @property
    def multi(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1 or self.coordinator is not None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is invalid: must be an integer") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            local_devices: str | None = None) -> Launch:
    """Flags first, then JAX_* variables, then SLURM / Open MPI detection; checks that they agree."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    local_devices = local_devices if local_devices is not None else os.environ.get("JAX_LOCAL_DEVICE_IDS")
    ids = None
    if local_devices:
        try:
            ids = tuple(int(x) for x in local_devices.split(","))
        except ValueError:
            raise LaunchError(f"--local-devices={local_devices!r} is invalid: must be comma-separated "
                              f"device ids, e.g. 0,1") from None
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        env = os.environ
        auto = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        return Launch(None, None, None, ids, auto)
    missing = [k for k, v in given.items() if v is None]
    if num_processes is not None and num_processes < 1:
        raise LaunchError(f"--num-processes={num_processes} is invalid: must be >= 1")
    if num_processes == 1 and coordinator is None:
        missing = []  # a one-process run needs no coordinator
        process_id = 0 if process_id is None else process_id
    if missing:
        raise LaunchError(f"multi-process launch needs {', '.join(given)} together (or JAX_COORDINATOR_ADDRESS, "
                          f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
        raise LaunchError(f"--process-id={process_id} is invalid: must be in [0, {num_processes}) for "
                          f"--num-processes={num_processes}")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise LaunchError(f"--coordinator={coordinator!r} is invalid: must be HOST:PORT")
    return Launch(coordinator, num_processes, process_id, ids, False)


def _wait_for_port(address: str, timeout_s: float) -> None:
    """Processes other than 0 first wait for the coordinator to listen: jax's own connect aborts the
    process (C++ fatal) on a timeout instead of raising, so the clear error has to come from here."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise LaunchError(f"coordinator {address} unreachable: waited {timeout_s:.0f} s ({e}); is process 0 "
                                  f"running, and is --coordinator its address?") from None
            time.sleep(0.5)


def initialize(launch: Launch, timeout_s: float = 300, log=print) -> None:
    """Joins the cluster (no-op for a single process). Exits the process with status 2 and a one-line
    message when the processes do not all join within timeout_s."""
    if not launch.multi:
        return
    # CPU devices of different processes talk through gloo (the default has no cross-process collectives);
    # GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.auto:
        log("joining the cluster detected from the SLURM / Open MPI environment")
        jax.distributed.initialize(local_device_ids=launch.local_device_ids, initialization_timeout=int(timeout_s))
        return
    where = f"process {launch.process_id} of {launch.num_processes}, coordinator {launch.coordinator}"
    if launch.process_id != 0:
        _wait_for_port(launch.coordinator, timeout_s)
    log(f"{where}: waiting up to {timeout_s:.0f} s for all processes to join")
    done = threading.Event()

    def watchdog():  # jax aborts (C++ fatal, no Python exception) when the join times out: say why first
        if not done.wait(timeout_s):
            print(f"hsa-train: error: {where}: not all {launch.num_processes} processes joined within "
                  f"{timeout_s:.0f} s; start every process with the same --coordinator and --num-processes",
                  file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                               local_device_ids=launch.local_device_ids,
                               initialization_timeout=int(timeout_s) + 30)
    done.set()


def is_primary() -> bool:
    """Process 0 writes what is written once (metrics, TensorBoard, config.json, progress bar)."""
    return jax.process_index() == 0


def preemption_reached(step: int) -> bool:
    """True on every process at the same step once any process got SIGTERM (jax's preemption sync point;
    it must be asked at every step). Always False for a single process (the caller's own handler)."""
    if not jax.distributed.is_initialized():
        return False
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
