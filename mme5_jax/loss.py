"""InfoNCE over the global batch, as mmE5 trains: every query against all positives plus its own hard negatives.

Unlike mmE5's all-gather (no gradient across ranks, i.e. the gradient scaled by 1/world_size), this is the exact
full-batch loss: under GSPMD the query rows stay sharded and XLA all-gathers the positives, so the logits take
O(b * B) memory per device.
"""
import jax
import jax.numpy as jnp


def info_nce(query, positive, negatives=None, negative_mask=None, temperature: float = 0.02):
    """query/positive [N, D], negatives [N, k, D], negative_mask [N, k] (False = padding) -> (loss, metrics).

    Logits are [N, N + k], labels the diagonal; the log-sum-exp runs in (at least) float32.
    """
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    q, p = query.astype(dtype), positive.astype(dtype)
    logits = jnp.matmul(q, p.T, precision=hi) / temperature
    if negatives is not None:
        hard = jnp.einsum("nd,nkd->nk", q, negatives.astype(dtype), precision=hi) / temperature
        if negative_mask is not None:
            hard = jnp.where(negative_mask.astype(bool), hard, -jnp.inf)
        logits = jnp.concatenate([logits, hard], axis=1)
    n = q.shape[0]
    target = jnp.diagonal(logits[:, :n])
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - target)
    accuracy = jnp.mean((jnp.argmax(logits, axis=1) == jnp.arange(n)).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}
