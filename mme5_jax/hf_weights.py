"""Hugging Face Mllama safetensors <-> our parameter tree: the key table, a streaming reader and the loader.

One table (`weight_map`) names, for every HF tensor, the parameter it becomes, the layer slot in a stacked
(scanned) parameter, and the transform (transpose for linear kernels, reshape for the patch convolution). Loading
and the converters both read it, so the two directions cannot drift apart. Tensors are read one at a time from
memory-mapped files, never the whole checkpoint.
"""
import json
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mme5_jax.config import ModelConfig
from mme5_jax.model.text import layer_period
from mme5_jax.model.vision import local_segments

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class WeightError(ValueError):
    """A checkpoint does not match the model config: the message names the tensor(s) and shapes."""


@dataclass(frozen=True)
class Target:
    path: tuple           # parameter path in our NNX state
    index: int | None     # slot on the stacked `layers` axis, or None for unstacked parameters
    transform: str        # "copy", "linear" (transpose) or "patch" (conv weight -> [C*p*p, D])
    hf_shape: tuple


# --- key layouts -------------------------------------------------------------------------------------------------
def canonical_key(key: str) -> str:
    """Maps transformers 4.4x on-disk keys and 5.x keys onto one canonical layout (`language_model.layers.N...`)."""
    for old, new in (("model.language_model.", "language_model."), ("language_model.model.", "language_model."),
                     ("language_model.lm_head.", "lm_head."), ("model.vision_model.", "vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def installed_key(key: str, layout: str = "5") -> str:
    """The inverse of `canonical_key` for the given layout ("5" = transformers 5.x, "4.46" = released mmE5)."""
    if layout == "4.46":
        if key.startswith("language_model."):
            return "language_model.model." + key[len("language_model."):]
        if key.startswith("lm_head."):
            return "language_model." + key
        return key
    if key.startswith("lm_head."):
        return key
    return "model." + key


# --- the table ----------------------------------------------------------------------------------------------------
def weight_map(cfg: ModelConfig) -> dict:
    """Canonical HF key -> Target for every tensor of `MllamaForConditionalGeneration` (lm_head excluded)."""
    v, t = cfg.vision, cfg.text
    d, n_ar, tiles = v.hidden_size, v.max_aspect_ratio_id + 1, v.max_num_tiles
    table = {}

    def add(key, path, shape, transform="copy", index=None):
        table[key] = Target(tuple(path), index, transform, tuple(shape))

    vm = "vision_model"
    add(f"{vm}.patch_embedding.weight", (vm, "patch_embedding", "kernel"),
        (d, v.num_channels, v.patch_size, v.patch_size), "patch")
    add(f"{vm}.class_embedding", (vm, "class_embedding"), (d,))
    add(f"{vm}.gated_positional_embedding.embedding", (vm, "pos_embedding"), (v.num_patches, d))
    add(f"{vm}.gated_positional_embedding.gate", (vm, "pos_gate"), (1,))
    add(f"{vm}.gated_positional_embedding.tile_embedding.weight", (vm, "tile_pos_embedding"),
        (n_ar, tiles * v.num_patches * d))
    for name, ours in (("pre", "pre_tile"), ("post", "post_tile")):
        add(f"{vm}.{name}_tile_positional_embedding.embedding.weight", (vm, f"{ours}_embedding"), (n_ar, tiles * d))
        add(f"{vm}.{name}_tile_positional_embedding.gate", (vm, f"{ours}_gate"), (1,))
    for name in ("layernorm_pre", "layernorm_post"):
        add(f"{vm}.{name}.weight", (vm, name, "scale"), (d,))
        add(f"{vm}.{name}.bias", (vm, name, "bias"), (d,))

    def vision_layer(prefix, path, index, gated):
        for p in "qkvo":
            add(f"{prefix}.self_attn.{p}_proj.weight", path + ("self_attn", f"{p}_proj", "kernel"), (d, d),
                "linear", index)
        add(f"{prefix}.mlp.fc1.weight", path + ("mlp", "fc1", "kernel"), (v.intermediate_size, d), "linear", index)
        add(f"{prefix}.mlp.fc1.bias", path + ("mlp", "fc1", "bias"), (v.intermediate_size,), "copy", index)
        add(f"{prefix}.mlp.fc2.weight", path + ("mlp", "fc2", "kernel"), (d, v.intermediate_size), "linear", index)
        add(f"{prefix}.mlp.fc2.bias", path + ("mlp", "fc2", "bias"), (d,), "copy", index)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(f"{prefix}.{norm}.weight", path + (norm, "scale"), (d,), "copy", index)
            add(f"{prefix}.{norm}.bias", path + (norm, "bias"), (d,), "copy", index)
        if gated:
            add(f"{prefix}.gate_attn", path + ("gate_attn",), (1,), "copy", index)
            add(f"{prefix}.gate_ffn", path + ("gate_ffn",), (1,), "copy", index)

    for s, (start, stop) in enumerate(local_segments(v)):
        for i in range(start, stop):
            vision_layer(f"{vm}.transformer.layers.{i}", (vm, "local_segments", s, "layers"), i - start, False)
    for i in range(v.num_global_layers):
        vision_layer(f"{vm}.global_transformer.layers.{i}", (vm, "global_layers", "layers"), i, True)

    add("multi_modal_projector.weight", ("multi_modal_projector", "kernel"), (t.hidden_size, v.vision_output_dim),
        "linear")
    add("multi_modal_projector.bias", ("multi_modal_projector", "bias"), (t.hidden_size,))

    lm, h, hd = "language_model", t.hidden_size, t.head_dim
    add(f"{lm}.embed_tokens.weight", (lm, "embed_tokens"), (t.vocab_size + 8, h))
    add(f"{lm}.norm.weight", (lm, "norm", "weight"), (h,))
    kinds, period = t.layer_kinds, layer_period(t.layer_kinds)
    q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
    for i, kind in enumerate(kinds):
        prefix, path, index = f"{lm}.layers.{i}", (lm, "blocks", "layers", "layers", i % period), i // period
        attn = "cross_attn" if kind == "cross" else "self_attn"
        for p, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            add(f"{prefix}.{attn}.{p}_proj.weight", path + (attn, f"{p}_proj", "kernel"), (out, h), "linear", index)
        add(f"{prefix}.{attn}.o_proj.weight", path + (attn, "o_proj", "kernel"), (h, q_out), "linear", index)
        if kind == "cross":
            for norm in ("q_norm", "k_norm"):
                add(f"{prefix}.cross_attn.{norm}.weight", path + ("cross_attn", norm, "weight"), (hd,), "copy", index)
            for gate in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                add(f"{prefix}.{gate}", path + (gate,), (1,), "copy", index)
        for p in ("gate_proj", "up_proj"):
            add(f"{prefix}.mlp.{p}.weight", path + ("mlp", p, "kernel"), (t.intermediate_size, h), "linear", index)
        add(f"{prefix}.mlp.down_proj.weight", path + ("mlp", "down_proj", "kernel"), (h, t.intermediate_size),
            "linear", index)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(f"{prefix}.{norm}.weight", path + (norm, "weight"), (h,), "copy", index)
    return table


LM_HEAD_KEY = "lm_head.weight"


def to_ours(target: Target, array: np.ndarray) -> np.ndarray:
    if target.transform == "linear":
        return array.T
    if target.transform == "patch":
        return array.reshape(array.shape[0], -1).T
    return array


def to_hf(target: Target, array: np.ndarray) -> np.ndarray:
    if target.transform == "linear":
        return array.T
    if target.transform == "patch":
        return array.T.reshape(target.hf_shape)
    return array


# --- reading safetensors ------------------------------------------------------------------------------------------
class SafetensorsFile:
    """A memory-mapped safetensors file: tensors are views read on demand, with the header checked up front."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise WeightError(f"{path}: truncated safetensors header ({n} bytes declared, file is {size})")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.header = header
        for key, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise WeightError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            end = info["data_offsets"][1]
            if self.data_start + end > size:
                raise WeightError(f"{path}: truncated: tensor {key!r} ends at byte {self.data_start + end}, "
                                  f"file has {size}")
        self._mmap = None

    def keys(self):
        return self.header.keys()

    def shape(self, key) -> tuple:
        return tuple(self.header[key]["shape"])

    def get(self, key) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[key]
        start, end = info["data_offsets"]
        raw = self._mmap[self.data_start + start: self.data_start + end]
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


class HFCheckpoint:
    """All safetensors shards of a Hugging Face directory, addressed by canonical key."""

    def __init__(self, path: str):
        self.path = path
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index_file):
            with open(index_file, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise WeightError(f"{path}: no *.safetensors files")
        missing = [n for n in files if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise WeightError(f"{path}: missing shard(s) listed in model.safetensors.index.json: {missing}")
        self.files = [SafetensorsFile(os.path.join(path, n)) for n in files]
        self.where = {}
        for f in self.files:
            for key in f.keys():
                self.where[canonical_key(key)] = (f, key)

    def keys(self):
        return self.where.keys()

    def shape(self, key) -> tuple:
        f, raw = self.where[key]
        return f.shape(raw)

    def get(self, key) -> np.ndarray:
        f, raw = self.where[key]
        return f.get(raw)


def check_keys(table: dict, keys) -> None:
    """Unknown or missing tensors are errors that name them (lm_head is optional: embeddings do not need it)."""
    keys = set(keys)
    missing = sorted(set(table) - keys)
    unknown = sorted(keys - set(table) - {LM_HEAD_KEY})
    problems = []
    if missing:
        problems.append(f"missing tensors: {_abbrev(missing)}")
    if unknown:
        problems.append(f"unexpected tensors: {_abbrev(unknown)}")
    if problems:
        raise WeightError("checkpoint does not match the model config: " + "; ".join(problems))


def _abbrev(keys, n=8):
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def group_by_param(table: dict) -> dict:
    """Parameter path -> [(hf_key, Target)] sorted by layer slot, so a stacked parameter is built in one pass."""
    groups = {}
    for key, target in table.items():
        groups.setdefault(target.path, []).append((key, target))
    for items in groups.values():
        items.sort(key=lambda kt: -1 if kt[1].index is None else kt[1].index)
    return groups


def read_param(ckpt, items, dtype) -> np.ndarray:
    """Assembles one of our parameters from its HF tensors, checking every shape against the config."""
    arrays = []
    for key, target in items:
        shape = ckpt.shape(key)
        if shape != target.hf_shape:
            raise WeightError(f"tensor {key!r} has shape {shape}, the config expects {target.hf_shape}")
        arrays.append(to_ours(target, ckpt.get(key)).astype(dtype))
    return arrays[0] if items[0][1].index is None else np.stack(arrays)


def load_hf_params(path: str, cfg: ModelConfig, dtype, place=None, progress: bool = True) -> dict:
    """Reads an HF Mllama directory into {param path: array}, one parameter at a time.

    `place(path, numpy_array)` moves each parameter to its device (and sharding) as soon as it is assembled, so
    host memory holds at most one stacked parameter.
    """
    from tqdm import tqdm

    ckpt = HFCheckpoint(path)
    table = weight_map(cfg)
    check_keys(table, ckpt.keys())
    groups = group_by_param(table)
    out = {}
    for param_path, items in tqdm(groups.items(), desc="loading weights", unit="param", disable=not progress):
        array = read_param(ckpt, items, dtype)
        out[param_path] = place(param_path, array) if place else array
    return out


def is_hf_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(n.endswith(".safetensors") for n in os.listdir(path))



class UnmappedReader:
    """An `HFCheckpoint` read with plain file reads instead of memory maps.

    Touched pages of a memory map stay resident (and count in RSS) until the map is closed, so a converter that
    walks every tensor through `HFCheckpoint.get` ends up with the whole checkpoint resident. Each `get` here returns
    a fresh array that is freed with its last reference.
    """

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt

    def keys(self):
        return self.ckpt.keys()

    def shape(self, key) -> tuple:
        return self.ckpt.shape(key)

    def dtype(self, key) -> str:
        f, raw = self.ckpt.where[key]
        return f.header[raw]["dtype"]

    def get(self, key) -> np.ndarray:
        f, raw = self.ckpt.where[key]
        info = f.header[raw]
        start, end = info["data_offsets"]
        out = np.empty(end - start, np.uint8)
        with open(f.path, "rb") as handle:
            handle.seek(f.data_start + start)
            if handle.readinto(memoryview(out)) != end - start:
                raise WeightError(f"{f.path}: truncated while reading tensor {raw!r}")
        return out.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
