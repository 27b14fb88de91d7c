"""The `mme5 train` config schema: YAML sections as frozen dataclasses, read (with `include` fragments and dotted
overrides) and validated by `mme5_jax.yaml_config`, so errors name the dotted key. Importing this module does not
import JAX.
"""
import dataclasses
import typing

from mme5_jax import yaml_config
from mme5_jax.data.pipeline_config import POLICIES, PipelineConfig
from mme5_jax.model import DTYPES, INITS, REMAT_CHOICES
from mme5_jax.model.lora_config import KINDS, AdapterConfig
from mme5_jax.processing import BOS_MODES


class TrainConfigError(yaml_config.ConfigError):
    """A bad config key or value; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """`path` (HF Mllama dir or our converted checkpoint) gives the base weights; without it the model is
    randomly initialised from `config` (a bundled model config name or YAML path; cross-attention gates at
    `init_gate`; kernels drawn as `init` says, see `mme5_jax.model.init.random_model`), which only makes sense for
    demos."""

    config: str | None = None
    path: str | None = None
    processor_dir: str | None = None
    dtype: str = "float32"
    remat: str = "none"
    init: str = "hf"
    init_gate: float = 1.0


@dataclasses.dataclass(frozen=True)
class RecordSetEntry:
    """`weight: auto` (the default) weighs a set by its record count: one pass reads every record once.

    `path` names a record directory; `tfds` instead names a TFDS dataset, read from `split` (default train)
    in `data_dir` (default TFDS's own), e.g. a record set placed at `data_dir/<name>/1.0.0/`. A bare string entry
    is a `path`.
    """

    SHORTHAND: typing.ClassVar[str] = "path"
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


_PIPELINE = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}


@dataclasses.dataclass(frozen=True)
class DataSection:
    """`demo_dir`: write the demo dataset there on first use; `train`/`heldout` then default to its splits.

    The keys after them are settings of the Grain pipeline (`PipelineConfig`), with its defaults; only
    `global_batch_size`, which the pipeline leaves to its caller, has a default of the trainer's."""

    train: list[RecordSetEntry] = dataclasses.field(default_factory=list)
    heldout: str | None = None
    demo_dir: str | None = None
    global_batch_size: int = 32
    num_negatives: int = _PIPELINE["num_negatives"]
    max_length: int = _PIPELINE["max_length"]
    length_buckets: tuple[int, ...] = _PIPELINE["length_buckets"]
    bos: str = _PIPELINE["bos"]
    num_workers: int = _PIPELINE["num_workers"]
    read_threads: int = _PIPELINE["read_threads"]
    bad_input: str = _PIPELINE["bad_input"]
    image_count_multiple: int = _PIPELINE["image_count_multiple"]


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`epochs` derives `steps` from the real record count of `data.train` (one pass: `epochs: 1`); set one of them.

    `contrastive_group` G: InfoNCE within each group of G consecutive examples of the global batch (each query
    against its group's G positives and its own hard negatives), averaged over all queries; G must divide
    `data.global_batch_size`. None: one InfoNCE over the exact global batch. 16 is mmE5's own setting (2 pairs per
    GPU all-gathered over 8 GPUs).

    `compilation_cache`: keep compiled executables in `output_dir/compile_cache`, so a relaunch (after preemption,
    or a run resumed on the same slice) reads the train step's executable back instead of compiling it again."""

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
    compilation_cache: bool = True


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
    """`example_ids`: also write each step's examples (source and record index, in global batch order; -1 for a
    rejected row) to metrics.jsonl as kind "examples", to audit which data a step saw, across resumes too."""

    every_steps: int = 1
    tensorboard: bool = True
    progress: bool = True
    example_ids: bool = False


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out recall@1 every `every_steps` (0: only before and after training; -1: never), scored as `mme5 eval`
    scores: the first `max_examples` held-out records, each query against all their positives, encoded
    `batch_size` items at a time."""

    every_steps: int = 0
    max_examples: int = 256
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    seed: int = 0
    model: ModelSection = ModelSection()
    adapter: AdapterConfig = AdapterConfig()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()
    distributed: DistributedSection = DistributedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    eval: EvalSection = EvalSection()

    def to_dict(self):
        return dataclasses.asdict(self)


_RULES = yaml_config.Rules(
    choices={"model.dtype": DTYPES, "model.init": INITS, "model.remat": REMAT_CHOICES,
             "adapter.kind": KINDS, "data.bos": BOS_MODES, "data.bad_input": POLICIES,
             "distributed.cpu_collectives": ("gloo", "mpi", "none")},
    positive=frozenset({"adapter.rank", "data.global_batch_size", "data.max_length", "train.steps", "train.epochs",
                        "train.contrastive_group", "train.temperature", "checkpoint.every_steps", "checkpoint.keep",
                        "log.every_steps", "eval.max_examples", "eval.batch_size", "mesh.cpu_devices",
                        "train.chunk_size", "distributed.num_processes", "train.clip_norm",
                        "data.image_count_multiple"}),
    non_negative=frozenset({"train.lr", "train.weight_decay", "train.warmup_ratio", "adapter.dropout",
                            "data.num_workers", "data.num_negatives", "train.max_nonfinite_steps",
                            "distributed.process_id", "adapter.alpha"}))


def load_config(path, overrides=()):
    """The YAML file at `path` (or the bundled config of that name, e.g. `demo`) with dotted `key=value` overrides
    (values parsed as YAML), validated.

    `include` files (given in the file or as an override) are merged underneath the file and its overrides."""
    config = yaml_config.load(path, TrainConfig, overrides, rules=_RULES, error=TrainConfigError)
    if config.model.path is None and config.model.config is None:
        raise TrainConfigError("model.path or model.config must be set")
    if config.model.processor_dir is None and config.model.path is None:
        raise TrainConfigError("model.processor_dir: required when model.path is not set (tokenizer + image processor)")
    if not config.data.train and config.data.demo_dir is None:
        raise TrainConfigError("data.train: no record sets given (or set data.demo_dir)")
    # Here, not at the top: Grain and train_step import JAX, this module must not.
    from mme5_jax.data.mixture import AUTO
    from mme5_jax.train_step import SCHEDULES

    yaml_config.check_choice("train.schedule", config.train.schedule, SCHEDULES, TrainConfigError)
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


def processor_dir(config):
    """The tokenizer + image processor directory: `model.processor_dir`, else the base model's own."""
    return config.model.processor_dir or config.model.path
