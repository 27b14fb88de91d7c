"""Splash attention: `layers.attention` through the Pallas TPU flash kernels of
`jax.experimental.pallas.ops.tpu.splash_attention`, for the model's three masks.

Splash takes a static mask (compiled into the kernel; whole masked blocks are skipped) AND-ed with segment ids
(a dynamic equality rule: query i sees key j only if their ids are equal). The model's masks are dynamic, so each
is rewritten into that form, exactly:

- `CausalMask` (text self-attention): the static causal mask, key padding as key ids 1 (valid) / 0 (padding).
- `PaddingPairMask` (vision): HF masks a pair only when both are padding, so valid queries see every key and
  padding queries see the valid keys only. That is no equality rule, but it is a score bias: HF adds finfo.min
  where both are padding. One spare lane of the padded head dim carries it: a padding query holds -2^30 there and
  a padding key 1, so their score drops by 2^30 (its exponential is exactly 0 in float32) and every other score is
  unchanged. One kernel call, as cheap as unmasked attention. A head dim that fills its lanes (no spare lane) takes
  two calls instead, selected per row: every query against all keys, and every query against the valid keys.
- `TileMask` (cross-attention): a row sees the tiles of its set, a row with an empty set sees every token. Rows
  with a set use ids: a query's id is its set as a bit field, a token's id the set of the rows that see its tile;
  exact when any two rows' non-empty sets are equal or disjoint (one image per sample, as this model's inputs
  are). Rows with an empty set take a second, unmasked call.

Sequences are padded to a multiple of 128 (padded keys get id -1 or 0, so no query sees them) and head dims to a
multiple of 128 (zeros in q and k add nothing to a score; zero columns of v are sliced off the output). Scores,
softmax and the output accumulator are float32 inside the kernel, as `layers.attention` keeps them.

Only a row that sees no key at all may differ from `layers.attention`: HF's finfo.min bias makes it the mean of all
values, splash the mean of the blocks it visits (the vision bias lane gives HF's mean). With the model's masks such
a row exists only in a sample with no valid token (a left-padded or empty text, an image with no valid tile, as
the packed batch's padding images are), and it is never a key another row sees.
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from mme5_jax.model import ATTENTION_RESIDUALS
from mme5_jax.model.masks import CausalMask, PaddingPairMask, TileMask

LANES = 128
# Block sizes tried, largest first: 512 keeps the MXU busy on every TPU generation while a [512, 512] float32 score
# block and its q/k/v blocks stay well inside VMEM; 384 divides 4224, the padded 4-tile vision sequence.
BLOCK_CANDIDATES = (512, 384, 256, 128)
# Scoped VMEM a Mosaic kernel may allocate by default, per TPU generation (a substring of the device kind, lower
# case; first match wins): a kernel that exceeds it fails to compile, and libtpu names the limit (16 MiB on v5e
# and v5p, 32 MiB on v6e).
SCOPED_VMEM_BYTES = (("tpu v6", 32 << 20),)
DEFAULT_SCOPED_VMEM_BYTES = 16 << 20
# Share of that limit the fused backward's blocks may take: the rest is for the kernel's own intermediates.
VMEM_SHARE = 7 / 8
# Segment ids are int32 and a query's id is its tile set as a bit field.
MAX_TILES = 30
# The vision bias lane: exact in bfloat16, and far below any score (|q.k| / sqrt(d) is tens at most).
PADDING_PAIR_BIAS = -(2.0**30)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _block(padded_len):
    return next(b for b in BLOCK_CANDIDATES if padded_len % b == 0)


def scoped_vmem_bytes():
    """The default scoped VMEM of the TPU traced for: the mesh's devices (abstract ones too, as an ahead-of-time
    compile for a topology has), else the default device's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    kind = (device.device_kind if device is not None else jax.devices()[0].device_kind).lower()
    return next((limit for key, limit in SCOPED_VMEM_BYTES if key in kind), DEFAULT_SCOPED_VMEM_BYTES)


