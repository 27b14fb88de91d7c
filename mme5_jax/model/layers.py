"""Building blocks shared by the vision tower and the text decoder.

Kernels are stored [in, out] (the transpose of torch's [out, in]) with a logical axis name per dimension, so the
converter is a pure transpose and the sharding rules table (mme5_jax.sharding) decides the mesh placement. Norms,
softmax and RoPE run in float32 whatever the compute dtype, as in Hugging Face.
"""
import contextlib
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mme5_jax.model import ATTENTION_RESIDUALS, REMAT_POLICIES, splash
from mme5_jax.model.masks import CausalMask, PaddingPairMask, TileMask
from mme5_jax.sharding import batch_divisor, load_rules, logical_to_spec

NEG_INF = float(jnp.finfo(jnp.float32).min)
# Hugging Face ACT2FN names; "gelu" is the exact (erf) GELU.
ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu,
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def scoped(name):
    """Runs a call under `jax.named_scope(name)`: XLA's metadata (op_name) keeps the names, and `mme5 plan` sums a
    compiled program's bytes by them. A rematerialised layer drops the scopes around it, so a layer's own name
    says which tower it belongs to."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with jax.named_scope(name):
                return fn(*args, **kwargs)
        return call
    return wrap


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

    @scoped("norm")
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

    @scoped("norm")
    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


# Largest float32 score block [rows, heads, queries, keys] attention materialises at once on a device (of its own
# rows and heads under a mesh): on CPU small enough to stay in cache (the vision tower of bench/cpu_small.yaml runs
# 2x faster than with one 143 MB block), on accelerators large enough to keep them busy while bounding memory (the
# 11B vision tower's full score matrix is 2.6 GB per image). On GPU, bf16/fp16 attention goes to cuDNN's flash
# attention instead (`fused_attention`).
SCORE_BLOCK_BYTES = {"cpu": 4 << 20}
DEFAULT_SCORE_BLOCK_BYTES = 1 << 30
_rules = functools.cache(load_rules)  # the bundled table: where attention keeps rows and heads under a mesh


_TARGET_PLATFORM = []


@contextlib.contextmanager
def target_platform(name):
    """Trace attention for platform `name` ("cpu", "gpu", "tpu") instead of the running backend: an ahead-of-time
    compile for a TPU topology on a CPU host must choose the TPU's kernels and block sizes."""
    _TARGET_PLATFORM.append(name)
    try:
        yield
    finally:
        _TARGET_PLATFORM.pop()


def platform():
    """The platform attention is traced for: the innermost `target_platform`, else JAX's default backend."""
    return _TARGET_PLATFORM[-1] if _TARGET_PLATFORM else jax.default_backend()


# The kind of attention each mask stands for, as kernel reports name them.
ATTENTION_KINDS = {PaddingPairMask: "vision self-attention", CausalMask: "text self-attention",
                   TileMask: "cross-attention"}
_KERNEL_RECORDS = []


@contextlib.contextmanager
def recorded_kernels():
    """Yields {attention kind: (kernel, why not splash or None)}, filled as attention is traced inside the block:
    what an ahead-of-time plan reports, read from the trace rather than predicted."""
    chosen = {}
    _KERNEL_RECORDS.append(chosen)
    try:
        yield chosen
    finally:
        _KERNEL_RECORDS.pop()


