"""Splash attention (Pallas TPU kernels, run here in interpret mode) equals `layers.attention`, values and gradients,
for the model's three mask kinds, at lengths that are no multiple of the 128-lane blocks and a head dim (80) that is
no multiple of the lane width either. Shapes are scaled down: interpret mode runs each kernel step in Python-level
loops, and a vision tile keeps its padding structure (real patches, then 7 padding) at 160 positions, not 1032."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mme5_jax.model import layers, splash
from mme5_jax.model.masks import CausalMask, PaddingPairMask, TileMask

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process

BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits: a rounding moves a value by at most half of this, relative
VISION_TILE, VISION_REAL, TILES = 160, 153, 4


def vision_case(rng):
    """Four images with 1, 2, 3 and 4 valid tiles: 640 positions, 5 blocks of 128."""
    valid = ((np.arange(TILES)[None, :, None] < np.arange(1, 5)[:, None, None])
             & (np.arange(VISION_TILE) < VISION_REAL)[None, None])
    return (4, 640, 640, 2, 2, 80), PaddingPairMask(jnp.asarray(~valid.reshape(4, -1)))


def text_case(rng):
    """Right-padded texts of 200 and 131 tokens in 200 positions (pads to 256), grouped-query heads."""
    return (2, 200, 200, 4, 2, 80), CausalMask(jnp.asarray(np.arange(200)[None] < np.array([[200], [131]])))


def cross_case(rng):
    """70 text rows over 4 tiles of 41 vision tokens: rows 0-2 see no tile (so every token); sample 0 shows one
    image of 3 tiles, sample 1 two images of 2 tiles each, their rows' tile sets disjoint."""
    tiles = np.zeros((2, 70, TILES), bool)
    tiles[0, 3:, :3] = True
    tiles[1, 3:30, :2] = True
    tiles[1, 30:, 2:] = True
    return (2, 70, 4 * 41, 4, 2, 80), TileMask(jnp.asarray(tiles), 41)


def vision_full_lanes_case(rng):
    """As `vision_case` at head dim 128: no spare lane for the padding bias, so two kernel calls."""
    shape, mask = vision_case(rng)
    return (*shape[:-1], 128), mask


CASES = {"vision": vision_case, "vision_full_lanes": vision_full_lanes_case, "text": text_case, "cross": cross_case}


def inputs(kind, dtype):
    rng = np.random.default_rng(0)
    (b, q_len, k_len, heads, kv_heads, head_dim), mask = CASES[kind](rng)
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)
    q, k, v = normal(b, q_len, heads, head_dim), normal(b, k_len, kv_heads, head_dim), normal(b, k_len, kv_heads,
                                                                                                head_dim)
    return (q, k, v), mask, normal(b, q_len, heads * head_dim)


def splash_fn(mask):
    return lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=True)


def max_error(got, want):
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))


def max_abs(x):
    return float(jnp.max(jnp.abs(x.astype(jnp.float32))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(CASES))
def test_splash_matches_blocked_attention(kind, dtype):
    (q, k, v), mask, cotangent = inputs(kind, dtype)
    assert splash.splash_applies(q, k, mask)
    want, want_vjp = jax.vjp(lambda *a: layers.attention(*a, mask), q, k, v)
    got, got_vjp = jax.vjp(jax.jit(splash_fn(mask)), q, k, v)
    value_bound, grad_bound = 2e-6, 1e-5
    if dtype == jnp.bfloat16:
        k_rep = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2).astype(jnp.float32)
        top_score = float(jnp.max(jnp.abs(jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k_rep))))
        top_score /= np.sqrt(q.shape[-1])
        # bfloat16: the reference rounds scores (shifting weights by <= 2 x eps/2 x top score, as both sides of a
        # softmax move), its weights and its unnormalised output (eps/2 each) to bfloat16, where splash keeps
        # float32; both round the result (eps/2 each): |error| <= eps/2 (2 top_score + 4) max|v|, relative to max|out|
        # since max|v| and max|out| are of one size here.
        value_bound = BF16_EPS / 2 * (2 * top_score + 4) * max_abs(v) / max_abs(want)
        # The backward adds one bfloat16 rounding per matmul (dP, dQ, dK, dV) on the reference side, each <= eps/2.
        grad_bound = value_bound + 4 * BF16_EPS / 2
    # float32: scores, softmax and sums run in float32 on both sides, in another order (online softmax over key
    # blocks): a few roundings of 6e-8, so 2e-6 of the largest output.
    assert max_error(got, want) <= value_bound * max_abs(want)
    for name, g_got, g_want in zip("qkv", got_vjp(cotangent), want_vjp(cotangent)):
        # float32: the backward recomputes the softmax per key block and sums dq/dk/dv over blocks: ~10 roundings
        # more than the forward, within 1e-5 of the largest gradient.
        assert max_error(g_got, g_want) <= grad_bound * max_abs(g_want), name