def dkv_vmem_bytes(bq, bkv_dkv, head_dim, itemsize):
    """VMEM the fused backward's blocks take: double-buffered k, v, their gradients and their float32 accumulators
    per key block, lane-wide int32 key ids, and the query block's q, dO, dq, dq accumulator and statistics
    (libtpu's own count depends on the program around the kernel: at bq 256, 4224 keys, head dim 128, bfloat16,
    this gives 21.30 MiB, libtpu 21.27 MiB in the 11B v5p-64 step and 17.16 MiB alone at 20 rows a chip)."""
    per_key = 2 * (2 * head_dim * itemsize + 2 * head_dim * itemsize + 2 * head_dim * 4 + LANES * 4)
    per_query = 2 * (2 * head_dim * itemsize + head_dim * itemsize + head_dim * 4 + 3 * 8 * 4)
    return bkv_dkv * per_key + bq * per_query


def block_sizes(q_len, k_len, head_dim, itemsize, scoped_vmem):
    """-> (padded query length, padded key length, kernel BlockSizes): lengths rounded up to a multiple of 128
    (the kernel's lane width), and per sequence the largest candidate block that divides its padded length, so
    padding never exceeds 127 positions. The backward is one fused kernel (dq with dk and dv): 5 matmuls a block
    instead of 3 + 4 in separate dq and dk/dv kernels, which both recompute the scores and the probabilities'
    gradient. It computes in the forward's blocks, but loads keys in the longest multiple of them that divides
    the padded length and fits `VMEM_SHARE` of `scoped_vmem`: it writes one partial dq per key block and sums
    them after (at 384-blocks, the 11B vision tower's 11 partials were 11% of a layer's HBM bytes on v6e)."""
    q_pad, k_pad = _round_up(q_len, LANES), _round_up(k_len, LANES)
    bq, bkv = _block(q_pad), _block(k_pad)
    d_pad = _round_up(head_dim, LANES)
    fits = [m for m in range(bkv, k_pad + 1, bkv)
            if k_pad % m == 0 and dkv_vmem_bytes(bq, m, d_pad, itemsize) <= VMEM_SHARE * scoped_vmem]
    sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                  block_kv_dkv=max(fits, default=bkv), block_kv_dkv_compute=bkv,
                                  use_fused_bwd_kernel=True)
    return q_pad, k_pad, sizes


def why_not(q, k, mask):
    """Why splash cannot compute `layers.attention(q, k, v, mask)` for these static shapes and dtypes, or None."""
    if q.ndim != 4 or k.ndim != 4:
        return f"q and k must be [B, L, heads, D], got {q.shape} and {k.shape}"
    if q.dtype != k.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
        return f"q and k must share float32 or bfloat16, got {q.dtype} and {k.dtype}"
    (b, q_len, heads, head_dim), (kb, k_len, kv_heads, k_dim) = q.shape, k.shape
    if b != kb or head_dim != k_dim or heads % kv_heads:
        return f"q {q.shape} and k {k.shape} do not match as grouped-query attention"
    if isinstance(mask, (CausalMask, PaddingPairMask)) and q_len != k_len:
        return f"{type(mask).__name__} is self-attention, but {q_len} queries meet {k_len} keys"
    if isinstance(mask, TileMask):
        tiles = mask.tiles.shape[-1]
        if tiles > MAX_TILES:
            return f"{tiles} tiles do not fit an int32 bit field"
        if tiles * mask.tokens_per_tile != k_len:
            return f"{tiles} tiles of {mask.tokens_per_tile} tokens are not the {k_len} keys"
    elif mask is not None and not isinstance(mask, (CausalMask, PaddingPairMask)):
        return f"no splash form for {type(mask).__name__}"
    return None


def splash_applies(q, k, mask) -> bool:
    """Whether `splash_attention` computes `layers.attention(q, k, v, mask)`: a static rule (see `why_not`)."""
    return why_not(q, k, mask) is None


def _kernel(causal, heads, q_pad, k_pad, sizes, interpret):
    """One example's kernel [heads, Q, D] x [kv_heads, K, D] -> [heads, Q, D]. Built at every trace (the library
    caches the block tables it derives from a mask), so its tables become constants of that trace, also under a
    mesh of devices this host cannot hold arrays on (an ahead-of-time compile for a TPU topology)."""
    shape = (q_pad, k_pad)
    head_mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret,
                                      residual_checkpoint_name=ATTENTION_RESIDUALS)


