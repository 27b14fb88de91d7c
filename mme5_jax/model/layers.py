"""Building blocks shared by the vision tower and the text decoder.

Kernels are stored [in, out] (the transpose of torch's [out, in]) with a logical axis name per dimension, so the
converter is a pure transpose and the sharding rules table (mme5_jax.sharding) decides the mesh placement. Norms,
softmax and RoPE run in float32 whatever the compute dtype, as in Hugging Face.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = float(jnp.finfo(jnp.float32).min)
# Hugging Face ACT2FN names; "gelu" is the exact (erf) GELU.
ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu,
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal", std=0.02):
    """A parameter tagged with logical axes. Without rngs it is zeros/ones, as when weights will be loaded."""
    assert len(axes) == len(shape), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), computed in `dtype`. Adapters (mme5_jax.model.lora) attach to these modules."""

    def __init__(self, in_features, out_features, axes, *, bias=False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs=None):
        self.kernel = param(rngs, (in_features, out_features), axes, param_dtype)
        self.bias = param(None, (out_features,), axes[1:], param_dtype, init="zeros") if bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    precision=jax.lax.Precision.HIGHEST)
        adapter = getattr(self, "adapter", None)
        if adapter is not None:
            y = adapter(x, y, self.kernel[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, axes=("norm",), *, param_dtype=jnp.float32):
        self.weight = param(None, (dim,), axes, param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim, eps, *, param_dtype=jnp.float32):
        self.scale = param(None, (dim,), ("norm",), param_dtype, init="ones")
        self.bias = param(None, (dim,), ("norm",), param_dtype, init="zeros")
        self.eps = eps

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


def attention(q, k, v, bias):
    """Softmax attention with an additive float32 bias; q [B,Q,H,D], k/v [B,K,KVH,D] (grouped-query aware).

    The bias carries HF's finfo.min masking, so fully masked rows behave exactly as in the reference.
    """
    b, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
    scores = scores * (1.0 / math.sqrt(head_dim))
    if bias is not None:
        scores = scores + bias[:, :, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, q_len, heads * head_dim)


def rope_inv_freq(head_dim, theta, scaling):
    """Inverse RoPE frequencies, with Llama-3 frequency scaling when configured (HF `_compute_llama3_parameters`)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions, inv_freq, dtype):
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE, HF layout (unpermuted q/k kernels); x [B,L,H,D], cos/sin [B,L,D] or [L,D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    if cos.ndim == 3:
        cos, sin = cos[None], sin[None]
    return x * cos + rotated * sin


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Stack(nnx.Module):
    """`n` copies of a layer with parameters stacked on a leading `layers` axis and applied with `lax.scan`.

    Scanning keeps compile time flat in depth. The layer is rebuilt from its stacked state inside the scan body,
    which keeps this compatible with NNX graph and tree modes alike.
    """

    def __init__(self, make_layer, n: int, rngs: nnx.Rngs, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {remat!r} unknown; choose from {sorted(REMAT_POLICIES)}")
        # One trace builds all n layers (vmap over init keys), so construction cost does not grow with depth.
        graphdef = nnx.split(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))[0]
        keys = jax.random.split(rngs.params(), n)
        stacked = jax.vmap(lambda key: nnx.split(make_layer(nnx.Rngs(params=key)))[1])(keys)
        self.layers = nnx.merge(graphdef, stacked)
        for _, variable in nnx.iter_graph(self.layers):
            if isinstance(variable, nnx.Variable):
                variable.set_metadata(logical_axes=("layers",) + tuple(variable.get_metadata("logical_axes", ())))
        self.num_layers = n
        self.remat = remat

    def __call__(self, x, *args, collect: bool = False):
        """Applies the layers in order -> (x, collected): with `collect`, each layer returns (x, extra) and the
        extras come back stacked on a leading axis."""
        graphdef, state = nnx.split(self.layers)

        def body(carry, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            if collect:
                return layer(carry, *args, collect=True)
            return layer(carry, *args), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        return jax.lax.scan(body, x, state)
