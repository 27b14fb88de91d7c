"""One training-step benchmark: build the model with adapters, compile the real train step once, time N steps.

Inputs are synthetic (random pixels and token ids at fixed shapes): queries, positives and negatives each at their
own length, and a text-only group without image arrays, so the train step's per-group encoding skips the vision
tower for it. Timing covers the device step only.

Reported per chip: examples/s, text tokens/s (real, unpadded tokens), image tiles/s, model TFLOP/s, MFU and HFU
(mme5_jax.bench.flops against mme5_jax.bench.peaks), step time median/min/max, compile time, peak memory.
"""
import dataclasses
import os
import statistics
import time

import numpy as np

from mme5_jax import yaml_config
from mme5_jax.model import DTYPES, REMAT_CHOICES
from mme5_jax.model.lora_config import KINDS, AdapterConfig


class BenchConfigError(yaml_config.ConfigError):
    """A bad benchmark config key or value; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class BatchSection:
    """The synthetic global batch: `pairs` (query, positive) pairs, `negatives` hard negatives per pair shaped like
    the positives; each group at its own token length and image tiles (0: text only)."""

    pairs: int = 8
    query_tokens: int = 64
    query_tiles: int = 4
    target_tokens: int = 32
    target_tiles: int = 0
    negatives: int = 0


@dataclasses.dataclass(frozen=True)
class StepSection:
    """The train step's settings; `chunk_size` is the GradCache chunk in examples (None: plain backprop)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    temperature: float = 0.02
    chunk_size: int | None = None


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    cpu_devices: int | None = None


@dataclasses.dataclass(frozen=True)
class TimingSection:
    warmup: int = 2
    steps: int = 5


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """`model`: a model config name or YAML path, or {vision: ..., text: ..., image_token_index: ...}."""

    model: str | dict
    dtype: str = "float32"
    remat: str = "none"
    seed: int = 0
    adapter: AdapterConfig = AdapterConfig()
    batch: BatchSection = BatchSection()
    train: StepSection = StepSection()
    mesh: MeshSection = MeshSection()
    bench: TimingSection = TimingSection()


_RULES = yaml_config.Rules(
    choices={"dtype": DTYPES, "remat": REMAT_CHOICES, "adapter.kind": KINDS},
    positive=frozenset({"batch.pairs", "batch.query_tokens", "batch.target_tokens", "bench.steps", "adapter.rank"}),
    non_negative=frozenset({"batch.query_tiles", "batch.target_tiles", "batch.negatives", "bench.warmup"}))


def load_config(name_or_path: str, overrides=()) -> dict:
    """The YAML config (a path, or a bundled bench config's name) with `key=value` overrides (values parsed as
    YAML), validated as a BenchConfig, as a plain dict (what bench.json records)."""
    config = yaml_config.load(name_or_path, BenchConfig, overrides, rules=_RULES, kind="bench",
                              error=BenchConfigError)
    chunk, pairs = config.train.chunk_size, config.batch.pairs
    if chunk is not None and (chunk < 1 or pairs % chunk):
        raise BenchConfigError(f"train.chunk_size: {chunk!r} must be a positive divisor of batch.pairs ({pairs}) "
                               f"or null")
    return dataclasses.asdict(config)


def model_config(config):
    from mme5_jax.config import ModelConfig

    spec = config["model"]
    return ModelConfig.from_yaml(spec) if isinstance(spec, str) else ModelConfig.from_dict(spec, where="model")


def adapter_config(config):
    return AdapterConfig(**config["adapter"])


def flops_calls(config, cfg):
    """The step's model calls for mme5_jax.bench.flops.step_flops: each slot group at its own length and tiles."""
    from mme5_jax.bench.flops import Encode

    b = config["batch"]
    n, k = b["pairs"], b["negatives"]
    calls = [Encode(n, b["query_tokens"], b["query_tiles"]), Encode(n, b["target_tokens"], b["target_tiles"])]
    if k:
        calls.append(Encode(n * k, b["target_tokens"], b["target_tiles"]))
    return calls


