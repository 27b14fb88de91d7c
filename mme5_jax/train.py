"""`mme5 train CONFIG.yaml [key=value ...]`: LoRA/DoRA InfoNCE training from a YAML config, resumable.

A run lives in `output_dir`:

    config.yaml            the resolved config (what `mme5 convert jax-to-hf` reads to rebuild the model)
    base/                  the frozen base weights when the model is randomly initialised (tiny demo models)
    checkpoints/<step>/    Orbax: adapters + optimiser state + step + non-finite count, and the Grain
                           iterator state of every process; async, last `checkpoint.keep` kept
    metrics.jsonl          one JSON line per logged step / evaluation
    tensorboard/           the same scalars for TensorBoard
    curves.png             loss and held-out recall@1 over steps

Relaunching the same command resumes from the latest complete checkpoint: Orbax writes each step into a
temporary directory and renames it only when every item of every process is written, so a run killed
mid-save resumes from the checkpoint before. Step metrics are fetched one step late, so the host never
waits for the device before dispatching the next step.
"""
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- config


class TrainConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`path` (HF Mllama dir or our converted checkpoint) gives the base weights; without it the model is
    randomly initialised from `config` (a `configs/model` name or YAML path; cross-attention gates at `init_gate`;
    kernels drawn as `init` says, see `random_base_model`), which only makes sense for demos."""

    config: str | None = None
    path: str | None = None
    processor_dir: str | None = None
    dtype: str = "float32"
    remat: str = "none"
    init: str = "hf"
    init_gate: float = 1.0


@dataclasses.dataclass(frozen=True)
class AdapterSection:
    kind: str = "dora"
    rank: int = 8
    alpha: float = 64.0
    dropout: float = 0.1
    targets: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class RecordSetEntry:
    """`weight: auto` (the default) weighs a set by its record count: one pass reads every record once.

    `path` names a record directory; `tfds` instead names a TFDS dataset, read from `split` (default train)
    in `data_dir` (default TFDS's own), e.g. a record set placed at `data_dir/<name>/1.0.0/`.
    """

    path: str | None = None
    weight: float | str = "auto"
    image_root: str | None = None
    tfds: str | None = None
    split: str | None = None
    data_dir: str | None = None

    def __post_init__(self):
        if (self.path is None) == (self.tfds is None):
            raise TrainConfigError(f"data.train: an entry needs exactly one of 'path' (a record directory) and "
                                   f"'tfds' (a TFDS dataset name), got path={self.path!r}, tfds={self.tfds!r}")
        for key in ("split", "data_dir"):
            if self.path is not None and getattr(self, key) is not None:
                raise TrainConfigError(f"data.train: {key!r} of the entry with path {self.path!r} applies only "
                                       f"to a 'tfds' entry")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """`demo_dir`: write the demo dataset there on first use; `train`/`heldout` then default to its splits."""

    train: list[RecordSetEntry] = dataclasses.field(default_factory=list)
    heldout: str | None = None
    demo_dir: str | None = None
    global_batch_size: int = 32
    num_negatives: int = 3
    max_length: int = 256
    length_buckets: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128, 256])
    bos: str = "processor"
    num_workers: int = 0
    read_threads: int = 2
    bad_input: str = "skip"


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`epochs` derives `steps` from the real record count of `data.train` (one pass: `epochs: 1`); set one of them.

    `contrastive_group` G: InfoNCE within each group of G consecutive examples of the global batch (each query
    against its group's G positives and its own hard negatives), averaged over all queries; G must divide
    `data.global_batch_size`. None: one InfoNCE over the exact global batch. 16 is mmE5's own setting (2 pairs per
    GPU all-gathered over 8 GPUs)."""

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-5
    schedule: str = "mme5"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 5.0
    temperature: float = 0.02
    chunk_size: int | None = None
    contrastive_group: int | None = None
    max_nonfinite_steps: int = 10


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """`cpu_devices`: host devices per process to create when running on CPU (tests, demos); `xla_flags` are
    appended to XLA_FLAGS before JAX starts (e.g. `--xla_backend_optimization_level=0`: 5x faster CPU compiles)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    cpu_devices: int | None = None
    xla_flags: str | None = None


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """Multi-host start-up. With `coordinator_address` (or env `MME5_COORDINATOR_ADDRESS`, `MME5_NUM_PROCESSES`,
    `MME5_PROCESS_ID`) the processes meet there; `auto_detect: true` lets JAX find a TPU pod / SLURM / MPI job."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto_detect: bool = False
    cpu_collectives: str = "gloo"


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogSection:
    every_steps: int = 1
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out recall@1 every `every_steps` (0: only before and after training; -1: never)."""

    every_steps: int = 0
    max_examples: int = 256
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    seed: int = 0
    model: ModelSection = ModelSection()
    adapter: AdapterSection = AdapterSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()
    distributed: DistributedSection = DistributedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    eval: EvalSection = EvalSection()

    def to_dict(self):
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.init": ("hf", "lecun"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "adapter.kind": ("lora", "dora"),
    "data.bos": ("processor", "single"),
    "data.bad_input": ("skip", "raise"),
    "train.schedule": ("mme5", "cosine", "linear", "constant"),
    "distributed.cpu_collectives": ("gloo", "mpi", "none"),
}
_POSITIVE = {"adapter.rank", "data.global_batch_size", "data.max_length", "train.steps", "train.epochs",
             "train.contrastive_group",
             "train.temperature",
             "checkpoint.every_steps", "checkpoint.keep", "log.every_steps", "eval.max_examples", "eval.batch_size",
             "mesh.cpu_devices", "train.chunk_size", "distributed.num_processes", "train.clip_norm"}
_NON_NEGATIVE = {"train.lr", "train.weight_decay", "train.warmup_ratio", "adapter.dropout", "data.num_workers",
                 "data.num_negatives", "train.max_nonfinite_steps", "distributed.process_id", "adapter.alpha"}


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp)


def _check_value(value, tp, key):
    """`value` converted to type `tp` (ints are fine as floats), or TrainConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for candidate in inner[:-1]:
            try:
                return _check_value(value, candidate, key)
            except TrainConfigError:
                pass
        return _check_value(value, inner[-1], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if tp is RecordSetEntry and isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict):
            raise TrainConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TrainConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise TrainConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
    if key in _POSITIVE and value <= 0:
        raise TrainConfigError(f"{key}: must be > 0, got {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        raise TrainConfigError(f"{key}: must be >= 0, got {value!r}")
    return value


def _build(cls, values, prefix=""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in values:
        if name not in fields:
            key = f"{prefix}.{name}" if prefix else name
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise TrainConfigError(f"unknown config key {key!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _check_value(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TrainConfigError(f"missing required config key {key!r}")
    return cls(**kwargs)


def _apply_override(tree, override):
    if "=" not in override:
        raise TrainConfigError(f"override {override!r} is not of the form key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{key}: cannot parse value {text!r}: {err}") from None
    parts = key.split(".")
    node, cls = tree, TrainConfig
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            prefix = ".".join(parts[:depth])
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise TrainConfigError(f"unknown config key {key!r}{hint}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        hint = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(hint):
            raise TrainConfigError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])} has no sub-keys")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, cls = node[part], hint


def _deep_merge(base, top):
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) \
            if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _as_list(value):
    return [] if value is None else value if isinstance(value, list) else [value]


def _resolve_includes(tree, directory):
    """`include: [FILE, ...]`: config fragments (e.g. configs/mesh/*.yaml) under this file's own keys."""
    includes = _as_list(tree.pop("include", None))
    if not all(isinstance(name, str) for name in includes):
        raise TrainConfigError(f"include: expected a list of YAML files, got {includes!r}")
    base = {}
    for name in includes:
        path = Path(name) if Path(name).exists() else directory / name
        try:
            fragment = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"include: {name!r} not found") from None
        if not isinstance(fragment, dict):
            raise TrainConfigError(f"include: {name!r} is not a mapping")
        base = _deep_merge(base, _resolve_includes(fragment, path.parent))
    return _deep_merge(base, tree)


