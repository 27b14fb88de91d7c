"""InfoNCE over the global batch, as mmE5 trains: every query against all positives plus its own hard negatives.

Unlike mmE5's all-gather (no gradient across ranks, i.e. the gradient scaled by 1/world_size), this is the exact
full-batch loss: under GSPMD the query rows stay sharded and XLA all-gathers the positives, so the logits take
O(b * B) memory per device. `group_size` restricts each query to the positives of its group of consecutive rows,
as mmE5's per-step all-gather of a few pairs per GPU does.
"""
import jax
import jax.numpy as jnp


def info_nce(query, positive, negatives=None, negative_mask=None, temperature: float = 0.02,
             group_size: int | None = None, example_mask=None):
    """query/positive [N, D], negatives [N, k, D], negative_mask [N, k] (False = padding) -> (loss, metrics).

    `example_mask` [N] (False = a row the pipeline rejected): such a row is neither a query nor another query's
    candidate, and the loss and accuracy average over the other rows. Its own diagonal stays, so its (ignored)
    loss is finite and no NaN reaches the gradient through the masking.

    Logits are [N, N + k], labels the diagonal; the log-sum-exp runs in (at least) float32. With `group_size` G
    (dividing N), query i is scored only against the positives of rows G * (i // G) ... G * (i // G) + G - 1 plus
    its own negatives: the other logits are masked, so this costs as much as the whole batch (train_step splits
    groups off as a leading axis instead where they line up with the batch shards).
    """
    n = query.shape[0]
    if group_size is not None and (group_size < 1 or n % group_size):
        raise ValueError(f"group_size {group_size} does not divide the {n} queries")
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    q, p = query.astype(dtype), positive.astype(dtype)
    logits = jnp.matmul(q, p.T, precision=hi) / temperature
    if group_size is not None:
        row_group = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0) // group_size
        column_group = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) // group_size
        logits = jnp.where(row_group == column_group, logits, -jnp.inf)
    if negatives is not None:
        hard = jnp.einsum("nd,nkd->nk", q, negatives.astype(dtype), precision=hi) / temperature
        if negative_mask is not None:
            hard = jnp.where(negative_mask.astype(bool), hard, -jnp.inf)
        logits = jnp.concatenate([logits, hard], axis=1)
    if example_mask is not None:
        valid = example_mask.astype(bool)
        diagonal = jnp.eye(n, dtype=bool)
        logits = logits.at[:, :n].set(jnp.where(valid[None, :] | diagonal, logits[:, :n], -jnp.inf))
    target = jnp.diagonal(logits[:, :n])
    per_query = jax.nn.logsumexp(logits, axis=1) - target
    correct = (jnp.argmax(logits, axis=1) == jnp.arange(n)).astype(jnp.float32)
    if example_mask is None:
        loss, accuracy = jnp.mean(per_query), jnp.mean(correct)
    else:
        count = jnp.maximum(jnp.sum(valid), 1).astype(dtype)
        loss = jnp.sum(jnp.where(valid, per_query, 0.0)) / count
        accuracy = jnp.sum(jnp.where(valid, correct, 0.0)) / count
    return loss, {"loss": loss, "accuracy": accuracy}
