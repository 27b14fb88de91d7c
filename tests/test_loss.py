"""InfoNCE against a float64 numpy reference, with masked hard negatives and a row-sharded global batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mme5_jax.loss import info_nce
from mme5_jax.sharding import make_mesh


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
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert float(metrics["accuracy"]) == ref_acc
    assert loss.dtype == jnp.float32


def test_masked_negatives_do_not_count(data):
    q, p, n, mask = data
    garbage = np.where(mask[..., None], n, 1e3 * np.ones_like(n))  # masked slots hold huge logits
    assert float(info_nce(q, p, garbage, mask)[0]) == pytest.approx(float(info_nce(q, p, n, mask)[0]), rel=1e-6)
    no_negatives = info_nce(q, p, n, np.zeros_like(mask))[0]
    assert float(no_negatives) == pytest.approx(float(info_nce(q, p)[0]), rel=1e-6)


def test_bf16_inputs_reduce_in_float32(data):
    q, p, n, mask = data
    loss, _ = info_nce(jnp.asarray(q, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16), jnp.asarray(n, jnp.bfloat16),
                       mask)
    assert loss.dtype == jnp.float32
    assert np.isfinite(float(loss))


def test_sharded_rows_gather_positives_only(data):
    """Rows sharded 8 ways: same loss and gradient; the HLO all-gathers the positives and has no all-to-all."""
    q, p, n, mask = data
    mesh = make_mesh(8, 1, 1)
    rows = NamedSharding(mesh, PartitionSpec("data"))

    def loss_fn(q, p, n):
        p = jax.lax.with_sharding_constraint(p, NamedSharding(mesh, PartitionSpec()))
        return info_nce(q, p, n, mask)[0]

    grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)), in_shardings=(rows, rows, rows))
    (loss, (gq, gp)) = grad(q, p, n)
    ref_loss, (ref_gq, ref_gp) = jax.value_and_grad(loss_fn, argnums=(0, 1))(q, p, n)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    np.testing.assert_allclose(gq, ref_gq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gp, ref_gp, rtol=1e-5, atol=1e-6)
    hlo = grad.lower(q, p, n).compile().as_text()
    assert "all-gather" in hlo
    assert "all-to-all" not in hlo
