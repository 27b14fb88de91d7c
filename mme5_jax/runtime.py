"""JAX process start-up and cross-process barriers, shared by the trainer, the benchmark and checkpoint writers.

Some settings (XLA flags, the host CPU device count, CPU collectives, joining other processes) only take effect
before JAX starts a backend, so every entry point applies them through `start_jax` first thing.
"""
import os

import jax
from jax._src import xla_bridge
from jax.experimental import multihost_utils


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


def sync(name: str):
    """Wait until every process reaches the barrier `name` (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