def load_config(path, overrides=()):
    """The YAML file at `path` with dotted `key=value` overrides (values parsed as YAML), validated.

    `include` files (given in the file or as an override) are merged underneath the file and its overrides."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise TrainConfigError(f"config file {path!r} not found") from None
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping")
    for override in overrides:
        if override.split("=", 1)[0] == "include":
            extra = yaml.safe_load(override.split("=", 1)[1])
            tree["include"] = _as_list(tree.get("include")) + _as_list(extra)
        else:
            _apply_override(tree, override)
    tree = _resolve_includes(tree, Path(path).parent)
    config = _build(TrainConfig, tree)
    if config.model.path is None and config.model.config is None:
        raise TrainConfigError("model.path or model.config must be set")
    if config.model.processor_dir is None and config.model.path is None:
        raise TrainConfigError("model.processor_dir: required when model.path is not set (tokenizer + image processor)")
    if not config.data.train and config.data.demo_dir is None:
        raise TrainConfigError("data.train: no record sets given (or set data.demo_dir)")
    from mme5_jax.data.pipeline import AUTO

    for i, entry in enumerate(config.data.train):
        if entry.weight != AUTO and (isinstance(entry.weight, str) or entry.weight <= 0):
            raise TrainConfigError(f"data.train[{i}].weight: must be > 0 or {AUTO!r}, got {entry.weight!r}")
    group, batch_size = config.train.contrastive_group, config.data.global_batch_size
    if group is not None and batch_size % group:
        raise TrainConfigError(f"train.contrastive_group: must divide data.global_batch_size={batch_size}, got "
                               f"{group}")
    if config.train.steps is not None and config.train.epochs is not None:
        raise TrainConfigError("train.steps / train.epochs: set one of them, not both (epochs derives the step count "
                               "from the records in data.train)")
    if config.distributed.process_id is not None and config.distributed.num_processes is not None \
            and config.distributed.process_id >= config.distributed.num_processes:
        raise TrainConfigError(f"distributed.process_id: {config.distributed.process_id} is not below "
                               f"distributed.num_processes={config.distributed.num_processes}")
    return config


# ----------------------------------------------------------------------------------------------- start-up


def start_jax(config):
    """Set the CPU device count and join the other processes, before anything touches a JAX backend."""
    import jax
    from jax._src import xla_bridge

    mesh_cfg, dist = config.mesh, config.distributed
    if not xla_bridge.backends_are_initialized():
        if mesh_cfg.xla_flags:
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {mesh_cfg.xla_flags}".strip()
        if mesh_cfg.cpu_devices:
            jax.config.update("jax_num_cpu_devices", mesh_cfg.cpu_devices)
        if dist.cpu_collectives != "none":
            jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
        address = dist.coordinator_address or os.environ.get("MME5_COORDINATOR_ADDRESS")
        if address:
            num_processes = dist.num_processes or _env_int("MME5_NUM_PROCESSES", "distributed.num_processes")
            process_id = dist.process_id if dist.process_id is not None else \
                _env_int("MME5_PROCESS_ID", "distributed.process_id")
            jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
        elif dist.auto_detect:
            jax.distributed.initialize()
    if mesh_cfg.cpu_devices and jax.default_backend() == "cpu" and jax.local_device_count() != mesh_cfg.cpu_devices:
        raise TrainConfigError(f"mesh.cpu_devices: {mesh_cfg.cpu_devices} asked for, but JAX already started with "
                               f"{jax.local_device_count()} CPU devices in this process")
    return jax


def _env_int(name, key):
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise TrainConfigError(f"{key}: needed with a coordinator address; set it or the environment variable "
                               f"{name} (got {os.environ.get(name)!r})") from None


def ensure_demo_inputs(config):
    """Write the demo dataset / processor directory named in the config when they do not exist yet."""
    import jax

    from mme5_jax.processing import has_image_processor_config

    data = config.data
    if data.demo_dir is not None and not (Path(data.demo_dir) / "heldout" / "summary.json").is_file():
        if jax.process_index() == 0:
            from mme5_jax.data.demo import build_demo_dataset

            log.info("writing the demo dataset to %s (first use)", data.demo_dir)
            build_demo_dataset(data.demo_dir, photos=False)
        _sync("mme5-demo-data")
    processor_dir = config.model.processor_dir
    if processor_dir is not None and not has_image_processor_config(processor_dir):
        if config.model.path is not None:
            raise TrainConfigError(f"model.processor_dir: {processor_dir!r} has neither preprocessor_config.json nor "
                                   "an 'image_processor' section in processor_config.json")
        if jax.process_index() == 0:
            from mme5_jax.config import ModelConfig
            from mme5_jax.llama3_processor import write_processor_dir

            vision = ModelConfig.from_yaml(config.model.config).vision
            try:
                write_processor_dir(processor_dir, vision.image_size, vision.max_num_tiles)
            except ImportError as error:
                raise TrainConfigError(f"model.processor_dir: {processor_dir!r} does not exist, and {error}") from None
        _sync("mme5-demo-processor")


def _sync(name):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------- the run


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient (each one was skipped)."""