@scoped("attention")
def attention(q, k, v, mask):
    """Softmax attention; q [B,Q,H,D], k/v [B,K,KVH,D] (grouped-query), `mask` one of `masks` or None.

    Every query sees all keys at once, so each row's softmax is exact; rows and then queries are split into blocks
    whose scores fit `SCORE_BLOCK_BYTES` per device, and a block's scores are recomputed in the backward pass
    instead of stored. Where cuDNN's flash attention applies (GPU), or splash's (TPU), it runs instead.

    Under a mesh (`jax.set_mesh`), rows stay split over the batch axes and heads over the head axes (`_Placement`).
    A loop cannot be split over devices, so the row blocks are strided, block j holding rows j, j + n, ...: the
    loop runs over the rows each device holds, and no device gathers or computes another's rows.
    """
    kv_heads = k.shape[2]
    place = _Placement.of((q.shape[0], kv_heads, q.shape[2] // kv_heads))
    kernel, why = _choose_kernel(q, k, mask, place)
    for chosen in _KERNEL_RECORDS:
        chosen[ATTENTION_KINDS.get(type(mask), "unmasked attention")] = (kernel, why)
    if kernel == "cudnn":
        return fused_attention(q, k, v, mask, "cudnn")
    if kernel == "splash":
        return splash.splash_attention(q, k, v, mask, placement=place.spec)
    return _blocked_attention(q, k, v, mask, place)


def _choose_kernel(q, k, mask, place):
    """-> (kernel, why not splash): "cudnn" on GPU where it applies, "splash" on TPU where it applies, else
    "blocked". Splash is exact for one image per text, as the processor gives (see `splash`)."""
    if _cudnn_applies(q, k):
        return "cudnn", None
    if platform() != "tpu":
        return "blocked", None
    why = splash.why_not(q, k, mask)
    if why is None and place.spec is not None and PartitionSpec.UNCONSTRAINED in place.spec:
        why = f"{q.shape[0]} rows do not divide over the mesh's batch axes"
    return ("blocked", why) if why else ("splash", None)


def _blocked_attention(q, k, v, mask, place):
    b, q_len, heads, head_dim = q.shape
    kv_heads, k_len = k.shape[2], k.shape[1]
    # Head-major [B, KVH, G, Q, D] / [B, KVH, K, D]: every block's matmuls read contiguous memory.
    q = q.reshape(b, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    q, k, v, mask = place.constrain((q, k, v, mask))
    local = b // place.row_shards
    budget = SCORE_BLOCK_BYTES.get(platform(), DEFAULT_SCORE_BLOCK_BYTES)
    query_bytes = 4 * heads // place.head_shards * k_len
    if local * q_len * query_bytes <= budget:
        out = _attend(q, k, v, mask, jnp.arange(q_len))
    else:
        rows = max(d for d in range(1, local + 1) if local % d == 0 and (d * q_len * query_bytes <= budget or d == 1))
        q_block = -(-q_len // -(-rows * q_len * query_bytes // budget))
        n = local // rows

        def blocks(x):
            return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)

        def step(xs):
            return _attend_query_blocks(*place.constrain(xs), q_block, place)

        out = jax.lax.map(jax.checkpoint(step), place.constrain(jax.tree.map(blocks, (q, k, v, mask)), lead=1))
        out = jnp.swapaxes(place.constrain(out, lead=1), 0, 1).reshape(b, *out.shape[2:])
    return out.transpose(0, 3, 1, 2, 4).reshape(b, q_len, heads * head_dim)


@dataclass(frozen=True)
class _Placement:
    """Where attention's operands live on the mesh in context, as the bundled rules table places the logical axes
    `batch` (rows), `kv_heads` and `heads` (the query heads of a KV head) with `mme5_jax.sharding.logical_to_spec`.

    `spec` names the mesh axes of the head-major query's first three dimensions; None without a mesh. Rows the
    batch axes do not divide are left to the partitioner."""

    spec: tuple | None = None
    row_shards: int = 1
    head_shards: int = 1

    @classmethod
    def of(cls, shape):
        """`shape` = (rows, KV heads, query heads per KV head)."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return cls()
        spec = tuple(logical_to_spec(("batch", "kv_heads", "heads"), shape, mesh, _rules()))
        def size(axes):
            return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)) if a)
        row_shards = size(spec[0])
        if row_shards == 1 and batch_divisor(mesh, _rules()) > 1:
            spec = (PartitionSpec.UNCONSTRAINED,) + spec[1:]
        return cls(spec, row_shards, size(spec[1]) * size(spec[2]))

    def constrain(self, tree, lead=0):
        """Constrains each array of `tree` laid out [`lead` loop axes, rows, ...]: a query or output [.., B, KVH,
        G, Q, D] (5 dimensions), a key or value [.., B, KVH, K, D] (4), a mask array [.., B, ...] (below 4)."""
        if self.spec is None:
            return tree

        def one(x):
            ndim = x.ndim - lead
            spec = self.spec if ndim == 5 else self.spec[:2] if ndim == 4 else self.spec[:1]
            return jax.lax.with_sharding_constraint(x, PartitionSpec(*(None,) * lead, *spec))

        return jax.tree.map(one, tree)


def _cudnn_applies(q, k):
    """cuDNN's flash attention: GPU, half precision, head dim a multiple of 8 up to 128, even lengths (its rule for
    a bias in training)."""
    head_dim = q.shape[-1]
    return (platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128 and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def fused_attention(q, k, v, mask, implementation):
    """`attention` through jax.nn.dot_product_attention (`implementation` "cudnn" on GPU; "xla" checks it on CPU).

    The mask goes in as one boolean [B, 1, Q, K] array, which cuDNN turns into a constant bias inside its kernel:
    scores never reach memory, the point on GPU, where the blocked path is bound by writing them."""
    b, q_len, heads, head_dim = q.shape
    allowed = None if mask is None else mask.allowed(jnp.arange(q_len))
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation=implementation)
    return out.reshape(b, q_len, heads * head_dim)


def _attend_query_blocks(q, k, v, mask, q_block, place):
    """`_attend` for blocks of `q_block` queries (the last one padded) against all keys, placed as `place` says."""
    b, kv_heads, groups, q_len, head_dim = q.shape
    if q_block >= q_len:
        return _attend(q, k, v, mask, jnp.arange(q_len))
    n = -(-q_len // q_block)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, n * q_block - q_len), (0, 0)))
    q_blocks = jnp.moveaxis(q.reshape(b, kv_heads, groups, n, q_block, head_dim), 3, 0)

    def one(xs):
        i, q_i = xs
        return _attend(place.constrain(q_i), k, v, mask, i * q_block + jnp.arange(q_block))

    out = place.constrain(jax.lax.map(jax.checkpoint(one), (jnp.arange(n), place.constrain(q_blocks, lead=1))), lead=1)
    return jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, groups, n * q_block, head_dim)[:, :, :, :q_len]


def _attend(q, k, v, mask, positions):
    """q [B,KVH,G,Q,D] at query `positions`, k/v [B,KVH,K,D] -> [B,KVH,G,Q,D]; scores and softmax in float32.

    The scale goes on q and the softmax's division on the output, so the [Q, K] scores take three passes over
    memory (matmul, max, exp-sum) instead of five."""
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
    if mask is not None:
        scores = scores + jnp.where(mask.allowed(positions), 0.0, NEG_INF)[:, :, None]
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = jnp.einsum("bhgqk,bhkd->bhgqd", weights.astype(v.dtype), v, precision=jax.lax.Precision.HIGHEST)
    return (out.astype(jnp.float32) / jnp.sum(weights, axis=-1, keepdims=True)).astype(v.dtype)


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
            policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[self.remat])
            if self.remat == "full_keep_attention":
                policy = policy(ATTENTION_RESIDUALS)
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        return jax.lax.scan(body, x, state)
