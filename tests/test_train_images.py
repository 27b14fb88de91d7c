"""Real images only: packing a batch's images per device and GradCache chunk, and the train step that encodes just
those. Loss and gradients equal the per-row layout's (one zero-padded image per slot, every slot through the
vision tower), and the compiled step does no vision work for text-only slots."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hf_reference import rel_err
from mme5_jax import train_step as ts
from mme5_jax.bench.flops import Encode, step_flops, xla_flops
from mme5_jax.config import ModelConfig
from mme5_jax.data.images import ImageLayout, balanced_order, pack_rows
from mme5_jax.loss import info_nce
from mme5_jax.model import lora
from mme5_jax.model.mllama import MllamaModel
from mme5_jax.model.text import CrossAttentionLayer
from mme5_jax.sharding import make_mesh

B, K, TAU, LQ, LT = 8, 2, 0.02, 12, 8
# Wide enough (head dim 32) that matmuls dominate XLA's FLOP count, as in test_bench.
CFG = {"vision": {"hidden_size": 64, "num_hidden_layers": 2, "num_global_layers": 1, "num_attention_heads": 2,
                  "intermediate_size": 256, "vision_output_dim": 128, "image_size": 28, "patch_size": 14,
                  "max_num_tiles": 4, "intermediate_layers_indices": [0]},
       "text": {"vocab_size": 128, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 512, "cross_attention_layers": [1, 3]},
       "image_token_index": 128}
ADAPTERS = lora.AdapterConfig(kind="dora", rank=4, alpha=8.0, dropout=0.0)  # every mmE5 target, vision included


def slot_arrays(rng, cfg, shape, length, image_share):
    """One slot group in the per-row layout the processor gives: [*shape, ...], a random share of rows with an
    image of 1..4 tiles (the rest zero-padded, `has_image` False), right-padded text."""
    v = cfg.vision
    rows = int(np.prod(shape))
    has = rng.random(rows) < image_share
    tiles = rng.integers(1, v.max_num_tiles + 1, rows)
    lengths = rng.integers(3, length + 1, rows)
    ids = np.where(np.arange(length) < lengths[:, None], rng.integers(3, 120, (rows, length)), 0).astype(np.int32)
    ids[:, 0] = np.where(has, cfg.image_token_index, 1)
    pixels = np.zeros((rows, 1, v.max_num_tiles, 3, v.image_size, v.image_size), np.float32)
    mask = np.zeros((rows, 1, v.max_num_tiles), np.int32)
    cross = np.zeros((rows, length, 1, v.max_num_tiles), np.int32)
    for r in np.flatnonzero(has):
        pixels[r, 0, :tiles[r]] = rng.standard_normal((tiles[r], 3, v.image_size, v.image_size))
        mask[r, 0, :tiles[r]] = 1
        cross[r, :, 0, :tiles[r]] = 1
    out = {"input_ids": ids, "attention_mask": (np.arange(length) < lengths[:, None]).astype(np.int32),
           "pixel_values": pixels, "aspect_ratio_ids": np.where(has, tiles, 0)[:, None].astype(np.int32),
           "aspect_ratio_mask": mask, "cross_attention_mask": cross, "has_image": has}
    return {key: value.reshape(*shape, *value.shape[1:]) for key, value in out.items()}


def per_row_batch(cfg, seed, positive_share=0.0):
    rng = np.random.default_rng(seed)
    return {"query": slot_arrays(rng, cfg, (B,), LQ, 0.75),
            "positive": slot_arrays(rng, cfg, (B,), LT, positive_share),
            "negatives": slot_arrays(rng, cfg, (B, K), LT, 0.4),
            "negative_mask": rng.random((B, K)) > 0.2}


def reference_loss_and_grads(graphdef, trainable, frozen, batch):
    """The per-row layout: every group through `MllamaModel.embed` with its own zero-padded images, except a group
    with no image at all, which runs text-only (what the step did before packing)."""
    def embed(model, group, shape):
        flat = {key: value.reshape(-1, *value.shape[len(shape):]) for key, value in group.items()}
        if not flat["has_image"].any():
            flat = {key: flat[key] for key in ("input_ids", "attention_mask")}
        return model.embed(flat).reshape(*shape, -1)

    def loss(t):
        model = nnx.merge(graphdef, t, frozen)
        q, p = embed(model, batch["query"], (B,)), embed(model, batch["positive"], (B,))
        n = embed(model, batch["negatives"], (B, K))
        return info_nce(q, p, n, batch["negative_mask"], TAU)[0]

    return jax.jit(jax.value_and_grad(loss))(trainable)


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.from_dict(CFG)
    model = MllamaModel(cfg, rngs=nnx.Rngs(0))
    lora.add_adapters(model, ADAPTERS, nnx.Rngs(1))
    for _, layer in nnx.iter_graph(model):  # open the cross-attention gates (0 at init) so images matter
        if isinstance(layer, CrossAttentionLayer):
            layer.cross_attn_attn_gate[...] = jnp.full_like(layer.cross_attn_attn_gate[...], 0.5)
            layer.cross_attn_mlp_gate[...] = jnp.full_like(layer.cross_attn_mlp_gate[...], 0.5)
    rng = np.random.default_rng(2)
    for _, linear in lora.adapted_linears(model):
        linear.adapter.lora_b[...] = jnp.asarray(0.3 * rng.standard_normal(linear.adapter.lora_b.shape), jnp.float32)
    graphdef, trainable, frozen = nnx.split(model, lora.LoRAParam, ...)
    batch = per_row_batch(cfg, seed=3)
    return dict(cfg=cfg, graphdef=graphdef, trainable=trainable, frozen=frozen, batch=batch,
                reference=reference_loss_and_grads(graphdef, trainable, frozen, batch))


def placed(batch, mesh):
    return jax.device_put(batch, ts.batch_shardings(batch, mesh))


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["backprop", "gradcache"])
def test_packed_images_give_the_per_row_loss_and_gradients(setup, chunk_size):
    mesh = make_mesh(4, 1, 1, devices=jax.devices()[:4])
    layout = ImageLayout(shards=4, chunks=1 if chunk_size is None else B // chunk_size)
    packed = pack_rows(setup["batch"], layout)
    assert "image_index" not in packed["positive"] and "pixel_values" not in packed["positive"]
    real = int(setup["batch"]["query"]["has_image"].sum() + setup["batch"]["negatives"]["has_image"].sum())
    assert int(packed["images"]["aspect_ratio_mask"][..., 0].sum()) == real  # each real image once, no more
    fn = jax.jit(ts.make_loss_and_grad(setup["graphdef"], mesh, temperature=TAU, chunk_size=chunk_size))
    (loss, _), grads = fn(setup["trainable"], setup["frozen"], placed(packed, mesh), jax.random.key(0))
    ref_loss, ref_grads = setup["reference"]
    # Two float32 programs, each ~3e-5 a logit from exact (2/tau = 100 x ~5 roundings in an embedding): 2x that.
    assert abs(float(loss) - float(ref_loss)) <= 2e-5 * abs(float(ref_loss))
    ours, ref = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    worst = max(rel_err(a, b) for a, b in zip(ours, ref) if np.abs(np.asarray(b)).max() > 0)
    assert worst <= 6e-5, worst
    vision = [np.abs(np.asarray(g)).max() for path, g in nnx.to_flat_state(grads) if path[0] == "vision_model"]
    assert vision and max(vision) > 0  # the gradient reaches the vision adapters through the gathered states


@pytest.mark.numerics
def test_dropout_follows_rows_through_packing_and_chunks(setup):
    """With adapter dropout on, every image and text row keeps its mask whatever the chunking and row order."""
    model = nnx.merge(setup["graphdef"], setup["trainable"], setup["frozen"])
    for _, linear in lora.adapted_linears(model):
        linear.adapter.dropout = 0.2
    graphdef, trainable, frozen = nnx.split(model, lora.LoRAParam, ...)
    mesh = make_mesh(4, 1, 1, devices=jax.devices()[:4])
    losses, grads = {}, {}
    for chunk_size in (None, 4):
        layout = ImageLayout(shards=4, chunks=1 if chunk_size is None else B // chunk_size)
        packed = placed(pack_rows(setup["batch"], layout), mesh)
        fn = jax.jit(ts.make_loss_and_grad(graphdef, mesh, temperature=TAU, chunk_size=chunk_size))
        (loss, _), grads[chunk_size] = fn(trainable, frozen, packed, jax.random.key(5))
        losses[chunk_size] = float(loss)
    assert losses[None] != pytest.approx(float(setup["reference"][0]), rel=1e-3)  # dropout is on
    # Same masks, same rows: the float32 sums reorder only (as in test_train_step's GradCache check).
    assert losses[4] == pytest.approx(losses[None], rel=1e-5)
    diff = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
               for a, b in zip(jax.tree.leaves(grads[4]), jax.tree.leaves(grads[None])))
    norm = sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree.leaves(grads[None]))
    assert (diff / norm) ** 0.5 <= 1e-4


def test_compiled_step_does_no_vision_work_for_text_only_slots(setup):
    """XLA's FLOPs of the step (loops unrolled) match the FLOPs model with vision over the real images only, and
    stay far below the per-row layout's count, where every slot ran the vision tower."""
    cfg, batch = setup["cfg"], setup["batch"]
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    packed = pack_rows(batch, ImageLayout())
    model = nnx.merge(setup["graphdef"], jax.tree.map(jnp.copy, setup["trainable"]), setup["frozen"])
    graphdef, state = ts.init_train_state(model, optax.sgd(1.0), mesh)
    xla = xla_flops(lambda: ts.TrainStep(graphdef, optax.sgd(1.0), mesh, temperature=TAU).lower(
        state, packed, jax.random.key(0)))
    tiles = cfg.vision.max_num_tiles
    queries, negatives = int(batch["query"]["has_image"].sum()), int(batch["negatives"]["has_image"].sum())
    assert packed["images"]["row_id"].shape == (1, queries + negatives)  # one device: no padding images

    def count(calls):
        return step_flops(cfg, calls, ADAPTERS, num_queries=B, num_negatives=K)

    real = count([Encode(B, LQ, tiles, images=queries), Encode(B, LT), Encode(B * K, LT, tiles, images=negatives)])
    per_row = count([Encode(B, LQ, tiles), Encode(B, LT, tiles), Encode(B * K, LT, tiles)])
    print(f"step FLOPs: XLA {xla:.4g}; model, real images {real.hardware:.4g}; per-row layout {per_row.hardware:.4g}")
    assert abs(xla / real.hardware - 1) < 0.10, (xla, real.hardware)
    assert xla < 0.9 * per_row.hardware  # what encoding every slot's image would have cost: outside the same 10%


