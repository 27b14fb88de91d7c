"""Compile the real train step (or the embedding forward) for a TPU topology, from shapes alone.

The model, adapters and optimiser state are `jax.eval_shape` structures placed with the shardings the trainer
uses; the batch has the step's layout. Nothing is materialised, so an 11B plan runs on any host with libtpu.
Attention is traced for the TPU (`layers.target_platform`), so the program is the one the chips would run.
"""
import dataclasses
import sys
import threading
import time

from mme5_jax.plan.topology import Topology, abstract_devices
from mme5_jax.plan.workload import Workload


class PlanError(ValueError):
    """A plan that cannot be made as asked; the message says which setting to change."""


class MeshError(PlanError):
    """The config's mesh does not cover the topology's chips, or the batch does not split over it."""


@dataclasses.dataclass
class Compiled:
    compiled: object
    mesh: object
    compile_s: float
    argument_bytes_expected: int
    attention_kernels: dict


def make_mesh(work: Workload, topology: Topology, devices):
    from mme5_jax.sharding import make_mesh as sharding_mesh

    m = work.mesh
    fixed = m["fsdp"] * m["tensor"]
    data = m["data"] if m["data"] != -1 else topology.chips // fixed
    if data * fixed != topology.chips:
        raise MeshError(f"mesh data={m['data']} x fsdp={m['fsdp']} x tensor={m['tensor']} needs {data * fixed} "
                        f"chips, topology {topology.name} has {topology.chips}; pick a mesh file that matches "
                        f"(include=mesh/...) or set mesh.data/mesh.fsdp")
    return sharding_mesh(data, m["fsdp"], m["tensor"], devices=devices)


def _abstract_model(work: Workload, adapters: bool):
    from flax import nnx

    from mme5_jax.model import lora
    from mme5_jax.model.mllama import MllamaModel

    def build():
        model = MllamaModel(work.model, dtype=work.dtype, rngs=nnx.Rngs(0), remat=work.remat)
        if adapters:
            lora.add_adapters(model, work.adapter, nnx.Rngs(1))
        return model

    return nnx.eval_shape(build)


def _slot(work: Workload, *lead, pixels=True):
    """One slot group's arrays as the pipeline gives them: text at the longest bucket; `pixels`: one image per row
    (the embedder's layout), else an `image_index` into the packed images (the train step's)."""
    import jax
    import jax.numpy as jnp

    length, tiles, v = work.batch["length"], work.batch["tiles"], work.model.vision
    s = jax.ShapeDtypeStruct
    out = {"input_ids": s((*lead, length), jnp.int32), "attention_mask": s((*lead, length), jnp.int32),
           "cross_attention_mask": s((*lead, length, 1, tiles), jnp.int32), "has_image": s(lead, jnp.bool_)}
    if pixels:
        out.update(pixel_values=s((*lead, 1, tiles, v.num_channels, v.image_size, v.image_size), jnp.float32),
                   aspect_ratio_ids=s((*lead, 1), jnp.int32), aspect_ratio_mask=s((*lead, 1, tiles), jnp.int32))
    else:
        out["image_index"] = s(lead, jnp.int32)
    return out


def _images(work: Workload, chunks: int, count: int, tiles: int):
    import jax
    import jax.numpy as jnp

    v, s = work.model.vision, jax.ShapeDtypeStruct
    return {"pixel_values": s((chunks, count, tiles, v.num_channels, v.image_size, v.image_size), jnp.float32),
            "aspect_ratio_ids": s((chunks, count), jnp.int32), "row_id": s((chunks, count), jnp.int32),
            "aspect_ratio_mask": s((chunks, count, tiles), jnp.int32)}


def _bench_batch(work: Workload):
    """The bench config's synthetic batch, built for one pair and widened to `pairs` as shapes (its rows are
    alike, so every device and chunk holds the same number of images)."""
    import jax

    from mme5_jax.bench.runner import synthetic_batch

    one = synthetic_batch(work.config | {"batch": {**work.batch, "pairs": 1}}, work.model)
    images = one.pop("images", None)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((work.pairs, *a.shape[1:]), a.dtype), one)
    if images is not None:
        per_row = images["row_id"].shape[1]
        batch["images"] = _images(work, work.chunks(), per_row * work.pairs // work.chunks(),
                                  images["pixel_values"].shape[2])
    return batch


def train_batch(work: Workload, shards: int):
    """The global batch the step sees on `shards` batch shards, as shapes."""
    import jax
    import jax.numpy as jnp

    if work.kind == "bench":
        return _bench_batch(work)
    b, k = work.pairs, work.negatives
    batch = {"query": _slot(work, b, pixels=False), "positive": _slot(work, b, pixels=False),
             "row_index": jax.ShapeDtypeStruct((b,), jnp.int32),
             "images": _images(work, work.chunks(), shards * work.images_per_cell(shards), work.batch["tiles"])}
    if k:
        batch.update(negatives=_slot(work, b, k, pixels=False), negative_mask=jax.ShapeDtypeStruct((b, k), jnp.bool_))
    return batch


