"""InfoNCE against a float64 numpy reference, with masked hard negatives, groups of consecutive rows and a
row-sharded global batch."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mme5_jax.loss import info_nce
from mme5_jax.sharding import load_rules, make_mesh
from mme5_jax.train_step import _contrastive, _Layout

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process


def reference(q, p, n, mask, tau):
    q, p, n = (np.asarray(x, np.float64) for x in (q, p, n))
    logits = np.concatenate([q @ p.T, np.where(mask, np.einsum("nd,nkd->nk", q, n), -np.inf)], 1) / tau
    top = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return float(np.mean(lse - np.diagonal(logits))), float(np.mean(logits.argmax(1) == np.arange(len(q))))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q = unit(rng.standard_normal((16, 8))).astype(np.float32)
    p = unit(q + 0.5 * rng.standard_normal(q.shape)).astype(np.float32)
    n = unit(rng.standard_normal((16, 3, 8))).astype(np.float32)
    mask = rng.random((16, 3)) > 0.3
    mask[0] = False  # a query whose negatives are all padding
    return q, p, n, mask


def test_matches_float64_reference(data):
    q, p, n, mask = data
    loss, metrics = info_nce(q, p, n, mask, temperature=0.02)
    ref_loss, ref_acc = reference(q, p, n, mask, 0.02)
    # float32: 8-term unit dots err <= 8 x 6e-8, x 1/tau = 50: 2.4e-5 a logit, 5e-5 a row; / loss ~10 -> 5e-6.
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert float(metrics["accuracy"]) == ref_acc  # exact: top-two logits are >= 4.3 apart, float32 moves them 2.4e-5
    assert loss.dtype == jnp.float32


def test_masked_negatives_do_not_count(data):
    q, p, n, mask = data
    garbage = np.where(mask[..., None], n, 1e3 * np.ones_like(n))  # masked slots hold huge logits
    # Masked logits become -inf either way, so the same float32 ops run on the same values: exactly equal.
    assert float(info_nce(q, p, garbage, mask)[0]) == float(info_nce(q, p, n, mask)[0])
    no_negatives = info_nce(q, p, n, np.zeros_like(mask))[0]
    # Only the sums of exp (16 terms + 3 zeros) may reorder: 16 x 1.2e-7 = 2e-6 in a log-sum-exp; loss ~9 -> 2e-7.
    assert float(no_negatives) == pytest.approx(float(info_nce(q, p)[0]), rel=1e-6)


def test_bf16_inputs_reduce_in_float32(data):
    q, p, n, mask = data
    loss, _ = info_nce(jnp.asarray(q, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16), jnp.asarray(n, jnp.bfloat16),
                       mask)
    assert loss.dtype == jnp.float32
    assert np.isfinite(float(loss))


def test_sharded_rows_gather_positives_only(data):
    """Rows sharded 8 ways: same loss and gradient (in float64); the HLO all-gathers the positives and has no
    all-to-all."""
    q, p, n = (np.asarray(x, np.float64) for x in data[:3])
    mask = data[3]
    mesh = make_mesh(8, 1, 1)
    rows = NamedSharding(mesh, PartitionSpec("data"))

    def loss_fn(q, p, n):
        p = jax.lax.with_sharding_constraint(p, NamedSharding(mesh, PartitionSpec()))
        return info_nce(q, p, n, mask)[0]

    grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)), in_shardings=(rows, rows, rows))
    with jax.enable_x64(True):
        (loss, (gq, gp)) = grad(q, p, n)
        ref_loss, (ref_gq, ref_gp) = jax.value_and_grad(loss_fn, argnums=(0, 1))(q, p, n)
        hlo = grad.lower(q, p, n).compile().as_text()
    # float64: reordered 8-term dots x 1/tau move logits <= 1e-13: loss 2e-13 (of ~10), grads <= 50 x 2e-13 = 1e-11.
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    np.testing.assert_allclose(gq, ref_gq, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(gp, ref_gp, rtol=1e-12, atol=1e-11)
    assert "all-gather" in hlo
    assert "all-to-all" not in hlo


def grouped_reference(q, p, n, mask, group, tau=0.02):
    """float64 (loss, accuracy), each group of `group` consecutive rows scored on its own, averaged."""
    parts = [reference(*(x[i:i + group] for x in (q, p, n, mask)), tau) for i in range(0, len(q), group)]
    return tuple(np.mean(parts, axis=0))


def test_groups_score_each_query_within_its_own_rows(data):
    q, p, n, mask = data
    loss, metrics = info_nce(q, p, n, mask, group_size=4)
    ref_loss, ref_acc = grouped_reference(q, p, n, mask, 4)
    # float32: 5e-5 a row as in test_matches_float64_reference; / loss ~4.8 -> 1.1e-5.
    assert abs(float(loss) - ref_loss) <= 2e-5 * abs(ref_loss)
    assert float(metrics["accuracy"]) == ref_acc  # exact: top-two logits are >= 0.8 apart, float32 moves them 2.4e-5
    with pytest.raises(ValueError, match="group_size 5 does not divide the 16 queries"):
        info_nce(q, p, n, mask, group_size=5)


def all_gathered(hlo):
    """Elements all-gathered by a compiled HLO module."""
    shapes = re.findall(r"\w+\[([\d,]*)\]\S* all-gather\(", hlo)
    return sum(math.prod(int(d) for d in dims.split(",") if d) for dims in shapes)


@pytest.mark.parametrize("rows", [16, 24])
def test_sharded_groups_gather_no_more_than_the_whole_batch(rows):
    """Groups of 4 over 8 row shards: 16 rows (2 a shard) take the [groups, 4] layout, 24 rows (3 a shard, groups
    straddling shards) the masked one. Both match per-group InfoNCE in loss and gradient, move no rows with an
    all-to-all, and all-gather no more than the loss without groups."""
    group = 4
    layout = _Layout(make_mesh(8, 1, 1), load_rules())
    assert layout.tiles(rows, group) == (rows == 16)
    rng = np.random.default_rng(1)
    embeddings = unit(rng.standard_normal((rows, 5, 8)))
    mask = rng.random((rows, 3)) > 0.3

    def grad_fn(g):
        def loss(e):
            return _contrastive(layout, e, {"negative_mask": mask}, 0.02, g)
        return jax.jit(jax.value_and_grad(loss, has_aux=True), in_shardings=layout.sharding())

    def per_group(e, m):
        return jax.value_and_grad(lambda e: info_nce(e[:, 0], e[:, 1], e[:, 2:], m, 0.02)[0])(e)

    with jax.enable_x64(True):
        (loss, metrics), grad = grad_fn(group)(embeddings)
        refs = [per_group(e, m) for e, m in zip(np.split(embeddings, rows // group), np.split(mask, rows // group))]
        hlo = grad_fn(group).lower(embeddings).compile().as_text()
        global_hlo = grad_fn(None).lower(embeddings).compile().as_text()
    # float64: reordered 8-term dots x 1/tau move logits <= 1e-13: loss 2e-13 (of ~25), grads <= 50 x 2e-13 = 1e-11.
    assert float(loss) == pytest.approx(np.mean([float(ref) for ref, _ in refs]), rel=1e-12)
    assert float(metrics["loss"]) == float(loss)
    np.testing.assert_allclose(grad, np.concatenate([g for _, g in refs]) / (rows // group), rtol=1e-12, atol=1e-11)
    assert "all-to-all" not in hlo
    assert all_gathered(hlo) <= all_gathered(global_hlo)


@pytest.mark.parametrize("group", [None, 4])
def test_rejected_rows_are_neither_queries_nor_candidates(group):
    """Rows the pipeline rejected (example_mask False) drop out: the loss is that of the valid rows alone, their
    embeddings get exactly zero gradient, and nothing is NaN, on the whole-batch and the grouped layout."""
    layout = _Layout(make_mesh(8, 1, 1), load_rules())
    rng = np.random.default_rng(2)
    embeddings = unit(rng.standard_normal((16, 5, 8)))
    mask = rng.random((16, 3)) > 0.3
    valid = np.ones(16, bool)
    valid[[1, 6, 7]] = False  # the grouped layout then has groups of 3, 4, 2 and 4 valid rows
    embeddings[~valid] = 0.0  # an extreme placeholder: its logits tie with every other
    mask[~valid] = False

    def loss(e):
        return _contrastive(layout, e, {"negative_mask": mask, "example_mask": valid}, 0.02, group)[0]

    def valid_only(e, m, v):
        return info_nce(e[v, 0], e[v, 1], e[v, 2:], m[v], 0.02)[0]

    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(loss)(embeddings)
        if group is None:
            expected = valid_only(embeddings, mask, valid)
        else:  # each group's loss averaged over all valid queries
            parts = [(valid_only(e, m, v), v.sum()) for e, m, v in
                     zip(*(np.split(x, 16 // group) for x in (embeddings, mask, valid)))]
            expected = sum(loss * count for loss, count in parts) / valid.sum()
    # float64 throughout: the two sides sum the same terms in another order, 16 terms of <= 60 -> 1e-12 relative.
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[~valid], 0.0)