def test_balanced_order_evens_images_over_cells_and_keeps_equal_rows_in_place():
    layout = ImageLayout(shards=2, chunks=2)
    counts = np.array([5, 5, 5, 5, 0, 0, 0, 0])
    order = balanced_order(counts, layout)
    assert sorted(order) == list(range(8))
    cells = layout.cells(8)
    np.testing.assert_array_equal(np.bincount(cells, weights=counts, minlength=4), [10, 0, 10, 0])
    np.testing.assert_array_equal(np.bincount(cells, weights=counts[order], minlength=4), [5, 5, 5, 5])
    np.testing.assert_array_equal(balanced_order(np.full(8, 3), layout), np.arange(8))
    np.testing.assert_array_equal(balanced_order(counts, ImageLayout(shards=2, chunks=2, balance=False)),
                                  np.arange(8))
    with pytest.raises(ValueError, match="6 rows per process do not split into 2 shards x 2"):
        layout.cells(6)


def test_pack_rows_puts_each_image_in_its_rows_cell(setup):
    layout = ImageLayout(shards=2, chunks=2, multiple=2)
    batch = setup["batch"]
    packed = pack_rows(batch, layout)
    order = packed["row_index"]
    cells = layout.cells(B)
    m = packed["images"]["row_id"].shape[1] // layout.shards
    assert m % 2 == 0
    for name, slots in (("query", 1), ("negatives", K)):
        index = packed[name]["image_index"].reshape(B, slots)
        source = batch[name]
        for r in range(B):
            for s in range(slots):
                old = (order[r], s) if name == "negatives" else (order[r],)
                if index[r, s] < 0:
                    assert not source["has_image"][old]
                    continue
                chunk, shard = divmod(cells[r], layout.shards)
                at = (chunk, shard * m + index[r, s])
                tiles = int(source["aspect_ratio_mask"][old][0].sum())
                np.testing.assert_array_equal(packed["images"]["pixel_values"][at][:tiles],
                                              source["pixel_values"][old][0, :tiles])
                assert not packed["images"]["pixel_values"][at][tiles:].any()
                assert packed["images"]["row_id"][at] == order[r] * (2 + K) + (0 if name == "query" else 2 + s)
