"""LoRA and DoRA adapters on the model's `Linear` layers, with PEFT semantics (what mmE5 trained with).

An adapted `Linear` computes, for input x, frozen kernel W [in, out], A [in, r], B [r, out], s = alpha / r and
x' = dropout(x):

    LoRA:  x W + s x' A B
    DoRA:  x W + (g - 1) x' W + g s x' A B,   g = m / stop_gradient(||W + s A B||)   (norm per output unit)

which is PEFT's `_apply_dora`: the weight norm is detached and the magnitude term multiplies W by the dropped-out
input. DoRA's gradient is written by hand (`_dora`): the same matmuls as autodiff, a third less of the adapters' HBM
traffic on TPU. Adapters inside a scanned `Stack` carry the stack's leading layer axis, so the scan slices them with
the base kernel. Dropout draws one key per (adapted module, layer, example row) from a step key, so a row's mask
does not depend on how the batch is chunked and GradCache's second forward sees the same masks as the first; the
mask itself is a counter hash of the row's key (`keep_mask`).
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mme5_jax.hf.layout import installed_key
from mme5_jax.hf.weights import weight_map
from mme5_jax.model.layers import Linear, scoped
from mme5_jax.model.lora_config import MME5_TARGETS, AdapterConfig

# What mmE5 passes to PEFT; on Mllama it selects exactly the modules MME5_TARGETS selects here.
MME5_PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRAParam(nnx.Param):
    """Adapter weights: the only variables that are trained."""


class DropoutKeys(nnx.Variable):
    """Per-row PRNG keys for one training forward; absent (None) means no dropout."""


class Adapter(nnx.Module):
    """The low-rank update of one `Linear` (or of a stack of them: leading layer axes follow the kernel's)."""

    def __init__(self, kernel: nnx.Variable, cfg: AdapterConfig, rngs: nnx.Rngs):
        *lead, d_in, d_out = kernel.shape
        *lead_axes, in_axis, out_axis = kernel.get_metadata("logical_axes", (None,) * kernel.ndim)
        r = cfg.rank
        # PEFT init_lora_weights="gaussian" (mmE5's setting): A ~ N(0, 1/r^2), B = 0.
        a = jax.random.normal(rngs.params(), (*lead, d_in, r), jnp.float32) / r
        self.lora_a = LoRAParam(a, logical_axes=(*lead_axes, in_axis, "lora_rank"))
        self.lora_b = LoRAParam(jnp.zeros((*lead, r, d_out), jnp.float32),
                                logical_axes=(*lead_axes, "lora_rank", out_axis))
        if cfg.kind == "dora":
            norm = jnp.linalg.norm(kernel[...].astype(jnp.float32), axis=-2)
            self.magnitude = LoRAParam(norm, logical_axes=(*lead_axes, out_axis))
        else:
            self.magnitude = None
        self.kind = cfg.kind
        self.scale = cfg.scale
        self.dropout = cfg.dropout
        self.dropout_keys = nnx.data(None)

    def delta(self):
        """s A B in float32, shaped like the kernel."""
        return self.scale * jnp.matmul(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST)

    def dora_gain(self, kernel):
        """m / ||W + s A B|| per output unit, the norm detached (PEFT)."""
        norm = jnp.linalg.norm(kernel.astype(jnp.float32) + jax.lax.stop_gradient(self.delta()), axis=-2)
        return self.magnitude[...] / jax.lax.stop_gradient(norm)

    @scoped("adapter")
    def __call__(self, x, base, kernel, dtype):
        """`base` = x W (no bias), `kernel` = W; returns the adapted x W."""
        hi = jax.lax.Precision.HIGHEST
        keys = None if self.dropout_keys is None else self.dropout_keys[...]
        if keys is not None and keys.shape[0] != x.shape[0]:
            raise ValueError(f"dropout keys cover {keys.shape[0]} rows but the adapted input has {x.shape[0]}")
        if self.kind == "dora":
            return _dora(x.astype(dtype), base, kernel.astype(dtype), self.lora_a[...], self.lora_b[...],
                         self.dora_gain(kernel), keys, self.scale, self.dropout)
        x_drop = _dropped(x.astype(dtype), keys, self.dropout)
        # As 2-D rows, the gradients of A and B contract one token axis; over [batch, length] XLA:CPU transposed
        # the [tokens, out] gradient in memory first (the cpu_small text step was 1.4x slower).
        rows = x_drop.reshape(-1, x_drop.shape[-1])
        low = jnp.dot(jnp.dot(rows, self.lora_a[...].astype(dtype), precision=hi),
                      self.lora_b[...].astype(dtype), precision=hi) * jnp.asarray(self.scale, dtype)
        return base + low.reshape(*x_drop.shape[:-1], low.shape[-1])


def _dropped(x, keys, rate):
    """Inverted dropout of x [rows, ...] with each row's key; the identity without keys."""
    if keys is None:
        return x
    return jnp.where(keep_mask(keys, x.shape[1:], rate), x / (1.0 - rate), 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _dora(x, base, kernel, a, b, gain, keys, scale, rate):
    """PEFT's DoRA output base + (g - 1) x' W + g s x' A B (x' = dropout(x), g = `gain` per output unit), with a
    hand-written gradient. Autodiff of that expression, on an 11B vision layer compiled for TPU, moved about 40
    activation-sized arrays through HBM per adapted module in forward, recompute and backward (the DoRA adapters
    were 43% of the layer's bytes); this rule moves about 27 and runs the same matmuls (the layer's bytes fell 18%).
    With dropout, the input's gradient through both adapter terms is one matmul with the weight-space difference
    W_delta = (g - 1) W + g s A B; without, x' W is `base` and only the low-rank path adds to it. The gain's gradient
    reads the saved x' (W + s A B). Folding the whole adapter into the weights would move fewer bytes still, but
    needs the full weight gradient x'^T dy: one more matmul per adapted module (4% more FLOPs on a vision layer,
    more in the decoder, whose adapted modules hold half its weights), and the 11B step is compute-bound on v5p."""
    return _dora_forward(x, base, kernel, a, b, gain, keys, scale, rate)[0]


def _dora_forward(x, base, kernel, a, b, gain, keys, scale, rate):
    hi = jax.lax.Precision.HIGHEST
    dtype = base.dtype
    x_drop = _dropped(x, keys, rate)
    hidden = jnp.einsum("...i,ir->...r", x_drop, a.astype(dtype), precision=hi)
    low = jnp.einsum("...r,ro->...o", hidden, b.astype(dtype), precision=hi) * jnp.asarray(scale, dtype)
    base_drop = base if keys is None else jnp.dot(x_drop, kernel, precision=hi)
    g = gain.astype(dtype)
    return base + (g - 1) * base_drop + g * low, (x, kernel, a, b, gain, keys, hidden, base_drop + low)


def _dora_backward(scale, rate, residuals, d_out):
    x, kernel, a, b, gain, keys, hidden, adapted = residuals
    hi = jax.lax.Precision.HIGHEST
    dtype, tokens = d_out.dtype, tuple(range(d_out.ndim - 1))
    acc = jnp.promote_types(dtype, jnp.float32)  # what the parameter gradients accumulate in
    d_gain = jnp.sum((d_out * adapted).astype(acc), axis=tokens)
    d_low = d_out * (gain * scale).astype(dtype)
    d_b = jnp.einsum("...r,...o->ro", hidden, d_low, precision=hi, preferred_element_type=acc)
    d_hidden = jnp.einsum("...o,ro->...r", d_low, b.astype(dtype), precision=hi)
    x_drop = _dropped(x, keys, rate)
    d_a = jnp.einsum("...i,...r->ir", x_drop, d_hidden, precision=hi, preferred_element_type=acc)
    if keys is None:  # x' W is `base` itself: its gradient leaves through `base`, W's with it
        d_x = jnp.einsum("...r,ir->...i", d_hidden, a.astype(dtype), precision=hi)
        d_base, d_kernel = d_out * gain.astype(dtype), None
    else:
        w_delta = (gain - 1) * kernel.astype(acc) + gain * scale * jnp.matmul(a, b, precision=hi)
        d_x = _dropped(jnp.einsum("...o,io->...i", d_out, w_delta.astype(dtype), precision=hi), keys, rate)
        d_kernel = jnp.einsum("...i,...o->io", x_drop, d_out * (gain - 1).astype(dtype), precision=hi,
                              preferred_element_type=acc).astype(kernel.dtype)
        d_base = d_out
    return (d_x.astype(x.dtype), d_base, d_kernel, d_a.astype(a.dtype), d_b.astype(b.dtype), d_gain.astype(gain.dtype),
            None)


_dora.defvjp(_dora_forward, _dora_backward)


def _mix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(keys, shape, rate):
    """Dropout's keep mask [rows, *shape]: element e of row i is kept with probability 1 - rate, from a hash of
    (keys[i], e). A counter hash is a few integer ops per element where threefry (`jax.random.bernoulli`) takes
    over a hundred, and the TPU compiler sees a few instructions per adapted module instead of a whole cipher:
    the 11B step holds hundreds of these masks. Within a row the hash is a bijection of e, so no two elements
    share a draw."""
    data = jax.random.key_data(keys) if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
    data = data.astype(jnp.uint32).reshape(data.shape[0], -1)
    lead = (slice(None),) + (None,) * len(shape)
    index = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    stride = 1
    for axis in range(len(shape) - 2, -1, -1):
        stride *= shape[axis + 1]
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    h = _mix32(index[None] * jnp.uint32(0x9E3779B9) + data[:, 0][lead])
    h = _mix32(h ^ data[:, -1][lead])
    return h < jnp.uint32(min(round((1.0 - rate) * 2.0**32), 2**32 - 1))


def module_path(path) -> str:
    return ".".join(map(str, path))


def adapted_linears(model):
    """[(dotted path, Linear)] of the adapted modules, in graph order (stable for a given model)."""
    return [(module_path(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear) and getattr(node, "adapter", None) is not None]


def add_adapters(model, cfg: AdapterConfig, rngs: nnx.Rngs) -> list:
    """Attaches an adapter to every `Linear` whose path fully matches a target; returns their paths."""
    patterns = [re.compile(p) for p in cfg.targets]
    chosen = [(module_path(path), node) for path, node in nnx.iter_graph(model)
              if isinstance(node, Linear) and any(p.fullmatch(module_path(path)) for p in patterns)]
    if not chosen:
        raise ValueError(f"no Linear module matches the adapter targets {list(cfg.targets)}")
    for path, linear in chosen:
        if getattr(linear, "adapter", None) is not None:
            raise ValueError(f"module {path} already has an adapter")
        linear.adapter = Adapter(linear.kernel, cfg, rngs)
    return [path for path, _ in chosen]


def merge_adapters(model) -> None:
    """Folds every adapter into its kernel (W' = W + s A B, or g (W + s A B) for DoRA) and removes it."""
    for _, linear in adapted_linears(model):
        adapter = linear.adapter
        kernel = linear.kernel[...]
        merged = kernel.astype(jnp.float32) + adapter.delta()
        if adapter.kind == "dora":
            merged = adapter.dora_gain(kernel)[..., None, :] * merged
        linear.kernel[...] = merged.astype(kernel.dtype)
        del linear.adapter


def seed_dropout(model, rng, row_ids) -> None:
    """Turns adapter dropout on for one forward: row i of the input gets key fold(rng, module, layer, row_ids[i]).

    Adapters built with dropout 0 stay deterministic. A model never seeded (evaluation) applies no dropout.
    """
    for index, (_, linear) in enumerate(adapted_linears(model)):
        adapter = linear.adapter
        if adapter.dropout == 0:
            continue
        lead = adapter.lora_a.shape[:-2]
        module_key = jax.random.fold_in(rng, index)
        layer_keys = jax.vmap(jax.random.fold_in, (None, 0))(module_key, jnp.arange(math.prod(lead)))
        keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, row_ids))(layer_keys)
        adapter.dropout_keys = DropoutKeys(keys.reshape(*lead, *keys.shape[1:]))


def count_adapter_params(model) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, LoRAParam)))