def config_step_flops(config, cfg):
    """The FLOPs model's count (mme5_jax.bench.flops.StepFlops) of one step of a bench config."""
    from mme5_jax.bench.flops import step_flops

    b, t = config["batch"], config["train"]
    return step_flops(cfg, flops_calls(config, cfg), adapter_config(config), num_queries=b["pairs"],
                      num_negatives=b["negatives"], grad_cache=t["chunk_size"] is not None, remat=config["remat"],
                      dropout_active=True)


def synthetic_rows(config, cfg, seed=0) -> dict:
    """A host batch with one image array per row, as the processor gives them (and as a torch peer takes them):
    query, positive and negatives [B, k, ...] (absent when k is 0), each group at its own length; a group without
    tiles carries no image arrays, as text-only inputs do."""
    b = config["batch"]
    rng = np.random.default_rng(seed)
    n, k = b["pairs"], b["negatives"]

    def slot(rows, length, tiles):
        v, t = cfg.vision, cfg.text
        ids = rng.integers(3, t.vocab_size, (rows, length)).astype(np.int32)
        out = {"input_ids": ids, "attention_mask": np.ones((rows, length), np.int32)}
        if tiles:
            grid = next(i + 1 for i, (h, w) in enumerate(v.supported_aspect_ratios) if h * w == tiles)
            ids[:, 0] = cfg.image_token_index
            out.update(pixel_values=rng.standard_normal((rows, 1, tiles, v.num_channels, v.image_size, v.image_size),
                                                        np.float32),
                       aspect_ratio_ids=np.full((rows, 1), grid, np.int32),
                       aspect_ratio_mask=np.ones((rows, 1, tiles), np.int32),
                       cross_attention_mask=np.ones((rows, length, 1, tiles), np.int32),
                       has_image=np.ones((rows,), bool))
        return out

    batch = {"query": slot(n, b["query_tokens"], b["query_tiles"]),
             "positive": slot(n, b["target_tokens"], b["target_tiles"]),
             "source_index": np.zeros((n,), np.int32), "record_index": np.arange(n, dtype=np.int32)}
    if k:
        negatives = slot(n * k, b["target_tokens"], b["target_tiles"])
        batch["negatives"] = {key: v.reshape(n, k, *v.shape[1:]) for key, v in negatives.items()}
        batch["negative_mask"] = np.ones((n, k), bool)
    return batch


def synthetic_batch(config, cfg, seed=0, layout=None) -> dict:
    """`synthetic_rows` with its images packed for the train step (`mme5_jax.data.images`), by default for one
    device and no GradCache."""
    from mme5_jax.data.images import ImageLayout, pack_rows

    return pack_rows(synthetic_rows(config, cfg, seed), layout or ImageLayout())


def select_devices(config):
    """The devices of the benchmark's mesh; on CPU, JAX starts with `mesh.cpu_devices` host devices unless it is up
    already (e.g. in tests), and then uses what it has."""
    import jax

    from mme5_jax.runtime import start_jax

    m = config["mesh"]
    start_jax(cpu_devices=m["cpu_devices"])
    devices = jax.devices()
    fixed = m["fsdp"] * m["tensor"]
    wanted = m["data"] * fixed if m["data"] != -1 else (m["cpu_devices"] if devices[0].platform == "cpu" and
                                                          m["cpu_devices"] else len(devices))
    if wanted > len(devices):
        raise BenchConfigError(f"mesh: needs {wanted} devices, {len(devices)} available")
    return devices[:wanted]


