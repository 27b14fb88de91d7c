"""JAX process start-up, cross-process barriers and the preemption notice, shared by the trainer, the benchmark and
checkpoint writers.

Some settings (XLA flags, the host CPU device count, CPU collectives, joining other processes) only take effect
before JAX starts a backend, so every entry point applies them through `start_jax` first thing.
"""
import logging
import os
import signal
import threading

import jax
from jax._src import xla_bridge
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def start_jax(*, xla_flags=None, cpu_devices=None, cpu_collectives=None, coordinator_address=None,
              num_processes=None, process_id=None, auto_detect=False):
    """Apply the start-up settings given; returns False, applying none, when a backend is already up (e.g. in a
    test process that started JAX before), so callers check the devices they got rather than trust the settings.

    `coordinator_address` joins `num_processes` processes as `process_id`; without it, `auto_detect` lets JAX
    find a TPU pod / SLURM / MPI job. `cpu_collectives` "none" (or None) keeps JAX's default.
    """
    if xla_bridge.backends_are_initialized():
        return False
    if xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if cpu_collectives not in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif auto_detect:
        jax.distributed.initialize()
    return True


def use_compilation_cache(path) -> None:
    """Compiled executables are written under `path` and read back by any later process that compiles the same
    program for the same devices (JAX keeps compiles of 1 s or more). Each read is logged. JAX opens the cache at
    a process's first compile, so in a process that has compiled before, the directory it opened stays in use."""
    global _logging_cache_hits
    jax.config.update("jax_compilation_cache_dir", str(path))
    if not _logging_cache_hits:
        jax.monitoring.register_event_listener(_log_cache_hit)
        _logging_cache_hits = True


def _log_cache_hit(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
        log.info("compilation cache: an executable was read back instead of compiled")


_logging_cache_hits = False


def sync(name: str):
    """Wait until every process reaches the barrier `name` (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class PreemptionNotice:
    """SIGTERM, what TPU maintenance events and SLURM send before they stop a job, asks for a checkpoint at the
    next step boundary and a clean exit.

    With several processes JAX's preemption service (started by `jax.distributed.initialize`) hears the signal
    and agrees on one step that every process reaches; a single process sets a flag in its own handler, installed
    for the `with` block only.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False

    def _handle(self, signum, frame):
        self.received = True

    def reached(self, step: int) -> bool:
        """Whether the run should checkpoint after `step` and stop; called by every process at every step."""
        if jax.process_count() > 1:
            self.received = self.received or multihost_utils.reached_preemption_sync_point(step)
        return self.received