def splash_attention(q, k, v, mask, *, interpret=False, placement=None):
    """`layers.attention(q, k, v, mask)` by splash kernels: q [B,Q,H,D], k/v [B,K,KVH,D] -> [B, Q, H*D].

    The kernels are TPU (Mosaic) kernels; `interpret=True` runs them anywhere, slowly, for tests. XLA cannot split
    a kernel over devices, so under a mesh (`jax.set_mesh`) `placement` = (batch axes, KV-head axes, axes of the
    query heads within a KV head), each a mesh axis name, a tuple of names or None, says how rows and heads are
    split; each device then runs the kernels on its own rows and heads (`jax.shard_map`)."""
    reason = why_not(q, k, mask)
    if reason is not None:
        raise ValueError(reason)
    if placement is None:
        return _local_attention(q, k, v, mask, interpret)
    b, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    rows, kv_axes, group_axes = placement
    # Queries as [B, Q, KVH, G, D], so a device's query heads are whole groups of the KV heads it holds.
    grouped, keys = P(rows, None, kv_axes, group_axes, None), P(rows, None, kv_axes, None)

    def local(q, k, v, mask):
        out = _local_attention(q.reshape(*q.shape[:2], -1, head_dim), k, v, mask, interpret)
        return out.reshape(q.shape)

    q = q.reshape(b, q_len, kv_heads, heads // kv_heads, head_dim)
    out = jax.shard_map(local, in_specs=(grouped, keys, keys, P(rows)), out_specs=grouped, check_vma=False)(q, k, v,
                                                                                                          mask)
    return out.reshape(b, q_len, heads * head_dim)


def _local_attention(q, k, v, mask, interpret):
    """`splash_attention` of the rows and heads at hand."""
    b, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    q_pad, k_pad, sizes = block_sizes(q_len, k_len, head_dim, q.dtype.itemsize, scoped_vmem_bytes())
    d_pad = _round_up(head_dim, LANES)
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)

    def head_major(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - head_dim)))
        return x.transpose(0, 2, 1, 3)

    q, k, v = head_major(q, q_pad), head_major(k, k_pad), head_major(v, k_pad)

    def ids(x, length, fill):
        return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, length - x.shape[1])), constant_values=fill)

    ones_q = jnp.ones((b, q_pad), jnp.int32)
    real_keys = ids(jnp.ones((b, k_len), jnp.int32), k_pad, 0)

    def run(kv_ids, q_ids=ones_q, causal=False):
        kernel = _kernel(causal, heads, q_pad, k_pad, sizes, interpret)
        if kv_ids is None:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(lambda *x: kernel(*x[:3], segment_ids=kernel_lib.SegmentIds(*x[3:])))(q, k, v, q_ids,
                                                                                               kv_ids)

    everything = None if k_pad == k_len else real_keys
    if mask is None:
        out = run(everything)
    elif isinstance(mask, CausalMask):
        out = run(ids(mask.key_valid, k_pad, 0), causal=True)
    elif isinstance(mask, PaddingPairMask) and d_pad > head_dim:
        lane = jnp.asarray(PADDING_PAIR_BIAS, q.dtype) * ids(mask.invalid, q_pad, 0).astype(q.dtype)
        q = q.at[..., head_dim].set(lane[:, None, :])
        k = k.at[..., head_dim].set(ids(mask.invalid, k_pad, 0).astype(k.dtype)[:, None, :])
        out = run(everything)
    elif isinstance(mask, PaddingPairMask):
        padding = ids(mask.invalid, q_pad, 0).astype(bool)
        out = jnp.where(padding[:, None, :, None], run(ids(~mask.invalid, k_pad, 0)), run(everything))
    else:
        tiles = mask.tiles
        bits = jnp.sum(jnp.where(tiles, 1 << jnp.arange(tiles.shape[-1]), 0), axis=-1)
        token_ids = jnp.repeat(jnp.max(jnp.where(tiles, bits[..., None], 0), axis=1), mask.tokens_per_tile, axis=-1)
        sees_tiles = ids(bits, q_pad, 0).astype(bool)
        out = jnp.where(sees_tiles[:, None, :, None], run(ids(token_ids, k_pad, -1), ids(bits, q_pad, 0)),
                        run(everything))
    return out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3).reshape(b, q_len, heads * head_dim)

