"""What a plan compiles, read from a training config (`mme5 train`'s) or a bench config (`mme5 bench`'s).

Both reduce to one `Workload`: the model, its dtype and remat, the adapters, the step's settings, the mesh axes,
and the global batch as the step sees it. A training config's batch has the Grain pipeline's layout: every slot
(query, positive, k negatives) padded to `data.max_length`, so they share one model call, and the real images
packed per device and GradCache chunk at `max_num_tiles` tiles. How many images there are is data: the plan takes
the shares of queries and of targets that carry an image (`image_shares`), by default those of mmE5's synthetic
mix. A bench config's batch is its synthetic one (each group at its own length and tiles).
"""
import dataclasses
import math
import os

from mme5_jax import yaml_config
from mme5_jax.configs import config_path
from mme5_jax.model.lora_config import AdapterConfig

# mmE5's synthetic mix: classification : VQA : retrieval = 1 : 1 : 2, retrieval's 7 modality pairs alike. Queries
# carry an image in classification (I, IT), VQA (IT) and 5 of 7 retrieval pairs: 1/4 + 1/4 + 5/14 = 6/7. Targets
# (and their hard negatives) in 5 of 7 retrieval pairs (T->IT, T->I, I->I, IT->I, IT->IT): 5/14.
MME5_IMAGE_SHARES = (6 / 7, 5 / 14)


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str                      # "train" | "bench": which config it came from
    model: object                  # ModelConfig
    dtype: str
    remat: str
    adapter: AdapterConfig
    mesh: dict                     # {"data", "fsdp", "tensor"}; data -1 takes the remaining chips
    pairs: int                     # global batch: (query, positive) pairs per step
    negatives: int
    chunk_size: int | None
    contrastive_group: int | None
    temperature: float
    optimizer: dict                # make_optimizer's arguments besides the schedule
    lr: float
    batch: dict                    # bench: the bench config's `batch` section; train: {"length", "tiles"}
    embed_rows: int                # rows of one `mme5 eval` / `mme5 embed` batch
    config: dict                   # the resolved config, as plan.json records it
    image_shares: tuple = MME5_IMAGE_SHARES  # train: shares of queries and of targets with an image

    def images_per_example(self) -> float:
        query, target = self.image_shares
        return query + target * (1 + self.negatives)

    def chunks(self) -> int:
        """GradCache chunks per step (1 without GradCache)."""
        return 1 if self.chunk_size is None else self.pairs // self.chunk_size

    def images_per_cell(self, shards: int) -> int:
        """Packed images per device and GradCache chunk (the pipeline's M): the cell's expected real images,
        rounded up to `data.image_count_multiple`."""
        expected = math.ceil(self.pairs // (shards * self.chunks()) * self.images_per_example())
        multiple = self.batch["image_multiple"]
        return -(-expected // multiple) * multiple

    def with_pairs(self, pairs):
        return dataclasses.replace(self, pairs=pairs)

    def with_chunk(self, chunk_size):
        return dataclasses.replace(self, chunk_size=chunk_size)

    def with_image_shares(self, shares):
        return dataclasses.replace(self, image_shares=tuple(shares))


def is_bench_config(name: str) -> bool:
    """A bench config has a `batch` section; a bare name is a bench config when no training config has it."""
    if os.path.isfile(name):
        return "batch" in yaml_config.read_yaml(name)
    try:
        config_path(name)
        return False
    except FileNotFoundError:
        return True


def load_workload(name: str, overrides=()) -> Workload:
    return _from_bench(name, overrides) if is_bench_config(name) else _from_train(name, overrides)


def _from_bench(name, overrides):
    from mme5_jax.bench.runner import load_config, model_config

    config = load_config(name, overrides)
    b, t, m = config["batch"], config["train"], config["mesh"]
    return Workload(kind="bench", model=model_config(config), dtype=config["dtype"], remat=config["remat"],
                    adapter=AdapterConfig(**config["adapter"]),
                    mesh={"data": m["data"], "fsdp": m["fsdp"], "tensor": m["tensor"]}, pairs=b["pairs"],
                    negatives=b["negatives"], chunk_size=t["chunk_size"], contrastive_group=None,
                    temperature=t["temperature"], optimizer={"weight_decay": t["weight_decay"]}, lr=t["lr"],
                    batch=dict(b), embed_rows=b["pairs"], config=config)


def _from_train(name, overrides):
    from mme5_jax.config import ModelConfig
    from mme5_jax.train.config import TrainConfigError, load_config

    config = load_config(name, overrides)
    m, t, d = config.model, config.train, config.data
    if m.config is not None:
        cfg = ModelConfig.from_yaml(m.config)
    elif os.path.isfile(os.path.join(m.path, "config.json")):
        cfg = ModelConfig.from_pretrained(m.path)
    else:
        raise TrainConfigError(f"model.path: {m.path!r} has no config.json to read the architecture from; on a "
                               f"host without the weights name it, e.g. model.config=llama-3.2-11b-vision")
    return Workload(kind="train", model=cfg, dtype=m.dtype, remat=m.remat, adapter=config.adapter,
                    mesh={"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor},
                    pairs=d.global_batch_size, negatives=d.num_negatives, chunk_size=t.chunk_size,
                    contrastive_group=t.contrastive_group, temperature=t.temperature,
                    optimizer={"weight_decay": t.weight_decay, "b1": t.b1, "b2": t.b2, "eps": t.eps,
                               "clip_norm": t.clip_norm},
                    lr=t.lr, batch={"length": d.max_length, "tiles": cfg.vision.max_num_tiles,
                                    "image_multiple": d.image_count_multiple},
                    embed_rows=config.eval.batch_size, config=config.to_dict())


def flops_calls(work: Workload):
    """The step's model calls for mme5_jax.bench.flops.step_flops."""
    from mme5_jax.bench.flops import Encode
    from mme5_jax.bench.runner import flops_calls as bench_calls

    if work.kind == "bench":
        return bench_calls(work.config | {"batch": {**work.batch, "pairs": work.pairs}}, work.model)
    rows = work.pairs * (2 + work.negatives)
    images = round(work.pairs * work.images_per_example())
    return [Encode(rows, work.batch["length"], work.batch["tiles"], images=images)]


def embed_call(work: Workload, rows: int):
    """The model call of one embedding batch: the longest bucket, with an image."""
    from mme5_jax.bench.flops import Encode

    if work.kind == "bench":
        return Encode(rows, work.batch["query_tokens"], work.batch["query_tiles"])
    return Encode(rows, work.batch["length"], work.batch["tiles"])