def test_splash_in_scanned_remat_layers_matches_blocked_attention():
    """The model's setting: layers under lax.scan with a checkpointed body, jitted and differentiated."""
    (q, k, v), mask, _ = inputs("text", jnp.float32)
    weights = jnp.stack([jnp.eye(80), 0.5 * jnp.eye(80)])

    def model(attend):
        def layer(x, w):
            return x + attend(x @ w, k, v).reshape(x.shape), None

        def loss(x):
            return jnp.sum(jnp.sin(jax.lax.scan(jax.checkpoint(layer), x, weights)[0]))
        return jax.jit(jax.value_and_grad(loss))

    got_loss, got_grad = model(splash_fn(mask))(q)
    want_loss, want_grad = model(lambda *a: layers.attention(*a, mask))(q)
    # float32, two layers: the tolerances of one layer's values and gradients, doubled.
    assert abs(float(got_loss - want_loss)) <= 4e-6 * abs(float(want_loss))
    assert max_error(got_grad, want_grad) <= 2e-5 * max_abs(want_grad)


def test_block_sizes_pad_to_lanes_and_divide():
    v6e = 32 << 20
    q_pad, k_pad, sizes = splash.block_sizes(4 * 1032, 4 * 1032, 80, 2, v6e)  # 11B vision: 4 tiles of 1032
    assert (q_pad, k_pad, sizes.block_q, sizes.block_kv) == (4224, 4224, 384, 384)
    assert (sizes.block_kv_dkv, sizes.block_kv_dkv_compute) == (4224, 384)  # one partial dq per query block
    assert splash.block_sizes(4 * 1032, 4 * 1032, 80, 2, 16 << 20)[2].block_kv_dkv == 384  # v5p: 4224 does not fit
    q_pad, k_pad, sizes = splash.block_sizes(200, 4 * 1601, 128, 2, v6e)  # text rows over 4 tiles of 1601 tokens
    assert (q_pad, k_pad, sizes.block_q, sizes.block_kv, sizes.block_kv_dkv) == (256, 6528, 256, 384, 384)
    for length in range(1, 9000, 37):
        for head_dim, itemsize, vmem in ((80, 2, v6e), (128, 4, 16 << 20)):
            padded, _, sizes = splash.block_sizes(length, length, head_dim, itemsize, vmem)
            assert padded % 128 == 0 and 0 <= padded - length < 128 and padded % sizes.block_q == 0
            assert padded % sizes.block_kv_dkv == 0 and sizes.block_kv_dkv % sizes.block_kv_dkv_compute == 0
            assert (sizes.block_kv_dkv == sizes.block_kv
                    or splash.dkv_vmem_bytes(sizes.block_q, sizes.block_kv_dkv, 128, itemsize)
                    <= splash.VMEM_SHARE * vmem)


