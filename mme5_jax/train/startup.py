"""Before the model is built: JAX started as the config's `mesh` and `distributed` sections say, and the demo's
inputs (dataset, processor directory) written on first use."""
import logging
import os
from pathlib import Path

import jax

from mme5_jax import runtime
from mme5_jax.config import ModelConfig
from mme5_jax.data.demo import build_demo_dataset
from mme5_jax.llama3_processor import write_processor_dir
from mme5_jax.processing import has_image_processor_config
from mme5_jax.train.config import TrainConfigError

log = logging.getLogger(__name__)


def start(config):
    """Start JAX (host CPU devices, XLA flags, joining the other processes) before anything touches a backend.

    A process whose JAX is already up (e.g. a test) keeps its backend; a CPU device count other than
    `mesh.cpu_devices` is then an error rather than a silently different mesh.
    """
    mesh, dist = config.mesh, config.distributed
    address = dist.coordinator_address or os.environ.get("MME5_COORDINATOR_ADDRESS")
    num_processes = process_id = None
    if address:
        num_processes = dist.num_processes or _env_int("MME5_NUM_PROCESSES", "distributed.num_processes")
        process_id = dist.process_id if dist.process_id is not None else \
            _env_int("MME5_PROCESS_ID", "distributed.process_id")
    runtime.start_jax(xla_flags=mesh.xla_flags, cpu_devices=mesh.cpu_devices, cpu_collectives=dist.cpu_collectives,
                      coordinator_address=address, num_processes=num_processes, process_id=process_id,
                      auto_detect=dist.auto_detect)
    if config.train.compilation_cache:
        runtime.use_compilation_cache(Path(config.output_dir).absolute() / "compile_cache")
    if mesh.cpu_devices and jax.default_backend() == "cpu" and jax.local_device_count() != mesh.cpu_devices:
        raise TrainConfigError(f"mesh.cpu_devices: {mesh.cpu_devices} asked for, but JAX already started with "
                               f"{jax.local_device_count()} CPU devices in this process")


def _env_int(name, key):
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise TrainConfigError(f"{key}: needed with a coordinator address; set it or the environment variable "
                               f"{name} (got {os.environ.get(name)!r})") from None


def ensure_demo_inputs(config):
    """Write the demo dataset / processor directory named in the config when they do not exist yet."""
    data = config.data
    if data.demo_dir is not None and not (Path(data.demo_dir) / "heldout" / "summary.json").is_file():
        if jax.process_index() == 0:
            log.info("writing the demo dataset to %s (first use)", data.demo_dir)
            build_demo_dataset(data.demo_dir, photos=False)
        runtime.sync("mme5-demo-data")
    processor_dir = config.model.processor_dir
    if processor_dir is not None and not has_image_processor_config(processor_dir):
        if config.model.path is not None:
            raise TrainConfigError(f"model.processor_dir: {processor_dir!r} has neither preprocessor_config.json nor "
                                   "an 'image_processor' section in processor_config.json")
        if jax.process_index() == 0:
            vision = ModelConfig.from_yaml(config.model.config).vision
            try:
                write_processor_dir(processor_dir, vision.image_size, vision.max_num_tiles)
            except ImportError as error:
                raise TrainConfigError(f"model.processor_dir: {processor_dir!r} does not exist, and {error}") from None
        runtime.sync("mme5-demo-processor")
