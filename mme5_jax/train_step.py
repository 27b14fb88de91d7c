"""The jitted contrastive training step: adapters trained, base frozen, exact full-batch InfoNCE gradient.

The model is split into (graphdef, trainable adapters, frozen rest); only the adapters get gradients and optimizer
state. The vision tower runs once over the batch's real images (`images`, packed per device and chunk by
`mme5_jax.data.images`), and each slot row takes its image's states by `image_index`, on its own device. Queries,
positives and negatives are then encoded in one text call per distinct input shape: groups laid out alike share a
call, while text-only groups get their own and skip the cross-attention layers. Every call stays row-sharded like
the batch, so each device encodes its own examples and no rows move between devices.

With `chunk_size`, GradCache bounds activation memory by the chunk instead of the batch: encode all chunks
without keeping activations, take the exact loss gradient with respect to the embeddings, then re-encode chunk by
chunk under `jax.vjp` and accumulate the adapter gradients. Chunk i holds examples i, i + n, i + 2n, ... (n chunks),
which on a row-sharded batch is a local reshape: every chunk spans all data shards without an all-to-all.
"""
import functools
import itertools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mme5_jax.loss import info_nce
from mme5_jax.model import lora
from mme5_jax.model.layers import scoped
from mme5_jax.sharding import batch_divisor, batch_sharding, load_rules, state_shardings

SCHEDULES = ("mme5", "cosine", "linear", "constant")
BATCH_KEYS = ("query", "positive", "negatives", "negative_mask", "example_mask", "images", "row_index")


def make_schedule(name: str, peak_lr: float, total_steps: int, warmup_ratio: float = 0.05):
    """Learning rate by update count. "mme5" is DeepSpeed's WarmupDecayLR (warmup_min_lr 0):
    peak * log(step + 1) / log(warmup) during warmup, then linear decay to 0 at `total_steps`."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} unknown; choose from {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = math.ceil(warmup_ratio * total_steps)
    if name == "mme5":
        warmup = max(2, warmup)  # DeepSpeed's floor: log(warmup) must be positive

        def schedule(step):
            step = jnp.asarray(step, jnp.float32)
            warm = peak_lr * jnp.log(step + 1) / math.log(warmup)
            decay = peak_lr * jnp.maximum(0.0, (total_steps - step) / max(1.0, total_steps - warmup))
            return jnp.where(step < warmup, warm, decay)

        return schedule
    warmup = max(1, warmup)
    ramp = optax.linear_schedule(0.0, peak_lr, warmup)
    after = {"cosine": optax.cosine_decay_schedule(peak_lr, max(1, total_steps - warmup)),
             "linear": optax.linear_schedule(peak_lr, 0.0, max(1, total_steps - warmup)),
             "constant": optax.constant_schedule(peak_lr)}[name]
    return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(schedule, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=5.0):
    """Global-norm clipping then AdamW; the learning rate is injected so the step can report it."""
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                                                  weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """`step` counts applied updates; a skipped (non-finite) update only increments `nonfinite_steps`."""

    step: jax.Array
    trainable: nnx.State
    opt_state: optax.OptState
    frozen: nnx.State
    nonfinite_steps: jax.Array


def _like_params(tree, param_structure, param_shardings, replicated):
    """Shardings for an optax state: subtrees shaped like the parameters follow them, the rest is replicated."""
    if jax.tree.structure(tree) == param_structure:
        return param_shardings
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_like_params(t, param_structure, param_shardings, replicated) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_like_params(t, param_structure, param_shardings, replicated) for t in tree)
    if isinstance(tree, dict):
        return {k: _like_params(v, param_structure, param_shardings, replicated) for k, v in tree.items()}
    return jax.tree.map(lambda _: replicated, tree)


def train_state_shardings(state: TrainState, mesh, rules=None) -> TrainState:
    """NamedShardings for a (possibly abstract) TrainState: parameters by their logical axes, Adam moments like
    their parameters, counters replicated."""
    rules = load_rules() if rules is None else rules
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable = state_shardings(state.trainable, mesh, rules)
    param_structure = jax.tree.structure(state.trainable)
    return TrainState(step=replicated, trainable=trainable,
                      opt_state=_like_params(state.opt_state, param_structure, trainable, replicated),
                      frozen=state_shardings(state.frozen, mesh, rules), nonfinite_steps=replicated)


def init_train_state(model, optimizer, mesh, rules=None):
    """-> (graphdef, TrainState) placed on `mesh`: adapters and frozen weights by their logical axes.

    The state takes over the model's arrays without copying them (an 11B base does not fit twice), and the
    step donates the state: do not use `model` afterwards.
    """
    graphdef, trainable, frozen = nnx.split(model, lora.LoRAParam, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError("the model has no adapter parameters: call mme5_jax.model.lora.add_adapters first")
    zero = jnp.zeros((), jnp.int32)
    abstract = jax.eval_shape(lambda t, f: TrainState(zero, t, optimizer.init(t), f, zero), trainable, frozen)
    shardings = train_state_shardings(abstract, mesh, rules)
    trainable = jax.device_put(trainable, shardings.trainable)
    frozen = jax.device_put(frozen, shardings.frozen)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(trainable)
    def counter():
        return jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return graphdef, TrainState(counter(), trainable, opt_state, frozen, counter())


class _Layout:
    """Batch placement helpers for one mesh: rows over the `batch` rule's mesh axes when they divide evenly."""

    def __init__(self, mesh, rules):
        self.mesh = mesh
        self.rules = rules
        self.divisor = batch_divisor(mesh, rules)

    def sharding(self, lead=0):
        """Rows (dimension `lead`) split over the batch axes."""
        return batch_sharding(self.mesh, self.rules, lead)

    def constrain(self, tree, lead=0):
        def one(x):
            if x.shape[lead] % self.divisor:
                return x
            return jax.lax.with_sharding_constraint(x, self.sharding(lead))
        return jax.tree.map(one, tree)

    def local_take(self, states, index):
        """states [D * M, ...] (M per batch shard), index [R] (local to each shard's M; -1 takes any) ->
        [R, ...]: every row's own image states, gathered on its device."""
        d = self.divisor if states.shape[0] % self.divisor == 0 and index.shape[0] % self.divisor == 0 else 1
        states = self.constrain(states.reshape(d, -1, *states.shape[1:]))
        index = self.constrain(jnp.maximum(index, 0).reshape(d, -1))
        taken = jax.vmap(lambda s, i: jnp.take(s, i, axis=0))(states, index)
        return self.constrain(taken.reshape(-1, *taken.shape[2:]))

    def replicate(self, x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec()))

    def tiles(self, rows, group):
        """Whether groups of `group` consecutive rows line up with the batch shards (whole groups per shard or
        whole shards per group), so that [rows, ...] -> [rows / group, group, ...] moves no rows between devices."""
        if rows % self.divisor:
            return False
        per_shard = rows // self.divisor
        return per_shard % group == 0 or group % per_shard == 0