def test_splash_applies_only_where_it_is_exact():
    q = jax.ShapeDtypeStruct((1, 16, 4, 80), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 16, 2, 80), jnp.bfloat16)
    cross_k = jax.ShapeDtypeStruct((1, 12, 2, 80), jnp.bfloat16)
    key_valid = CausalMask(jnp.ones((1, 16), bool))
    assert splash.splash_applies(q, k, key_valid)
    assert splash.splash_applies(q, k, None)
    assert splash.splash_applies(q, cross_k, TileMask(jnp.ones((1, 16, 4), bool), 3))
    assert not splash.splash_applies(q, cross_k, key_valid)  # causal needs as many keys as queries
    assert not splash.splash_applies(q, cross_k, TileMask(jnp.ones((1, 16, 4), bool), 4))  # 16 tokens, 12 keys
    assert not splash.splash_applies(jax.ShapeDtypeStruct(q.shape, jnp.float16), k, None)
    assert not splash.splash_applies(q, jax.ShapeDtypeStruct((1, 16, 3, 80), jnp.bfloat16), None)
    assert "PaddingPairMask" in splash.why_not(q, cross_k, PaddingPairMask(jnp.zeros((1, 16), bool)))


@pytest.mark.parametrize("kind,placement", [("text", ("data", "tensor", "fsdp")), ("cross", ("data", None, "tensor"))],
                         ids=["kv_and_group_heads", "group_heads_only"])
def test_splash_under_a_mesh_runs_per_device(kind, placement):
    """Kernels cannot be partitioned by XLA: with `placement` each device runs them on its rows and heads."""
    (q, k, v), mask, cotangent = inputs(kind, jnp.float32)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)

    def splash_vjp(q, k, v, cotangent):
        out, vjp = jax.vjp(lambda *a: splash.splash_attention(*a, mask, interpret=True, placement=placement), q, k, v)
        return out, vjp(cotangent)

    with jax.set_mesh(mesh):
        got, got_grads = jax.jit(splash_vjp)(q, k, v, cotangent)
    want, want_vjp = jax.vjp(lambda *a: layers.attention(*a, mask), q, k, v)
    # float32: as unsharded (each device computes whole rows and heads), the same bounds.
    assert max_error(got, want) <= 2e-6 * max_abs(want)
    for g_got, g_want in zip(got_grads, want_vjp(cotangent)):
        assert max_error(g_got, g_want) <= 1e-5 * max_abs(g_want)


def test_attention_traced_for_tpu_takes_splash_and_says_why_not_where_it_falls_back():
    """`layers.attention` traced for TPU runs splash for each mask kind, on one device and under a mesh, and
    records its choice; a shape splash cannot take falls back to the blocked path with the reason."""
    from mme5_jax.sharding import make_mesh

    def trace(case, dtype=jnp.float32, mesh=None):
        (b, q_len, k_len, heads, kv_heads, dim), mask = CASES[case](None)
        q = jax.ShapeDtypeStruct((b, q_len, heads, dim), dtype)
        kv = jax.ShapeDtypeStruct((b, k_len, kv_heads, dim), dtype)
        with layers.target_platform("tpu"), layers.recorded_kernels() as chosen:
            if mesh is None:
                jax.eval_shape(lambda q, k, v: layers.attention(q, k, v, mask), q, kv, kv)
            else:
                with jax.set_mesh(mesh):
                    jax.eval_shape(lambda q, k, v: layers.attention(q, k, v, mask), q, kv, kv)
        return chosen

    assert trace("vision") == {"vision self-attention": ("splash", None)}
    two_devices = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    assert trace("text", mesh=two_devices) == {"text self-attention": ("splash", None)}
    assert trace("cross") == {"cross-attention": ("splash", None)}
    kernel, why = trace("text", dtype=jnp.float16)["text self-attention"]
    assert kernel == "blocked" and "float32 or bfloat16" in why
    kernel, why = trace("vision", mesh=make_mesh(8))["vision self-attention"]
    assert kernel == "blocked" and why == "4 rows do not divide over the mesh's batch axes"
