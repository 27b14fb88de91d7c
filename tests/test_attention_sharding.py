"""Attention on a batch-sharded mesh: each device attends over its own rows, with no gathering of other devices'
queries, keys or values, and a 1/n share of the FLOPs; values and gradients equal the single-device ones."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mme5_jax.bench.runner import synthetic_batch
from mme5_jax.config import ModelConfig
from mme5_jax.data.images import ImageLayout
from mme5_jax.model import layers, lora, text, vision
from mme5_jax.model.init import random_model
from mme5_jax.sharding import batch_divisor, batch_rows, batch_sharding, make_mesh
from mme5_jax.train_step import TrainStep, batch_shardings, init_train_state
from test_attention import masks

KINDS = ["none", "causal", "padding_pair", "tile"]
MESHES = {"data": (8, 1, 1), "data_tensor": (4, 1, 2), "data_fsdp_tensor": (2, 2, 2)}
B, LEN, HEADS, KV_HEADS, HEAD_DIM = 16, 64, 4, 2, 8
ONE_ROW = 4 * HEADS * LEN * LEN  # float32 scores of one row, all heads: a budget that blocks every row on its own
COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (?P<shape>.+?) (?P<op>all-gather|all-reduce|all-to-all|reduce-scatter|"
                        r"collective-permute)(?:-start)?\((?P<rest>.*)$")


def collectives(hlo):
    """(op, result shape, gathered dimensions) of every cross-device collective in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.match(line)
        if m:
            shape = m["shape"].split("{")[0]
            dims = re.search(r"dimensions=\{([\d,]*)\}", m["rest"])
            found.append((m["op"], tuple(int(n) for n in re.findall(r"\d+", shape.split("[", 1)[-1])),
                          tuple(int(d) for d in dims[1].split(",") if d) if dims else ()))
    return found


