"""Blocked attention, and the fused path GPUs take, equal the unblocked computation, values and gradients, for every
mask kind."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mme5_jax.model import layers
from mme5_jax.model.layers import attention, fused_attention
from mme5_jax.model.masks import CausalMask, PaddingPairMask, TileMask

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process


def dense_reference(q, k, v, bias):
    """Plain softmax(q k^T / sqrt(d) + bias) v with grouped-query heads, bias [B, Q, K]."""
    b, q_len, heads, head_dim = q.shape
    k = jnp.repeat(k, heads // k.shape[2], axis=2)
    v = jnp.repeat(v, heads // v.shape[2], axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(head_dim) + bias[:, None]
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision="highest")
    return out.reshape(b, q_len, heads * head_dim)


def masks(b, q_len, k_len, rng):
    """(mask, equivalent dense bias [B, Q, K]) for each kind; self-attention kinds need q_len == k_len."""
    neg = layers.NEG_INF
    key_valid = np.arange(k_len)[None] < rng.integers(1, k_len + 1, (b, 1))
    causal = np.tril(np.ones((q_len, k_len), bool))[None] & key_valid[:, None]
    invalid = rng.random((b, k_len)) < 0.3
    tiles = rng.random((b, q_len, 4)) < 0.5
    tiles[:, 0] = False  # a row that sees no tile attends to every key
    allowed = np.repeat(tiles, k_len // 4, axis=-1)
    tile_bias = np.where(tiles.any(-1, keepdims=True) & ~allowed, neg, 0.0)
    return {"none": (None, np.zeros((b, q_len, k_len))),
            "causal": (CausalMask(jnp.asarray(key_valid)), np.where(causal, 0.0, neg)),
            "padding_pair": (PaddingPairMask(jnp.asarray(invalid)),
                             np.where(invalid[:, :, None] & invalid[:, None, :], neg, 0.0)),
            "tile": (TileMask(jnp.asarray(tiles), k_len // 4), tile_bias)}


@pytest.mark.parametrize("kind", ["none", "causal", "padding_pair", "tile"])
@pytest.mark.parametrize("budget", [None, 1 << 14, 3000], ids=["whole", "rows", "query_blocks"])
def test_blocked_attention_matches_dense(monkeypatch, kind, budget):
    b, q_len, heads, kv_heads, head_dim = 4, 20, 4, 2, 8  # 20 queries: the last query block is padded
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, q_len, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, q_len, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, q_len, kv_heads, head_dim)), jnp.float32)
    mask, bias = masks(b, q_len, q_len, rng)[kind]
    if budget is not None:
        monkeypatch.setitem(layers.SCORE_BLOCK_BYTES, jax.default_backend(), budget)
    def ours(q, k, v):
        return attention(q, k, v, mask)
    def ref(q, k, v):
        return dense_reference(q, k, v, jnp.asarray(bias, jnp.float32))
    # float32: ~50 roundings (8-dim scores, 20-key sums) x 1.2e-7 = 6e-6 of terms up to max|v| ~ 3 -> 2e-5.
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-5, atol=2e-5)
    weights = jnp.asarray(rng.standard_normal((b, q_len, heads * head_dim)), jnp.float32)
    def loss(fn):
        return (lambda *a: jnp.sum(fn(*a) * weights))
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        # float32: the backward's ~60 roundings (8-dim and 20-key sums) x 1.2e-7 = 7e-6 of terms up to ~3 -> 2e-5.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["none", "causal", "padding_pair", "tile"])
def test_fused_attention_matches_dense(kind):
    """The mask as jax.nn.dot_product_attention gets it (cuDNN on GPU; its XLA implementation here)."""
    b, q_len, heads, kv_heads, head_dim = 3, 16, 4, 2, 8
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, q_len, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, q_len, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    mask, bias = masks(b, q_len, q_len, rng)[kind]
    def fused(q, k, v):
        return fused_attention(q, k, v, mask, "xla")
    def ref(q, k, v):
        return dense_reference(q, k, v, jnp.asarray(bias, jnp.float32))
    # float32: ~40 roundings (8-dim scores, 16-key sums) x 1.2e-7 = 5e-6 of terms up to max|v| ~ 3.2 -> 2e-5.
    np.testing.assert_allclose(jax.jit(fused)(q, k, v), ref(q, k, v), rtol=1e-5, atol=2e-5)
    def loss(fn):
        return (lambda *a: jnp.sum(jnp.sin(fn(*a))))
    for got, want in zip(jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        # float32: the backward's ~50 roundings (8-dim and 16-key sums) x 1.2e-7 = 6e-6 of terms up to ~3 -> 2e-5.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend, dtype, head_dim, q_len, expected", [
    ("gpu", jnp.bfloat16, 80, 4128, True), ("gpu", jnp.float16, 128, 64, True),
    ("gpu", jnp.float32, 80, 4128, False), ("cpu", jnp.bfloat16, 80, 4128, False), ("tpu", jnp.bfloat16, 80, 64, False),
    ("gpu", jnp.bfloat16, 36, 64, False), ("gpu", jnp.bfloat16, 256, 64, False), ("gpu", jnp.bfloat16, 80, 63, False)])
def test_cudnn_only_where_it_applies(monkeypatch, backend, dtype, head_dim, q_len, expected):
    monkeypatch.setattr(layers.jax, "default_backend", lambda: backend)
    q = jax.ShapeDtypeStruct((2, q_len, 4, head_dim), dtype)
    k = jax.ShapeDtypeStruct((2, 64, 2, head_dim), dtype)
    assert layers._cudnn_applies(q, k) is expected


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("kind", ["none", "causal", "padding_pair", "tile"])
def test_cudnn_attention_matches_float32_on_gpu(kind):
    """On a GPU, bf16 attention (cuDNN) against the blocked float32 path on the same inputs, values and gradients."""
    b, q_len, heads, kv_heads, head_dim = 2, 1056, 8, 2, 80
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((b, q_len, h, head_dim)), jnp.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    mask, _ = masks(b, q_len, q_len, rng)[kind]
    assert layers._cudnn_applies(q, k)
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, ref = (jax.jit(lambda *a: attention(*a, mask))(*xs) for xs in ((q, k, v), as_f32))
    # bf16 (8 mantissa bits): P and the output round to 2^-9 ~ 2e-3; sum p|v| ~ 5x max|out| over 1056 keys -> 2e-2.
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2 * float(jnp.abs(ref).max()))
    def loss(*a):
        return jnp.sum(jnp.sin(attention(*a, mask).astype(jnp.float32)))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for got, want in zip(grad(q, k, v), grad(*as_f32)):
        # bf16 backward: dO, P and dS round to 2^-9 ~ 2e-3, on sums of terms up to ~5x max|grad| -> 3e-2.
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2 * float(jnp.abs(want).max()))
