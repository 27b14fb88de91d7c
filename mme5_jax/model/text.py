"""The Mllama text decoder: Llama-3.1 self-attention layers interleaved with tanh-gated cross-attention layers.

The layer pattern is factored into a repeated block (4 self + 1 cross in the 11B layout) that is scanned, so
compile time does not grow with depth. HF's cross-attention quirks are reproduced per sample: a sample without an
image skips the cross-attention layers entirely, and text rows that see no image attend, unmasked, to all vision
tokens with only their MLP output masked.
"""
import jax.numpy as jnp
from flax import nnx

from mme5_jax.config import TextConfig
from mme5_jax.model.layers import (ACTIVATIONS, Linear, RMSNorm, Stack, apply_rope, attention, param, rope_cos_sin,
                                   rope_inv_freq, scoped)
from mme5_jax.model.masks import CausalMask, TileMask


class SelfAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, ("heads", "embed"), **kw)
        self.head_dim = hd

    @scoped("text_self_attn")
    def __call__(self, x, ctx):
        b, n, _ = x.shape
        def split(t):
            return t.reshape(b, n, -1, self.head_dim)
        q = apply_rope(split(self.q_proj(x)), ctx["cos"], ctx["sin"])
        k = apply_rope(split(self.k_proj(x)), ctx["cos"], ctx["sin"])
        return self.o_proj(attention(q, k, split(self.v_proj(x)), ctx["self_mask"]))


class CrossAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, ("heads", "embed"), **kw)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.head_dim = hd

    @scoped("text_cross_attn")
    def __call__(self, x, ctx):
        vision = ctx["cross_states"]
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, n, -1, self.head_dim))
        k = self.k_norm(self.k_proj(vision).reshape(b, vision.shape[1], -1, self.head_dim))
        v = self.v_proj(vision).reshape(b, vision.shape[1], -1, self.head_dim)
        return self.o_proj(attention(q, k, v, ctx["cross_mask"]))


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = cfg.hidden_act

    @scoped("text_mlp")
    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class SelfAttentionLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = SelfAttention(cfg, dtype, param_dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, ctx):
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class CrossAttentionLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.cross_attn = CrossAttention(cfg, dtype, param_dtype, rngs)
        self.cross_attn_attn_gate = param(None, (1,), ("norm",), param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs)
        self.cross_attn_mlp_gate = param(None, (1,), ("norm",), param_dtype)

    def __call__(self, x, ctx):
        if ctx["cross_states"] is None:  # text-only batch: HF skips the layer entirely
            return x
        h = x + jnp.tanh(self.cross_attn_attn_gate[...]).astype(x.dtype) * self.cross_attn(
            self.input_layernorm(x), ctx)
        mlp = self.mlp(self.post_attention_layernorm(h)) * ctx["row_mask"]
        h = h + jnp.tanh(self.cross_attn_mlp_gate[...]).astype(x.dtype) * mlp
        return jnp.where(ctx["has_image"][:, None, None], h, x)


def layer_period(kinds) -> int:
    """The shortest repeating unit of the layer pattern (the whole pattern when it does not repeat)."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))


class Block(nnx.Module):
    """One period of the layer pattern, e.g. (self, self, self, cross, self) for the 11B model."""

    def __init__(self, cfg: TextConfig, kinds, dtype, param_dtype, rngs):
        layer_cls = {"self": SelfAttentionLayer, "cross": CrossAttentionLayer}
        self.layers = nnx.List([layer_cls[k](cfg, dtype, param_dtype, rngs) for k in kinds])

    def __call__(self, x, ctx, collect=False):
        outputs = []
        for layer in self.layers:
            x = layer(x, ctx)
            outputs.append(x)
        return (x, jnp.stack(outputs)) if collect else x


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 remat: str = "none"):
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = param(rngs, (cfg.vocab_size + 8, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        kinds = cfg.layer_kinds
        self.period = layer_period(kinds)
        self.blocks = Stack(lambda r: Block(cfg, kinds[: self.period], dtype, param_dtype, r),
                            len(kinds) // self.period, rngs, remat)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids, attention_mask, cross_states=None, cross_attention_mask=None, has_image=None,
                 collect=False):
        """-> final-norm hidden states [B,L,D]; with `collect`, also every layer's output [layers,B,L,D]."""
        cfg = self.cfg
        b, n = input_ids.shape
        x = self.embed_tokens[...][input_ids].astype(self.dtype)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_cos_sin(jnp.arange(n), inv_freq, self.dtype)
        ctx = dict(cos=cos, sin=sin, self_mask=CausalMask(attention_mask.astype(bool)), cross_states=None)
        if cross_states is not None:
            ctx.update(cross_states=cross_states.astype(self.dtype), has_image=has_image.astype(bool),
                       **cross_attention_mask_of(cross_attention_mask, cross_states.shape[1], self.dtype))
        x, collected = self.blocks(x, ctx, collect=collect)
        x = self.norm(x)
        if collect:
            return x, collected.reshape(-1, *collected.shape[2:])
        return x


def cross_attention_mask_of(cross_attention_mask, num_vision_tokens, dtype):
    """HF `_prepare_cross_attention_mask`: the per-tile mask [B,L,1,T] -> a `TileMask` over the vision tokens, and
    a `row_mask` that zeroes the MLP output of rows that may see no tile."""
    b, n = cross_attention_mask.shape[:2]
    tiles = cross_attention_mask.reshape(b, n, -1).astype(bool)
    return dict(cross_mask=TileMask(tiles, num_vision_tokens // tiles.shape[-1]),
                row_mask=tiles.any(-1)[..., None].astype(dtype))