def build_model(config, base):
    """The base model from `base` (HF Mllama dir or our checkpoint) with fresh adapters attached."""
    from flax import nnx

    from mme5_jax.config import ModelConfig
    from mme5_jax.embedder import load_params
    from mme5_jax.model.lora import add_adapters
    from mme5_jax.model.mllama import model_from_params

    m = config.model
    cfg = ModelConfig.from_pretrained(base)
    model = model_from_params(cfg, load_params(base, cfg, m.dtype, progress=False), m.dtype, m.remat)
    add_adapters(model, adapter_config(config.adapter), nnx.Rngs(config.seed + 1))
    return cfg, model


def random_base_model(config):
    """`model.config` randomly initialised, with the cross-attention gates at `model.init_gate`: HF's init closes
    them (tanh(0) = 0), which would leave a frozen random model blind to images (gates are not adapted).

    `model.init: lecun` redraws every kernel at std 1/sqrt(fan_in) and the token embeddings at std 1. HF's
    std 0.02 suits 4096-wide layers; in a 32- to 128-wide demo model each projection then shrinks its input 3-9x,
    so almost nothing of the image or the earlier tokens reaches the pooled last token (same text with different
    images: embedding cosine 0.9999), and adapters on that frozen base barely learn.
    """
    import jax
    from flax import nnx

    from mme5_jax.config import ModelConfig
    from mme5_jax.model.mllama import MllamaModel

    m = config.model
    cfg = ModelConfig.from_yaml(m.config)
    model = MllamaModel(cfg, dtype=m.dtype, rngs=nnx.Rngs(config.seed))
    key = jax.random.key(config.seed)
    for index, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model))):
        if path[-1] in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
            variable.set_value(np.full(variable.shape, m.init_gate, variable.dtype))
        elif m.init == "lecun" and path[-1] in ("kernel", "embed_tokens"):
            std = 1.0 if path[-1] == "embed_tokens" else 1.0 / math.sqrt(variable.shape[-2])
            noise = jax.random.normal(jax.random.fold_in(key, index), variable.shape, jax.numpy.float32)
            variable.set_value((std * noise).astype(variable.dtype))
    return cfg, model