def embed_batch(work: Workload, rows: int):
    """One embedding batch: `rows` items at the longest bucket with an image (bench: the query group's shape)."""
    import jax

    from mme5_jax.bench.runner import synthetic_rows

    if work.kind == "bench":
        one = synthetic_rows(work.config | {"batch": {**work.batch, "pairs": 1}}, work.model)["query"]
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype), one)
    return _slot(work, rows)


def _shard_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def lower_train(work: Workload, mesh):
    """-> (Lowered, expected argument bytes per chip) of the trainer's step on `mesh`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mme5_jax.model import lora
    from mme5_jax.model.layers import target_platform
    from mme5_jax.sharding import batch_divisor
    from mme5_jax.train_step import BATCH_KEYS, TrainState, TrainStep, batch_shardings, make_optimizer, \
        train_state_shardings

    optimizer = make_optimizer(lambda step: jnp.float32(work.lr), **work.optimizer)
    graphdef, trainable, frozen = nnx.split(_abstract_model(work, adapters=True), lora.LoRAParam, ...)
    zero = jnp.zeros((), jnp.int32)
    state = jax.eval_shape(lambda t, f: TrainState(zero, t, optimizer.init(t), f, zero), trainable, frozen)
    state = _place(state, train_state_shardings(state, mesh))
    step = TrainStep(graphdef, optimizer, mesh, temperature=work.temperature, chunk_size=work.chunk_size,
                     contrastive_group=work.contrastive_group)
    batch = train_batch(work, batch_divisor(mesh))
    shardings = batch_shardings(batch, mesh)
    batch = _place(batch, jax.tree.map(lambda sharding, sub: jax.tree.map(lambda _: sharding, sub), shardings, batch))
    rng = jax.eval_shape(lambda: jax.random.key(0))
    with target_platform("tpu"):
        lowered = step.lower(state, batch, rng)
    selected = {key: batch[key] for key in BATCH_KEYS if key in batch}
    return lowered, _shard_bytes((state, selected))


def lower_embed(work: Workload, mesh, rows: int):
    """-> (Lowered, expected argument bytes per chip) of `Embedder`'s compiled forward on `mesh`."""
    import jax
    from flax import nnx

    from mme5_jax.embedder import _embed
    from mme5_jax.model.layers import target_platform
    from mme5_jax.sharding import batch_sharding, state_shardings

    graphdef, state = nnx.split(_abstract_model(work, adapters=False))
    state = _place(state, state_shardings(state, mesh))
    batch = embed_batch(work, rows)
    batch = _place(batch, jax.tree.map(lambda _: batch_sharding(mesh), batch))
    with target_platform("tpu"), jax.set_mesh(mesh):  # as `Embedder.encode` traces it
        lowered = _embed.lower(graphdef, state, batch)
    return lowered, _shard_bytes((state, batch))


def _place(tree, shardings):
    """Shapes in `tree` given the matching leaves of `shardings` (NNX Variables stay as they are)."""
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    placed = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(placed) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(placed)} shardings")
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, placed)])


def compile_for(work: Workload, topology: Topology, step: str = "train", embed_rows: int | None = None,
                progress: bool = True) -> Compiled:
    """Lower and compile `step` ("train" or "embed") for `topology`; prints elapsed time while XLA works."""
    devices = abstract_devices(topology)
    mesh = make_mesh(work, topology, devices)
    divisor = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = work.pairs if step == "train" else (embed_rows or work.embed_rows)
    if rows % divisor:
        what = "global batch (pairs)" if step == "train" else "embedding batch rows"
        raise MeshError(f"{what} {rows} does not split over the mesh's {divisor} batch shards (data x fsdp)")
    if step == "train" and work.kind == "train" and work.chunk_size and work.chunk_size % divisor:
        raise MeshError(f"train.chunk_size: {work.chunk_size} is not a multiple of the mesh's {divisor} batch shards "
                        f"(data x fsdp), which `mme5 train` refuses")
    from mme5_jax.model.layers import recorded_kernels

    start = time.perf_counter()
    # The kernels attention chose while tracing: what the compiled program contains, not a prediction.
    with _ticker(f"tracing the {step} step for {topology.libtpu_name}", progress), recorded_kernels() as chosen:
        lowered, expected = lower_train(work, mesh) if step == "train" else lower_embed(work, mesh, rows)
    with _ticker(f"compiling the {step} step for {topology.libtpu_name} (XLA TPU compiler)", progress):
        compiled = lowered.compile()
    kernels = {kind: {"kernel": kernel, "why_not_splash": why} for kind, (kernel, why) in sorted(chosen.items())}
    return Compiled(compiled, mesh, time.perf_counter() - start, expected, kernels)


class _ticker:
    """Prints `what` and the elapsed seconds every 30 s to stderr until the block ends (an 11B compile takes
    minutes and says nothing meanwhile)."""

    def __init__(self, what, enabled, every=30.0):
        self.what, self.enabled, self.every = what, enabled, every
        self._done = threading.Event()

    def __enter__(self):
        if self.enabled:
            print(f"{self.what} ...", file=sys.stderr, flush=True)
            self._start = time.perf_counter()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._done.wait(self.every):
            print(f"  still {self.what}: {time.perf_counter() - self._start:.0f} s", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self._done.set()
        if self.enabled:
            self._thread.join()
            print(f"  done in {time.perf_counter() - self._start:.1f} s", file=sys.stderr, flush=True)
        return False