def _hf_modules(cfg):
    """{(our module path, layer slot): canonical HF module name} for every Linear kernel."""
    return {(module_path(t.path[:-1]), t.index): key[: -len(".weight")]
            for key, t in weight_map(cfg).items() if t.transform == "linear"}


def peft_state_dict(model, cfg: AdapterConfig) -> dict:
    """The adapters as PEFT's saved state dict (keys of the installed transformers' Mllama, torch layouts)."""
    names = _hf_modules(model.cfg)
    out = {}
    for path, linear in adapted_linears(model):
        adapter = linear.adapter
        if adapter.kind != cfg.kind:
            raise ValueError(f"module {path} holds a {adapter.kind} adapter, the config says {cfg.kind}")
        a, b = np.asarray(adapter.lora_a[...]), np.asarray(adapter.lora_b[...])
        magnitude = np.asarray(adapter.magnitude[...]) if adapter.magnitude is not None else None
        slots = [None] if a.ndim == 2 else range(a.shape[0])
        for slot in slots:
            pick = (lambda t: t) if slot is None else (lambda t, s=slot: t[s])
            name = PEFT_PREFIX + installed_key(names[(path, slot)], layout="5")
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(pick(a).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(pick(b).T)
            if magnitude is not None:
                out[f"{name}.lora_magnitude_vector"] = np.ascontiguousarray(pick(magnitude))
    return out


def peft_target_modules(model) -> list:
    """Exact PEFT module names (installed layout) of the adapted modules."""
    names = _hf_modules(model.cfg)
    out = []
    for path, linear in adapted_linears(model):
        slots = [None] if linear.adapter.lora_a.ndim == 2 else range(linear.adapter.lora_a.shape[0])
        out.extend(installed_key(names[(path, slot)], layout="5") for slot in slots)
    return out


def adapter_config_json(cfg: AdapterConfig, base_model_path: str, model=None) -> dict:
    """adapter_config.json for PEFT. Default targets export mmE5's suffix list; custom targets need the model
    (its adapted modules are listed by exact name)."""
    if model is not None:
        targets = peft_target_modules(model)
    elif tuple(cfg.targets) == MME5_TARGETS:
        targets = list(MME5_PEFT_TARGETS)
    else:
        raise ValueError("custom adapter targets cannot be named for PEFT without the model: pass model=")
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_path,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_dora": cfg.kind == "dora",
            "init_lora_weights": "gaussian", "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "modules_to_save": None}