def adapter_config(section):
    from mme5_jax.model.lora import AdapterConfig

    extra = {} if section.targets is None else {"targets": tuple(section.targets)}
    return AdapterConfig(kind=section.kind, rank=section.rank, alpha=section.alpha, dropout=section.dropout, **extra)


def processor_dir(config):
    return config.model.processor_dir or config.model.path


def pipeline_config(config, **changes):
    from mme5_jax.data.pipeline import PipelineConfig

    d = config.data
    settings = dict(processor_dir=processor_dir(config), global_batch_size=d.global_batch_size,
                    num_negatives=d.num_negatives, max_length=d.max_length, length_buckets=tuple(d.length_buckets),
                    bos=d.bos, seed=config.seed, num_epochs=None, num_workers=d.num_workers,
                    read_threads=d.read_threads, bad_input=d.bad_input)
    return PipelineConfig(**{**settings, **changes})


def train_record_sets(config):
    from mme5_jax.data.pipeline import RecordSet
    from mme5_jax.data.tfds_source import TfdsRecordSet

    if config.data.train:
        return [RecordSet(e.path, e.weight, e.image_root) if e.tfds is None else
                TfdsRecordSet(e.tfds, e.weight, e.image_root, split=e.split or "train", data_dir=e.data_dir)
                for e in config.data.train]
    return [RecordSet(str(Path(config.data.demo_dir) / "train"))]


def heldout_record_set(config):
    if config.data.heldout is not None:
        return config.data.heldout
    return None if config.data.demo_dir is None else str(Path(config.data.demo_dir) / "heldout")


def plan_steps(config, warn=True):
    """`config` with `train.steps` fixed: given, or `train.epochs` passes over the mixture of `data.train`.

    Warns, with numbers, when the planned examples would read a record set more than once.
    """
    from mme5_jax.data.pipeline import open_mixture

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


