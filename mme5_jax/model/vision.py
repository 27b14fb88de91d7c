"""The Mllama vision tower: tiled ViT-H/14 with gated aspect-ratio embeddings and a gated global encoder.

Follows `MllamaVisionModel` step for step, including its quirks: patches are padded to a multiple of 8, and the
aspect-ratio attention mask only masks (query, key) pairs where *both* are padding.
"""
import math

import jax.numpy as jnp
from flax import nnx

from mme5_jax.config import VisionConfig
from mme5_jax.model.layers import ACTIVATIONS, LayerNorm, Linear, Stack, attention, param, scoped
from mme5_jax.model.masks import PaddingPairMask


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, param_dtype, rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.o_proj = Linear(d, d, ("heads", "embed"), **kw)
        self.num_heads = cfg.num_attention_heads

    @scoped("vision_attn")
    def __call__(self, x, mask):
        b, n, _ = x.shape
        def split(t):
            return t.reshape(b, n, self.num_heads, -1)
        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask)
        return self.o_proj(out)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=True)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = cfg.hidden_act

    @scoped("vision_mlp")
    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class VisionLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, gated: bool, dtype, param_dtype, rngs):
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.self_attn = VisionAttention(cfg, dtype, param_dtype, rngs)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = VisionMLP(cfg, dtype, param_dtype, rngs)
        self.gated = gated
        if gated:
            self.gate_attn = param(None, (1,), ("norm",), param_dtype, init="ones")
            self.gate_ffn = param(None, (1,), ("norm",), param_dtype, init="ones")
            self.gate_attn[...] = self.gate_attn[...] * (math.pi / 4)
            self.gate_ffn[...] = self.gate_ffn[...] * (math.pi / 4)

    def __call__(self, x, mask, collect=False):
        h = self.self_attn(self.input_layernorm(x), mask)
        if self.gated:
            h = jnp.tanh(self.gate_attn[...]).astype(h.dtype) * h
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.gated:
            h = jnp.tanh(self.gate_ffn[...]).astype(h.dtype) * h
        x = x + h
        return (x, x) if collect else x


def local_segments(cfg: VisionConfig):
    """Splits the local encoder at the intermediate-output layers, so each segment is one scan: [(start, stop)]."""
    bounds, start = [], 0
    for i in cfg.intermediate_layers_indices:
        bounds.append((start, i + 1))
        start = i + 1
    if start < cfg.num_hidden_layers:
        bounds.append((start, cfg.num_hidden_layers))
    return bounds


class VisionModel(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 remat: str = "none"):
        d, t = cfg.hidden_size, cfg.max_num_tiles
        self.cfg = cfg
        self.dtype = dtype
        patch_dim = cfg.num_channels * cfg.patch_size**2
        self.patch_embedding = Linear(patch_dim, d, ("patch", "embed"), dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        self.class_embedding = param(rngs, (d,), ("embed",), param_dtype)
        self.pos_gate = param(None, (1,), ("norm",), param_dtype)
        self.pos_embedding = param(rngs, (cfg.num_patches, d), ("patches", "embed"), param_dtype)
        # Per-tile tables [aspect ratios, tiles * (patches *) d]: looked up per sample, they are added to the
        # batch-sharded activations, so they are replicated (`tile_embed`); sharded on `embed`, the lookup would be
        # split across tiles and the whole per-tile activation gathered to add it.
        self.tile_pos_embedding = param(rngs, (cfg.max_aspect_ratio_id + 1, t * cfg.num_patches * d),
                                        ("aspect_ratio", "tile_embed"), param_dtype)
        self.pre_tile_embedding = param(rngs, (cfg.max_aspect_ratio_id + 1, t * d), ("aspect_ratio", "tile_embed"),
                                        param_dtype)
        self.pre_tile_gate = param(None, (1,), ("norm",), param_dtype)
        self.post_tile_embedding = param(rngs, (cfg.max_aspect_ratio_id + 1, t * d), ("aspect_ratio", "tile_embed"),
                                         param_dtype)
        self.post_tile_gate = param(None, (1,), ("norm",), param_dtype)
        self.layernorm_pre = LayerNorm(d, 1e-5, param_dtype=param_dtype)
        self.layernorm_post = LayerNorm(d, 1e-5, param_dtype=param_dtype)
        def make(gated):
            return (lambda r: VisionLayer(cfg, gated, dtype, param_dtype, r))
        self.local_segments = nnx.List([Stack(make(False), stop - start, rngs, remat)
                                        for start, stop in local_segments(cfg)])
        self.global_layers = Stack(make(True), cfg.num_global_layers, rngs, remat)

    def patchify(self, pixel_values):
        """[N,C,H,W] -> [N, patches, C*p*p] in the order of torch's Conv2d weight flattening."""
        n, c, _, _ = pixel_values.shape
        p, g = self.cfg.patch_size, self.cfg.patches_per_side
        x = pixel_values[:, :, : g * p, : g * p].reshape(n, c, g, p, g, p)
        return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)

    def __call__(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """pixel_values [B,T,C,H,W], aspect_ratio_ids [B], aspect_ratio_mask [B,T] -> [B, T, patches+1, out_dim]."""
        cfg = self.cfg
        b, t = pixel_values.shape[:2]
        d, n_patch = cfg.hidden_size, cfg.num_patches
        x = self.patch_embedding(self.patchify(pixel_values.reshape(b * t, *pixel_values.shape[2:])))
        x = x.reshape(b, t, n_patch - 1, d)
        x = x + self._gated(self.pre_tile_embedding, self.pre_tile_gate, aspect_ratio_ids).reshape(b, t, 1, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, t, 1, d))
        x = jnp.concatenate([cls, x], axis=2)
        gate = jnp.tanh(self.pos_gate[...].astype(jnp.float32)).astype(x.dtype)
        x = x + (1 - gate) * self.pos_embedding[...].astype(x.dtype)
        tile_pos = self.tile_pos_embedding[...][aspect_ratio_ids].astype(x.dtype).reshape(b, t, n_patch, d)
        x = x + gate * tile_pos
        x = self.layernorm_pre(x)

        n_pad = cfg.padded_num_patches
        x = jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n_patch), (0, 0))).reshape(b, t * n_pad, d)
        valid = aspect_ratio_mask.astype(bool)[:, :, None] & (jnp.arange(n_pad) < n_patch)[None, None, :]
        mask = PaddingPairMask(~valid.reshape(b, t * n_pad))

        intermediates = []
        for segment in self.local_segments:
            x, _ = segment(x, mask)
            intermediates.append(x)
        intermediates = intermediates[: len(cfg.intermediate_layers_indices)]
        x = self.layernorm_post(x)
        x = x.reshape(b, t, n_pad, d)
        x = x + self._gated(self.post_tile_embedding, self.post_tile_gate, aspect_ratio_ids).reshape(b, t, 1, d)
        x, _ = self.global_layers(x.reshape(b, t * n_pad, d), mask)
        # HF stacks the intermediate layers on a trailing axis before flattening: features interleave as [d, layer].
        inter = jnp.stack(intermediates, axis=-1).reshape(b, t, n_pad, d * len(intermediates))
        x = x.reshape(b, t, n_pad, d)
        return jnp.concatenate([x, inter], axis=-1)[:, :, :n_patch]

    @staticmethod
    def _gated(table, gate, ids):
        return table[...][ids] * jnp.tanh(gate[...])