def slot_groups(batch):
    """-> (inputs, row_ids): the query, positive and negative slots as separate model inputs [B, slots, ...].

    Each group keeps its own sequence length and modality, so text-only targets skip the cross-attention layers
    and short targets are not padded to the queries' length. Row ids [B, slots] number the example-major rows
    e * (2 + k) + slot, e being the example's `row_index` (its place in the global batch before the pipeline
    balanced images over devices), so dropout masks do not depend on grouping, chunking or row order.
    """
    groups = [{key: value[:, None] for key, value in batch["query"].items()},
              {key: value[:, None] for key, value in batch["positive"].items()}]
    negatives = batch.get("negatives")
    if negatives is not None and negatives["input_ids"].shape[1]:
        groups.append(negatives)
    b = groups[0]["input_ids"].shape[0]
    widths = [group["input_ids"].shape[1] for group in groups]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    examples = batch["row_index"] if "row_index" in batch else jnp.arange(b)
    rows = [examples[:, None] * sum(widths) + offset + jnp.arange(width)[None]
            for offset, width in zip(offsets, widths)]
    return tuple(groups), tuple(rows)


def _flat(tree):
    """[B, S, ...] -> [B * S, ...]"""
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def _to_chunks(x, n_chunks):
    """[B, ...] -> [n_chunks, B / n_chunks, ...], chunk i = rows i, i + n_chunks, ... (strided)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // n_chunks, n_chunks, *x.shape[1:]), 0, 1)


def _from_chunks(x):
    """Inverse of `_to_chunks`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