class RunCheckpoints:
    """Orbax checkpoints of a run: the trainable part of the TrainState plus every process's Grain iterator state.

    The frozen base weights are not saved here (they come from `model.path`, or `base/` for random-init models).
    """

    def __init__(self, directory, section):
        import orbax.checkpoint as ocp

        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=section.keep, create=True,
                                                 enable_async_checkpointing=section.async_save,
                                                 cleanup_tmp_directories=True))

    @staticmethod
    def persistent(state):
        return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
                "nan_skips": state.nan_skips}

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, iterator):
        import grain
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.persistent(state)),
                                                        data=grain.checkpoint.CheckpointSave(iterator)))

    def restore(self, step, state, iterator):
        """`state` with its trainable part replaced from checkpoint `step`, laid out like `state` (any mesh)."""
        import grain
        import jax
        import orbax.checkpoint as ocp

        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              self.persistent(state))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(iterator)))
        return dataclasses.replace(state, **restored["state"])

    def finish(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_adapters(config, directory, model, step=None):
    """Load the adapters of checkpoint `step` (default: the latest complete one) into `model`; returns the step.

    Only the `trainable` part of the saved state is read, onto the devices the model's arrays live on.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from mme5_jax.model.lora import LoRAParam

    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, LoRAParam))
    target = {}
    for path, leaf in leaves:  # the saved tree's string keys, e.g. [...]['adapter']['lora_a']['value']
        node = target
        for key in path[:-1]:
            node = node.setdefault(_key_name(key), {})
        node[_key_name(path[-1])] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    item = {"trainable": target}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]["trainable"]
    manager.close()
    values = []
    for path, _ in leaves:
        node = restored
        for key in path:
            node = node[_key_name(key)]
        values.append(node)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, values))
    return step


def _key_name(key):
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


class MetricsLog:
    """Scalars to metrics.jsonl, TensorBoard and the console; only process 0 writes."""

    def __init__(self, output_dir, section, primary):
        self.primary = primary
        self.jsonl = self.writer = None
        if primary:
            self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8")
            if section.tensorboard:
                from tensorboard.summary import Writer

                self.writer = Writer(str(Path(output_dir) / "tensorboard"))

    def write(self, step, kind, values):
        if not self.primary:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
            self.writer.flush()

    def close(self):
        if self.primary:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(output_dir):
    """The records of metrics.jsonl; a resumed run's repeated steps keep their latest value."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    latest = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["kind"], r["step"]))


def plot_curves(output_dir):
    """curves.png: training loss and in-batch accuracy, and held-out recall@1, over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    train = [r for r in records if r["kind"] == "train"]
    heldout = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="loss", lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("InfoNCE loss")
    twin = axes[0].twinx()
    twin.plot([r["step"] for r in train], [r["accuracy"] for r in train], color="tab:orange", lw=1,
              label="in-batch accuracy")
    twin.set_ylabel("in-batch accuracy")
    axes[1].plot([r["step"] for r in heldout], [r["recall@1"] for r in heldout], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("held-out recall@1")
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(Path(output_dir) / "curves.png", dpi=100)
    plt.close(fig)


def _content_keys(group):
    """One int64 per row that is equal exactly when two rows have the same tokens and pixels."""
    import hashlib

    mask = group["attention_mask"].astype(bool)
    keys = []
    for row in range(mask.shape[0]):
        digest = hashlib.blake2b(group["input_ids"][row][mask[row]].tobytes(), digest_size=8)
        if "pixel_values" in group:
            digest.update(np.ascontiguousarray(group["pixel_values"][row]).tobytes())
        keys.append(np.frombuffer(digest.digest(), dtype=np.int64)[0])
    return np.array(keys, dtype=np.int64)


class HeldoutRecall:
    """recall@1 of queries against the positives of the first `eval.max_examples` held-out examples.

    Candidates with identical content (same tokens and pixels, e.g. two "red" answers) count as one, so a tie
    between copies of the right answer is not a miss.
    """

    def __init__(self, config, mesh, graphdef, record_set, pad_token_id):
        from mme5_jax.train_step import embed_fn

        self.config, self.mesh, self.record_set, self.pad_token_id = config, mesh, record_set, pad_token_id
        self.embed = embed_fn(graphdef)

    def __call__(self, state):
        import jax
        from jax.experimental import multihost_utils

        from mme5_jax.data.pipeline import make_dataset, to_global_batch

        section = self.config.eval
        dataset = make_dataset(pipeline_config(self.config, global_batch_size=section.batch_size, num_epochs=1,
                                               num_workers=0, seed=0),
                               [self.record_set], jax.process_index(), jax.process_count())
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        queries, positives, keys, seen = [], [], [], 0
        for host_batch in dataset:
            if seen >= section.max_examples:
                break
            batch = to_global_batch(host_batch, self.mesh, self.pad_token_id)
            local_keys = _content_keys(host_batch["positive"])
            for out, group in ((queries, "query"), (positives, "positive")):
                out.append(multihost_utils.process_allgather(
                    self.embed(state.trainable, state.frozen, batch[group]), tiled=True))
            keys.append(multihost_utils.process_allgather(
                jax.make_array_from_process_local_data(sharding, local_keys), tiled=True))
            seen += section.batch_size
        if not queries:
            raise TrainConfigError(f"eval.batch_size: {section.batch_size} is more than the held-out set "
                                   f"{self.record_set} holds")
        return recall_at_1(np.concatenate(queries), np.concatenate(positives), np.concatenate(keys))


def recall_at_1(queries, positives, keys):
    """Fraction of queries whose most similar distinct candidate is their own positive."""
    unique_keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    scores = queries.astype(np.float32) @ positives[first].astype(np.float32).T
    hits = scores.argmax(axis=1) == inverse.reshape(-1)
    return {"recall@1": float(hits.mean()), "num_queries": int(len(queries)), "num_candidates": int(len(first))}


def _tokens(host_batch):
    return int(sum(host_batch[g]["attention_mask"].sum() for g in ("query", "positive", "negatives")))


def save_random_base(config, output_dir):
    """Write a randomly initialised base model to `output_dir/base` once; every launch (and the export) then
    loads it from there, so a relaunched run starts from exactly the same weights."""
    import jax
    from flax import nnx

    from mme5_jax import checkpoint as base_ckpt
    from mme5_jax.hf_weights import LM_HEAD_KEY

    target = Path(output_dir) / "base"
    if base_ckpt.is_checkpoint(str(target)):
        return str(target)
    cfg, model = random_base_model(config)
    with base_ckpt.AtomicDir(str(target)) as tmp:
        writer = base_ckpt.WeightsWriter(tmp)
        for path, value in nnx.to_flat_state(nnx.state(model)):
            writer.add("params", base_ckpt.param_key(path), jax.device_get(value.get_value()))
        # No LM head is needed for embeddings; a zero one makes the exported HF model load without missing keys.
        writer.add("extras", LM_HEAD_KEY, np.zeros((cfg.text.vocab_size, cfg.text.hidden_size), np.dtype(
            jax.numpy.dtype(config.model.dtype))))
        entries = writer.close()
        base_ckpt.write_metadata(tmp, cfg, config.model.dtype, {"random_init": True, "seed": config.seed}, entries)
        if jax.process_index() == 0:
            base_ckpt.copy_side_files(processor_dir(config), tmp)
    return str(target)


def train(config):
    """Run (or resume) training as configured; returns a summary of the final state."""
    jax = start_jax(config)
    from tqdm import tqdm

    from mme5_jax.data.pipeline import make_dataset, problem_report, to_global_batch
    from mme5_jax.sharding import make_mesh
    from mme5_jax.train_step import init_train_state, make_optimizer, make_schedule, make_train_step

    primary = jax.process_index() == 0
    output_dir = Path(config.output_dir)
    ensure_demo_inputs(config)
    config = plan_steps(config, warn=primary)
    if primary:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    t = config.train
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    for key, size in (("data.global_batch_size", config.data.global_batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
        divisor = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
        if size % divisor:
            raise TrainConfigError(f"{key}: {size} is not divisible by the {divisor} batch shards of the mesh "
                                   f"(data x fsdp) and processes")

    cfg, model = build_model(config, config.model.path or save_random_base(config, output_dir))
    optimizer = make_optimizer(make_schedule(t.schedule, t.lr, t.steps, t.warmup_ratio), weight_decay=t.weight_decay,
                               b1=t.b1, b2=t.b2, eps=t.eps, clip_norm=t.clip_norm)
    graphdef, state = init_train_state(model, optimizer, mesh)
    del model
    step_fn = make_train_step(graphdef, optimizer, mesh, temperature=t.temperature, chunk_size=t.chunk_size,
                              contrastive_group=t.contrastive_group)

    data_config = pipeline_config(config)
    iterator = iter(make_dataset(data_config, train_record_sets(config), jax.process_index(), jax.process_count()))
    pad_token_id = _pad_token_id(data_config)
    checkpoints = RunCheckpoints(output_dir / "checkpoints", config.checkpoint)
    start = checkpoints.latest_step()
    if start is not None:
        state = checkpoints.restore(start, state, iterator)
        log.info("resumed from step %d", start)
    start = start or 0

    heldout = heldout_record_set(config)
    evaluate = None if heldout is None or config.eval.every_steps < 0 else \
        HeldoutRecall(config, mesh, graphdef, heldout, pad_token_id)
    metrics_log = MetricsLog(output_dir, config.log, primary)
    base_key = jax.random.key(config.seed)
    nonfinite = int(jax.device_get(state.nan_skips))
    progress = tqdm(total=t.steps, initial=start, desc="train", unit="step",
                    disable=not (primary and config.log.progress))
    summary = {"start_step": start}

    def run_eval(step):
        results = evaluate(state)
        metrics_log.write(step, "eval", results)
        progress.write(f"step {step}: held-out recall@1 {results['recall@1']:.3f} "
                       f"({results['num_queries']} queries, {results['num_candidates']} candidates)")
        summary.setdefault("eval", []).append({"step": step, **results})

    pending, last_ready = None, time.perf_counter()

    def report(entry):
        nonlocal nonfinite, last_ready
        step, metrics, tokens = entry
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        seconds, last_ready = now - last_ready, now
        values["examples_per_s"] = config.data.global_batch_size / seconds
        values["tokens_per_s_per_chip"] = tokens / seconds / jax.local_device_count()
        if values.get("skipped"):
            nonfinite += 1
            progress.write(f"step {step}: non-finite loss or gradient, update skipped ({nonfinite} so far)")
        values["nonfinite_steps"] = nonfinite
        if (step + 1) % config.log.every_steps == 0 or step + 1 == t.steps:
            metrics_log.write(step + 1, "train", values)
        progress.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}", refresh=False)
        progress.update(1)
        summary["last"] = values
        if nonfinite >= t.max_nonfinite_steps:
            raise NonFiniteLossError(f"stopping at step {step + 1}: {nonfinite} steps had a non-finite loss or "
                                     f"gradient (train.max_nonfinite_steps={t.max_nonfinite_steps})")

    try:
        if evaluate is not None and start == 0:
            run_eval(0)
        for step in range(start, t.steps):
            host_batch = next(iterator)
            batch = to_global_batch(host_batch, mesh, pad_token_id)
            state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
            if pending is not None:
                report(pending)
            pending = (step, metrics, _tokens(host_batch))
            done = step + 1
            if done % config.checkpoint.every_steps == 0 or done == t.steps:
                checkpoints.save(done, state, iterator)
            if evaluate is not None and (done == t.steps or (config.eval.every_steps > 0
                                                             and done % config.eval.every_steps == 0)):
                report(pending)
                pending = None
                run_eval(done)
        if pending is not None:
            report(pending)
    finally:
        progress.close()
        checkpoints.finish()
        metrics_log.close()
    if primary:
        plot_curves(output_dir)
    summary.update(step=int(jax.device_get(state.step)), nonfinite_steps=nonfinite, data=problem_report(iterator),
                   state=state)
    return summary


def _pad_token_id(data_config):
    from mme5_jax.data.pipeline import load_processor
    from mme5_jax.processing import DEFAULT_MAX_IMAGE_PIXELS

    return load_processor(data_config.processor_dir, data_config.bos, data_config.max_length,
                          data_config.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS).pad_token_id


def add_arguments(parser):
    parser.description = ("Train LoRA/DoRA adapters with InfoNCE from a YAML config; relaunching the same command "
                           "resumes from the latest checkpoint in output_dir.")
    parser.add_argument("config", metavar="CONFIG.yaml", help="training config (see configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, values parsed as YAML, e.g. train.steps=100 model.dtype=bfloat16")


def run(args):
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mme5_jax").setLevel(logging.INFO)
    try:
        config = load_config(args.config, args.overrides)
        summary = train(config)
    except (TrainConfigError, NonFiniteLossError) as err:
        print(f"mme5 train: error: {err}", file=sys.stderr)
        return 2
    print(f"finished at step {summary['step']}; checkpoints in {Path(config.output_dir) / 'checkpoints'}")
    return 0
