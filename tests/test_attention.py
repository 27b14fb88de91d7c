"""Blocked attention equals the unblocked computation, values and gradients, for every mask kind."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mme5_jax.model import layers
from mme5_jax.model.layers import CausalMask, PaddingPairMask, TileMask, attention


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
    tiles[:, 0] = False  # a row that sees no tile attends uniformly
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
    ours = lambda q, k, v: attention(q, k, v, mask)
    ref = lambda q, k, v: dense_reference(q, k, v, jnp.asarray(bias, jnp.float32))
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    weights = jnp.asarray(rng.standard_normal((b, q_len, heads * head_dim)), jnp.float32)
    loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * weights))
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