def build(config):
    """-> (model config, mesh, step, state, global batch) ready to run; nothing compiled yet."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mme5_jax.model import lora
    from mme5_jax.model.init import random_model
    from mme5_jax.data.images import ImageLayout
    from mme5_jax.sharding import batch_divisor, make_mesh
    from mme5_jax.train_step import TrainStep, batch_shardings, init_train_state, make_optimizer

    cfg = model_config(config)
    devices = select_devices(config)
    m = config["mesh"]
    mesh = make_mesh(data=m["data"], fsdp=m["fsdp"], tensor=m["tensor"], devices=devices)
    model = random_model(cfg, dtype=config["dtype"], remat=config["remat"], seed=config["seed"])
    lora.add_adapters(model, adapter_config(config), nnx.Rngs(config["seed"]))
    t = config["train"]
    optimizer = make_optimizer(lambda step: jnp.float32(t["lr"]), weight_decay=t["weight_decay"])
    graphdef, state = init_train_state(model, optimizer, mesh)
    del model
    step = TrainStep(graphdef, optimizer, mesh, temperature=t["temperature"], chunk_size=t["chunk_size"])
    chunks = 1 if t["chunk_size"] is None else config["batch"]["pairs"] // t["chunk_size"]
    batch = synthetic_batch(config, cfg, config["seed"], ImageLayout(shards=batch_divisor(mesh), chunks=chunks))
    batch = jax.device_put(batch, batch_shardings(batch, mesh))
    return cfg, mesh, step, state, batch


def _peak_memory(devices, compiled):
    """Peak bytes per device: the allocator's high-water mark where the backend has one (GPU/TPU), else XLA's
    static estimate of the step (arguments + outputs + temporaries - aliased)."""
    stats = [d.memory_stats() or {} for d in devices]
    if all("peak_bytes_in_use" in s for s in stats):
        return {"peak_bytes": max(s["peak_bytes_in_use"] for s in stats), "source": "allocator"}
    a = compiled.memory_analysis()
    estimate = (a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes - a.alias_size_in_bytes)
    return {"peak_bytes": int(estimate), "source": "xla_memory_analysis", "temp_bytes": int(a.temp_size_in_bytes)}


def run_bench(config, progress=True) -> dict:
    """Compiles the step once, runs `bench.warmup` then `bench.steps` timed steps -> the bench.json dict."""
    import jax
    from tqdm import tqdm

    from mme5_jax.bench.peaks import peak_per_device

    cfg, mesh, step, state, batch = build(config)
    rng = jax.random.PRNGKey(config["seed"])
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    memory = _peak_memory(mesh.devices.flat, compiled)

    times = []
    total = config["bench"]["warmup"] + config["bench"]["steps"]
    for i in tqdm(range(total), desc="bench steps", disable=not progress):
        start = time.perf_counter()
        state, metrics = step(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready((state, metrics))
        if i >= config["bench"]["warmup"]:
            times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"benchmark step produced a non-finite loss {loss}")

    b = config["batch"]
    flops = config_step_flops(config, cfg)
    n_dev = mesh.devices.size
    peak = peak_per_device(list(mesh.devices.flat), config["dtype"])
    median = statistics.median(times)
    per_chip_s = median * n_dev
    tokens = b["pairs"] * (b["query_tokens"] + b["target_tokens"] * (1 + b["negatives"]))
    tiles = b["pairs"] * (b["query_tiles"] + b["target_tiles"] * (1 + b["negatives"]))
    model_tflops = flops.model / per_chip_s / 1e12
    hardware_tflops = flops.hardware / per_chip_s / 1e12
    return {
        "config": config,
        "device": {"kind": peak["device_kind"], "platform": mesh.devices.flat[0].platform, "count": n_dev,
                   "mesh": dict(mesh.shape)},
        "compile_s": compile_s,
        "step_time_s": {"median": median, "min": min(times), "max": max(times), "all": times},
        "per_chip": {"examples_per_s": b["pairs"] / per_chip_s, "text_tokens_per_s": tokens / per_chip_s,
                     "image_tiles_per_s": tiles / per_chip_s, "model_tflops_per_s": model_tflops,
                     "hardware_tflops_per_s": hardware_tflops},
        "mfu": model_tflops * 1e12 / peak["flops_per_s"],
        "hfu": hardware_tflops * 1e12 / peak["flops_per_s"],
        "peak": peak,
        "flops_per_step": flops.to_dict(),
        "memory": memory,
        "final_loss": loss,
        "load_average": os.getloadavg(),
    }


def xla_step_flops(config) -> float:
    """XLA's own FLOP count of the compiled train step (scans unrolled), to cross-check mme5_jax.bench.flops."""
    import jax

    from mme5_jax.bench.flops import xla_flops

    _, _, step, state, batch = build(config)
    return xla_flops(lambda: step.lower(state, batch, jax.random.PRNGKey(0)))
