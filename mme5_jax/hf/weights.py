"""The one table between Hugging Face Mllama tensors and our parameter tree, and the per-parameter transforms.

`weight_map` names, for every HF tensor (canonical key, see `layout`), the parameter it becomes, the layer slot in a
stacked (scanned) parameter, and the transform (transpose for linear kernels, reshape for the patch convolution).
Loading, both converters and the training export all read it, so the directions cannot drift apart.
"""
from dataclasses import dataclass

import numpy as np

from mme5_jax.config import ModelConfig
from mme5_jax.hf.layout import installed_key
from mme5_jax.model.text import layer_period
from mme5_jax.model.vision import local_segments


class WeightError(ValueError):
    """A checkpoint does not match the model config: the message names the tensor(s) and shapes."""


@dataclass(frozen=True)
class Target:
    path: tuple           # parameter path in our NNX state
    index: int | None     # slot on the stacked `layers` axis, or None for unstacked parameters
    transform: str        # "copy", "linear" (transpose) or "patch" (conv weight -> [C*p*p, D])
    hf_shape: tuple


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


def param_to_hf(items, array: np.ndarray, layout: str):
    """The inverse of `read_param`: (HF key in `layout`, contiguous numpy array) for each HF tensor of one of our
    parameters."""
    for hf_key, target in items:
        slab = array if target.index is None else array[target.index]
        yield installed_key(hf_key, layout), np.ascontiguousarray(to_hf(target, slab))
