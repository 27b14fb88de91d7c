"""One training-step benchmark: build the model with adapters, compile the real train step once, time N steps.

Inputs are synthetic (random pixels and token ids at fixed shapes): queries, positives and negatives each at their
own length, and a text-only group without image arrays, so the train step's per-group encoding skips the vision
tower for it. Timing covers the device step only.

Reported per chip: examples/s, text tokens/s (real, unpadded tokens), image tiles/s, model TFLOP/s, MFU and HFU
(mme5_jax.bench.flops against mme5_jax.bench.peaks), step time median/min/max, compile time, peak memory.
"""
import copy
import functools
import os
import statistics
import time

import numpy as np
import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs", "bench")

DEFAULTS = {
    "model": None,          # a configs/model name, or {vision: ..., text: ..., image_token_index: ...}
    "dtype": "float32",
    "remat": "none",
    "seed": 0,
    "adapter": {"kind": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": None},
    "batch": {"pairs": 8, "query_tokens": 64, "query_tiles": 4, "target_tokens": 32, "target_tiles": 0,
              "negatives": 0},
    "train": {"lr": 1e-5, "weight_decay": 0.0, "temperature": 0.02, "chunk_size": None},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "cpu_devices": None},
    "bench": {"warmup": 2, "steps": 5},
}
CHOICES = {"dtype": ("float32", "bfloat16"), "remat": ("none", "full", "dots", "dots_no_batch"),
           "adapter.kind": ("lora", "dora")}


class BenchConfigError(ValueError):
    """A bad benchmark config key or value; the message names the dotted key."""


def resolve_config_path(name_or_path: str) -> str:
    if os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        known = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))
        raise BenchConfigError(f"bench config {name_or_path!r} not found; known: {', '.join(known)}")
    return path


def _merge(base, override, where=""):
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{where}{key}"
        if key not in base:
            raise BenchConfigError(f"{dotted}: unknown key; known: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, dotted + ".")
        else:
            out[key] = value
    return out


def _set_dotted(config, dotted, value):
    node = config
    *keys, last = dotted.split(".")
    for key in keys:
        if not isinstance(node.get(key), dict):
            raise BenchConfigError(f"{dotted}: {key!r} is not a section")
        node = node[key]
    if last not in node and not (keys and keys[0] == "model"):
        raise BenchConfigError(f"{dotted}: unknown key; known: {', '.join(sorted(node))}")
    node[last] = value


def load_config(name_or_path: str, overrides=()) -> dict:
    """The YAML config over DEFAULTS, then `key=value` overrides (values parsed as YAML), validated."""
    path = resolve_config_path(name_or_path)
    with open(path, encoding="utf-8") as f:
        config = _merge(DEFAULTS, yaml.safe_load(f) or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchConfigError(f"override {item!r} is not key=value")
        _set_dotted(config, key.strip(), yaml.safe_load(value))
    return _validate(config, path)


def _validate(config, path):
    if config["model"] is None:
        raise BenchConfigError(f"{path}: model: missing (a configs/model name or a vision/text mapping)")
    for dotted, choices in CHOICES.items():
        value = _get(config, dotted)
        if value not in choices:
            raise BenchConfigError(f"{dotted}: {value!r} is not one of {choices}")
    for dotted in ("batch.pairs", "batch.query_tokens", "batch.target_tokens", "bench.steps", "adapter.rank"):
        if not isinstance(_get(config, dotted), int) or _get(config, dotted) < 1:
            raise BenchConfigError(f"{dotted}: expected a positive integer, got {_get(config, dotted)!r}")
    for dotted in ("batch.query_tiles", "batch.target_tiles", "batch.negatives", "bench.warmup"):
        if not isinstance(_get(config, dotted), int) or _get(config, dotted) < 0:
            raise BenchConfigError(f"{dotted}: expected a non-negative integer, got {_get(config, dotted)!r}")
    chunk = config["train"]["chunk_size"]
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1 or config["batch"]["pairs"] % chunk):
        raise BenchConfigError(f"train.chunk_size: {chunk!r} must be a positive divisor of batch.pairs "
                               f"({config['batch']['pairs']}) or null")
    return config


def _get(config, dotted):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def model_config(config):
    from mme5_jax.config import ModelConfig

    spec = config["model"]
    return ModelConfig.from_yaml(spec) if isinstance(spec, str) else ModelConfig.from_dict(spec, where="model")


def adapter_config(config):
    from mme5_jax.model.lora import AdapterConfig

    spec = dict(config["adapter"])
    targets = spec.pop("targets")
    return AdapterConfig(**spec, **({"targets": tuple(targets)} if targets else {}))


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


def synthetic_batch(config, cfg, seed=0) -> dict:
    """A host batch shaped like the Grain pipeline's: query, positive and negatives [B, k, ...] (absent when k is
    0), each group at its own length; a group without tiles carries no image arrays, as text-only inputs do."""
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


def select_devices(config):
    """The devices of the benchmark's mesh; on CPU, asks JAX for `mesh.cpu_devices` host devices if it has not
    started yet."""
    import jax

    m = config["mesh"]
    if m["cpu_devices"]:
        try:
            jax.config.update("jax_num_cpu_devices", m["cpu_devices"])
        except RuntimeError:
            pass  # the backend is up already (e.g. tests): use what it has
    devices = jax.devices()
    fixed = m["fsdp"] * m["tensor"]
    wanted = m["data"] * fixed if m["data"] != -1 else (m["cpu_devices"] if devices[0].platform == "cpu" and
                                                          m["cpu_devices"] else len(devices))
    if wanted > len(devices):
        raise BenchConfigError(f"mesh: needs {wanted} devices, {len(devices)} available")
    return devices[:wanted]


def random_model(cfg, dtype: str, remat: str, seed: int = 0):
    """The model from abstract shapes, every parameter drawn directly on device (no host copy, no per-layer
    stacking): matrices ~ N(0, 0.02), vectors (norm scales, gates, biases) = 1. Numbers irrelevant, speed real."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mme5_jax.model.mllama import abstract_model

    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, remat))
    flat = nnx.to_flat_state(abstract)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(key, shape, dtype, vector):
        if vector:
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    key = jax.random.key(seed)
    for i, (_, variable) in enumerate(flat):
        axes = variable.get_metadata("logical_axes", None) or (None,) * len(variable.shape)
        vector = sum(a != "layers" for a in axes) <= 1
        variable.set_value(draw(jax.random.fold_in(key, i), tuple(variable.shape), variable.dtype, vector))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def build(config):
    """-> (model config, mesh, step, state, global batch) ready to run; nothing compiled yet."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mme5_jax.model import lora
    from mme5_jax.sharding import batch_sharding, make_mesh
    from mme5_jax.train_step import init_train_state, make_optimizer, make_train_step

    cfg = model_config(config)
    devices = select_devices(config)
    m = config["mesh"]
    mesh = make_mesh(data=m["data"], fsdp=m["fsdp"], tensor=m["tensor"], devices=devices)
    model = random_model(cfg, config["dtype"], config["remat"], config["seed"])
    lora.add_adapters(model, adapter_config(config), nnx.Rngs(config["seed"]))
    t = config["train"]
    optimizer = make_optimizer(lambda step: jnp.float32(t["lr"]), weight_decay=t["weight_decay"])
    graphdef, state = init_train_state(model, optimizer, mesh)
    del model
    step = make_train_step(graphdef, optimizer, mesh, temperature=t["temperature"], chunk_size=t["chunk_size"])
    batch = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)),
                         synthetic_batch(config, cfg, config["seed"]))
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
