"""What a run is made of, from its config: the mesh, the model with fresh adapters, the record sets, the Grain
pipeline's settings and the step count they imply."""
import dataclasses
import logging
import math
from pathlib import Path

import jax
from flax import nnx

from mme5_jax.config import ModelConfig
from mme5_jax.data.mixture import RecordSet, open_mixture
from mme5_jax.data.pipeline import load_processor
from mme5_jax.data.pipeline_config import PipelineConfig
from mme5_jax.data.tfds_source import TfdsRecordSet
from mme5_jax.embedder import load_params
from mme5_jax.model.init import random_model
from mme5_jax.model.lora import add_adapters
from mme5_jax.model.mllama import model_from_params
from mme5_jax.processing import DEFAULT_MAX_IMAGE_PIXELS
from mme5_jax.sharding import make_mesh
from mme5_jax.train.config import TrainConfigError, processor_dir

log = logging.getLogger(__name__)


def run_mesh(config):
    """The mesh `mesh` asks for, checked before anything is written: both batch sizes must split evenly over its
    batch shards and the processes, and a GradCache chunk over the batch shards (else its sharding constraint
    cannot hold and every chunk is gathered whole)."""
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    divisor = math.lcm(shards, jax.process_count())
    for key, size in (("data.global_batch_size", config.data.global_batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
        if size % divisor:
            raise TrainConfigError(f"{key}: {size} is not divisible by the {divisor} batch shards of the mesh "
                                   f"(data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}) and "
                                   f"{jax.process_count()} processes")
    chunk = config.train.chunk_size
    if chunk is not None and (config.data.global_batch_size % chunk or chunk % shards):
        raise TrainConfigError(f"train.chunk_size: {chunk} must divide data.global_batch_size="
                               f"{config.data.global_batch_size} and be a multiple of the {shards} batch shards of "
                               f"the mesh (data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
    return mesh


def build_model(config, base):
    """The base model from `base` (HF Mllama dir or our checkpoint) with fresh adapters attached."""
    m = config.model
    cfg = ModelConfig.from_pretrained(base)
    model = model_from_params(cfg, load_params(base, cfg, m.dtype, progress=False), m.dtype, m.remat)
    add_adapters(model, config.adapter, nnx.Rngs(config.seed + 1))
    return cfg, model


def random_base_model(config):
    """(ModelConfig, model) of `model.config` drawn as `model.init` and `model.init_gate` say (no adapters)."""
    m = config.model
    cfg = ModelConfig.from_yaml(m.config)
    return cfg, random_model(cfg, dtype=m.dtype, seed=config.seed, init=m.init, gate=m.init_gate)


def pipeline_config(config, **changes):
    """The pipeline settings `data:` sets, with the run's processor and seed, repeating endlessly."""
    settings = {f.name: getattr(config.data, f.name) for f in dataclasses.fields(PipelineConfig)
                if hasattr(config.data, f.name)}
    return PipelineConfig(**{**settings, "processor_dir": processor_dir(config), "seed": config.seed,
                             "num_epochs": None, **changes})


def pad_token_id(data_config):
    return load_processor(data_config.processor_dir, data_config.bos, data_config.max_length,
                          data_config.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS).pad_token_id


def train_record_sets(config):
    if config.data.train:
        return [RecordSet(e.path, e.weight, e.image_root) if e.tfds is None else
                TfdsRecordSet(e.tfds, e.weight, e.image_root, split=e.split or "train", data_dir=e.data_dir)
                for e in config.data.train]
    return [RecordSet(str(Path(config.data.demo_dir) / "train"))]


def heldout_record_set(config):
    """The held-out record directory: `data.heldout`, else the demo's heldout split, else None."""
    if config.data.heldout is not None:
        return config.data.heldout
    return None if config.data.demo_dir is None else str(Path(config.data.demo_dir) / "heldout")


def plan_steps(config, warn=True):
    """`config` with `train.steps` fixed: given, or `train.epochs` passes over the mixture of `data.train`.

    Warns, with numbers, when the planned examples would read a record set more than once.
    """
    t, batch = config.train, config.data.global_batch_size
    if t.steps is None and t.epochs is None:
        raise TrainConfigError("train.steps / train.epochs: set one of them")
    mixture = open_mixture(train_record_sets(config), config.seed)
    steps = t.steps if t.steps is not None else int(t.epochs * len(mixture)) // batch
    if steps < 1:
        raise TrainConfigError(f"train.epochs: {t.epochs} pass(es) over {len(mixture)} records is less than one "
                               f"global batch of data.global_batch_size={batch}")
    replays = mixture.replays(steps * batch)
    if warn and replays:
        listed = "; ".join(f"{name}: {size} records, about {draws:.0f} draws ({draws / size:.1f}x)"
                           for name, size, draws in replays[:5])
        log.warning("%d of %d record sets repeat within train.steps=%d x data.global_batch_size=%d = %d examples "
                    "(one pass of the mixture is %d examples): %s%s", len(replays), len(mixture.sizes), steps, batch,
                    steps * batch, len(mixture), listed, "; ..." if len(replays) > 5 else "")
    return dataclasses.replace(config, train=dataclasses.replace(t, steps=steps))