def trip_counts(hlo):
    return [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', hlo)]


def operands(kind, mesh=None, seed=0):
    """q [B,Q,H,D], k/v [B,K,KVH,D] and the mask; on `mesh`, rows over the batch axes and heads over `tensor`."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, LEN, HEADS, HEAD_DIM), np.float32)
    k, v = (rng.standard_normal((B, LEN, KV_HEADS, HEAD_DIM), np.float32) for _ in range(2))
    mask, _ = masks(B, LEN, LEN, rng)[kind]
    if mesh is None:
        return (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)), mask
    rows = batch_rows(mesh)
    heads = NamedSharding(mesh, PartitionSpec(rows, None, "tensor" if mesh.shape["tensor"] > 1 else None))
    return (tuple(jax.device_put(x, heads) for x in (q, k, v)),
            jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh)), mask))


def forward_and_vjp(q, k, v, mask, cotangent):
    """Attention's output and its VJP: per-row maps, so a sharded program needs no collective at all."""
    out, vjp = jax.vjp(lambda *a: layers.attention(*a, mask), q, k, v)
    return out, vjp(cotangent)


def compile_on(mesh, fn, *args):
    if mesh is None:
        return jax.jit(fn).lower(*args).compile()
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_blocked_attention_moves_no_rows(monkeypatch, kind, mesh_shape):
    """Forward and backward, blocked by rows and by queries, compile to a program without any collective: the old
    global-batch blocking all-gathered q, k, v and the mask of the whole batch and looped over all rows."""
    mesh = make_mesh(*mesh_shape)
    monkeypatch.setitem(layers.SCORE_BLOCK_BYTES, "cpu", ONE_ROW // 4)
    (q, k, v), mask = operands(kind, mesh)
    out_sharding = NamedSharding(mesh, PartitionSpec(batch_rows(mesh)))
    cotangent = jax.device_put(np.ones((B, LEN, HEADS * HEAD_DIM), np.float32), out_sharding)
    hlo = compile_on(mesh, forward_and_vjp, q, k, v, mask, cotangent).as_text()
    assert collectives(hlo) == []
    assert len(trip_counts(hlo)) >= 4, "rows and queries blocked, forward and backward"


@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_per_device_flops_are_a_1_over_n_share(monkeypatch, kind, mesh_shape):
    """XLA counts a loop body once, so each program's count is scaled by the trip count of its one loop (over row
    blocks; a row's scores fit the budget whole): 16 trips of one row on one device; on the mesh, 2 trips over a
    device's own rows (2 rows, or 4 in blocks of 2 where `tensor` halves its heads and so its score block). The old
    blocking ran all 16 trips on every device."""
    mesh = make_mesh(*mesh_shape)
    monkeypatch.setitem(layers.SCORE_BLOCK_BYTES, "cpu", ONE_ROW)
    def forward(q, k, v, mask):
        return layers.attention(q, k, v, mask)
    totals = []
    for on in (None, mesh):
        (q, k, v), mask = operands(kind, on)
        compiled = compile_on(on, forward, q, k, v, mask)
        (trips,) = trip_counts(compiled.as_text())
        totals.append(compiled.cost_analysis()["flops"] * trips)
    global_flops, per_device = totals
    assert per_device == pytest.approx(global_flops / mesh.size, rel=0.05)


@pytest.mark.numerics  # CI runs it twice more beside a CPU-bound process
@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_attention_equals_single_device(monkeypatch, kind, mesh_shape):
    """Values and gradients on the mesh (blocked by rows and by queries) against one device, unblocked."""
    mesh = make_mesh(*mesh_shape)
    rng = np.random.default_rng(1)
    cotangent = rng.standard_normal((B, LEN, HEADS * HEAD_DIM), np.float32)
    (q, k, v), mask = operands(kind)
    want = jax.jit(forward_and_vjp)(q, k, v, mask, jnp.asarray(cotangent))
    monkeypatch.setitem(layers.SCORE_BLOCK_BYTES, "cpu", ONE_ROW // 4)
    (q, k, v), mask = operands(kind, mesh)
    cotangent = jax.device_put(cotangent, NamedSharding(mesh, PartitionSpec(batch_rows(mesh))))
    with jax.set_mesh(mesh):
        got = jax.jit(forward_and_vjp)(q, k, v, mask, cotangent)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # float32: blocking only reorders each sum (8-dim scores, 64-term softmax and gradient sums): <= 64
        # roundings x 6e-8 = 4e-6 of the terms' |sum|, a few times the result -> rtol 1e-5; atol 2e-5 where the
        # terms (up to ~4) cancel.
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=2e-5)


def test_without_a_mesh_nothing_is_constrained(monkeypatch):
    """Single-device callers (the Embedder, tests) trace attention as before: no sharding constraint."""
    monkeypatch.setitem(layers.SCORE_BLOCK_BYTES, "cpu", ONE_ROW // 2)
    (q, k, v), mask = operands("causal")
    jaxpr = str(jax.make_jaxpr(lambda *a: layers.attention(*a, mask))(q, k, v))
    assert "scan" in jaxpr and "sharding_constraint" not in jaxpr


def recorded_attention(calls):
    """`layers.attention` that records each call's q and k shapes."""
    def attention(q, k, v, mask):
        calls.add((q.shape, k.shape))
        return layers.attention(q, k, v, mask)
    return attention


def qkv_gathers(hlo, calls):
    """All-gathers along a leading (row) dimension whose result ends in the per-row dimensions of a recorded q, k
    or v (or a share of them, for heads split over `tensor`), in the layout attention takes or its head-major one.
    Weights have at most 3 dimensions and never match."""
    tails = set()
    for (_, q_len, heads, head_dim), (_, k_len, kv_heads, _) in calls:
        tails |= {(q_len, heads, head_dim), (k_len, kv_heads, head_dim), (kv_heads, heads // kv_heads, q_len, head_dim),
                  (kv_heads, k_len, head_dim)}

    def of_rows(shape, dims, tail):
        lead = len(shape) - len(tail)
        return lead > 0 and all(w % g == 0 for g, w in zip(shape[lead:], tail)) and all(d < lead for d in dims)

    return [(shape, dims) for op, shape, dims in collectives(hlo)
            if op == "all-gather" and any(of_rows(shape, dims, tail) for tail in tails)]


def test_train_step_gathers_no_attention_rows(monkeypatch):
    """A whole train step (vision tower, decoder self- and cross-attention, blocked; FSDP and tensor parallelism)
    gathers no q, k or v along the batch, and no rows of a per-tile embedding lookup ([rows, tiles * (patches *)
    hidden], or a share of it) either."""
    calls = set()
    monkeypatch.setattr(text, "attention", recorded_attention(calls))
    monkeypatch.setattr(vision, "attention", recorded_attention(calls))
    monkeypatch.setitem(layers.SCORE_BLOCK_BYTES, "cpu", 1 << 12)
    cfg = ModelConfig.from_yaml("tiny")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = random_model(cfg)
    lora.add_adapters(model, lora.AdapterConfig(kind="lora", rank=4, alpha=8.0, dropout=0.0), nnx.Rngs(0))
    graphdef, state = init_train_state(model, optax.sgd(1.0), mesh)
    shape = dict(pairs=8, negatives=1, query_tokens=16, query_tiles=4, target_tokens=8, target_tiles=0)
    batch = synthetic_batch({"batch": shape}, cfg, layout=ImageLayout(shards=batch_divisor(mesh)))
    batch = jax.device_put(batch, batch_shardings(batch, mesh))
    with jax.set_mesh(mesh):
        hlo = TrainStep(graphdef, optax.sgd(1.0), mesh).lower(state, batch, jax.random.PRNGKey(0)).compile().as_text()
    assert len({q for q, _ in calls}) >= 3 and trip_counts(hlo)
    assert qkv_gathers(hlo, calls) == []
    v = cfg.vision
    tile_rows = {v.max_num_tiles * v.num_patches * v.hidden_size, v.max_num_tiles * v.hidden_size}
    shares = {size // s for size in tile_rows for s in (1, mesh.shape["fsdp"])}
    assert not [(shape, dims) for op, shape, dims in collectives(hlo)
                if op == "all-gather" and dims == (0,) and math.prod(shape[1:]) in shares]