@scoped("loss")
def _contrastive(layout, embeddings, batch, temperature, group=None):
    """embeddings [B, 2 + k, D] -> (loss, metrics); the queries stay sharded. `batch` supplies the masks.

    Without `group` the positives are gathered whole. Groups of `group` consecutive rows that line up with the
    batch shards become a leading axis, so a device gathers only its own groups' positives and its logits are
    [b, group + k]; other groupings mask the whole batch's logits, gathering the positives whole as without groups.
    """
    b = embeddings.shape[0]
    if group is not None and b % group:
        raise ValueError(f"global batch {b} is not divisible by contrastive_group {group}")
    query = layout.constrain(embeddings[:, 0])
    negatives = embeddings[:, 2:] if embeddings.shape[1] > 2 else None
    negative_mask = batch.get("negative_mask") if negatives is not None else None
    example_mask = batch.get("example_mask")
    if group is None or not layout.tiles(b, group):
        positive = layout.replicate(embeddings[:, 1])
        return info_nce(query, positive, negatives, negative_mask, temperature, group_size=group,
                        example_mask=example_mask)

    def split(x):
        return None if x is None else layout.constrain(x.reshape(b // group, group, *x.shape[1:]))

    loss, metrics = jax.vmap(functools.partial(info_nce, temperature=temperature))(
        split(query), split(layout.constrain(embeddings[:, 1])), split(negatives), split(negative_mask),
        example_mask=split(example_mask))
    if example_mask is None:
        return jnp.mean(loss), jax.tree.map(jnp.mean, metrics)
    # Each group averaged over its own valid rows: weigh the groups by them for the batch's average.
    counts = jnp.sum(split(example_mask), axis=1).astype(loss.dtype)
    total = jnp.maximum(jnp.sum(counts), 1)
    metrics = jax.tree.map(lambda m: jnp.sum(m * counts) / total, metrics)
    return metrics["loss"], metrics


def make_loss_and_grad(graphdef, mesh, *, temperature=0.02, chunk_size=None, contrastive_group=None, rules=None):
    """(trainable, frozen, batch, rng) -> ((loss, metrics), grads): the traced core of the train step.

    `contrastive_group` G: InfoNCE within each group of G consecutive examples of the global batch (rows
    [0, G), [G, 2G), ...), averaged over all queries; None: one InfoNCE over the whole global batch."""
    layout = _Layout(mesh, load_rules() if rules is None else rules)

    def encode(trainable, frozen, groups, rows, images, rng):
        """Slot groups [b, slots_g, ...] and their images -> embeddings [b, 2 + k, D]. Groups with the same input
        signature (keys, trailing shapes, dtypes) share one model call; the others get their own."""
        model = nnx.merge(graphdef, trainable, frozen)
        states = None
        if images is not None:
            lora.seed_dropout(model, rng, images["row_id"])  # an image's dropout follows its text row's id
            states = layout.constrain(model.vision_states(
                *(layout.constrain(images[key]) for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"))))
        calls = {}
        for index, inputs in enumerate(groups):
            signature = tuple(sorted((key, value.shape[2:], value.dtype.name) for key, value in inputs.items()))
            calls.setdefault(signature, []).append(index)
        out = [None] * len(groups)
        for members in calls.values():
            inputs = {key: jnp.concatenate([groups[i][key] for i in members], axis=1) for key in groups[members[0]]}
            row_ids = jnp.concatenate([rows[i] for i in members], axis=1)
            inputs = layout.constrain(_flat(inputs))
            index = inputs.pop("image_index", None)
            if index is not None and states is None:
                raise ValueError("a slot group has image_index but the batch has no images")
            cross = None if index is None else layout.local_take(states, index)
            lora.seed_dropout(model, rng, row_ids.reshape(-1))
            embeddings = layout.constrain(model.embed(inputs, cross))
            splits = list(itertools.accumulate(rows[i].shape[1] for i in members))[:-1]
            for i, part in zip(members, jnp.split(embeddings.reshape(*row_ids.shape, -1), splits, axis=1)):
                out[i] = part
        return jnp.concatenate(out, axis=1)

    def plain(trainable, frozen, batch, rng):
        groups, rows = slot_groups(batch)
        images = jax.tree.map(lambda x: x[0], batch["images"]) if "images" in batch else None

        def loss_fn(t):
            return _contrastive(layout, encode(t, frozen, groups, rows, images, rng), batch, temperature,
                                contrastive_group)

        return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

    def gradcache(trainable, frozen, batch, rng):
        groups, rows = slot_groups(batch)
        b = rows[0].shape[0]
        if b % chunk_size:
            raise ValueError(f"global batch {b} is not divisible by chunk_size {chunk_size}")
        n_chunks = b // chunk_size
        def to_chunks(x):
            return layout.constrain(_to_chunks(x, n_chunks), lead=1)
        images = layout.constrain(batch["images"], lead=1) if "images" in batch else None
        chunks = jax.tree.map(to_chunks, (groups, rows)) + (images,)
        constant = jax.lax.stop_gradient(trainable)

        def forward(chunk):
            return encode(constant, frozen, *chunk, rng)

        embeddings = _from_chunks(jax.lax.map(forward, chunks))
        (loss, metrics), emb_grad = jax.value_and_grad(
            lambda e: _contrastive(layout, e, batch, temperature, contrastive_group),
            has_aux=True)(embeddings)

        def backward(acc, chunk):
            (groups, rows, images), grad = chunk
            _, vjp = jax.vjp(lambda t: encode(t, frozen, groups, rows, images, rng), trainable)
            return jax.tree.map(jnp.add, acc, vjp(grad)[0]), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, _ = jax.lax.scan(backward, zeros, (chunks, to_chunks(emb_grad)))
        return (loss, metrics), grads

    return plain if chunk_size is None else gradcache


class TrainStep:
    """`step(state, batch, rng) -> (state, metrics)`, jitted on first use with explicit shardings; the state is
    donated. `lower(...)` gives the lowered computation (e.g. for memory analysis) without running it."""

    def __init__(self, graphdef, optimizer, mesh, *, temperature=0.02, chunk_size=None, contrastive_group=None,
                 rules=None):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if contrastive_group is not None and contrastive_group < 1:
            raise ValueError(f"contrastive_group must be >= 1 or None, got {contrastive_group}")
        self.graphdef, self.optimizer, self.mesh = graphdef, optimizer, mesh
        self.rules = load_rules() if rules is None else rules
        self.layout = _Layout(mesh, self.rules)
        self.chunk_size = chunk_size
        self.loss_and_grad = make_loss_and_grad(graphdef, mesh, temperature=temperature, chunk_size=chunk_size,
                                                contrastive_group=contrastive_group, rules=self.rules)
        self._jitted = {}

    def _update(self, state, batch, rng):
        (loss, metrics), grads = self.loss_and_grad(state.trainable, state.frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + finite.astype(jnp.int32),
                               trainable=keep(trainable, state.trainable),
                               opt_state=keep(opt_state, state.opt_state), frozen=state.frozen,
                               nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
        metrics = dict(metrics, grad_norm=grad_norm, nonfinite_steps=new_state.nonfinite_steps)
        lr = optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda _, v: isinstance(v, jax.Array))
        if lr is not None:
            metrics["lr"] = lr
        return new_state, metrics

    def _select(self, batch):
        missing = [k for k in ("query", "positive") if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; it has {sorted(batch)}")
        selected = {k: batch[k] for k in BATCH_KEYS if k in batch}
        b = selected["query"]["input_ids"].shape[0]
        if b % self.layout.divisor:
            raise ValueError(f"global batch {b} is not divisible by the mesh's batch shards ({self.layout.divisor})")
        if "images" in selected:
            shape = selected["images"]["row_id"].shape
            want = 1 if self.chunk_size is None else b // self.chunk_size
            if len(shape) != 2 or shape[0] != want or shape[1] % self.layout.divisor:
                raise ValueError(f"images are packed as {shape} (chunks, images); this step needs {want} "
                                 f"chunk(s) of a multiple of the mesh's {self.layout.divisor} batch shards "
                                 f"(pack with mme5_jax.data.images.ImageLayout(shards=<batch shards per process>, "
                                 f"chunks={want}))")
        return selected

    def jitted(self, state, batch):
        """The step compiled for this batch's keys (images or not); `batch` as `_select` returns it."""
        key = tuple(sorted(batch))
        if key not in self._jitted:
            shardings = train_state_shardings(state, self.mesh, self.rules)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            inputs = batch_shardings(batch, self.mesh, self.rules)
            self._jitted[key] = jax.jit(self._update, in_shardings=(shardings, inputs, replicated),
                                        out_shardings=(shardings, replicated), donate_argnums=0)
        return self._jitted[key]

    def lower(self, state, batch, rng):
        batch = self._select(batch)
        with jax.set_mesh(self.mesh):  # attention reads the mesh to keep its row blocks on their devices
            return self.jitted(state, batch).lower(state, batch, rng)

    def __call__(self, state, batch, rng):
        batch = self._select(batch)
        with jax.set_mesh(self.mesh):
            return self.jitted(state, batch)(state, batch, rng)


def batch_shardings(batch, mesh, rules=None):
    """Shardings for a step batch (a prefix tree of it): rows split over the batch axes; packed `images` split
    along their second dimension (the first counts GradCache chunks)."""
    return {key: batch_sharding(mesh, rules, lead=1 if key == "images" else 0) for key in batch}

