"""The train step on 8 CPU devices: exact loss and adapter gradients against an independent float64 reference
(Hugging Face + PEFT DoRA in torch), GradCache chunking, the strided chunk layout, InfoNCE within groups of
examples, non-finite skips, schedules."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from hf_reference import rel_err
from mme5_jax.config import ModelConfig
from mme5_jax.model import lora
from mme5_jax.model.mllama import MllamaModel, model_from_params
from mme5_jax.sharding import make_mesh
from mme5_jax import train_step as ts
from tiny_models import GQA_LLAMA3_CONFIG, load_tiny_params, save_tiny_hf_dir

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process

B, K, TAU = 8, 2, 0.02
ADAPTERS = lora.AdapterConfig(kind="dora", rank=4, alpha=8.0, dropout=0.0)


def make_batch(vocab_size, b, k, seed=0):
    """A text-only global batch in the pipeline's layout (BOS 1, right padding with 0, random lengths 3..8).

    Also returns the rows example-major ([b * (2 + k)] arrays) and their index table [b, 2 + k]."""
    rng = np.random.default_rng(seed)
    slots = 2 + k
    lengths = rng.integers(3, 9, b * slots)
    ids = np.zeros((b * slots, 8), np.int64)
    mask = (np.arange(8) < lengths[:, None]).astype(np.int64)
    ids[:] = np.where(mask, rng.integers(3, vocab_size - 1, ids.shape), 0)
    ids[:, 0] = 1
    rows = {"input_ids": ids, "attention_mask": mask}
    idx = np.arange(b * slots).reshape(b, slots)
    return {"query": {key: v[idx[:, 0]] for key, v in rows.items()},
            "positive": {key: v[idx[:, 1]] for key, v in rows.items()},
            "negatives": {key: v[idx[:, 2:]] for key, v in rows.items()},
            "negative_mask": rng.random((b, k)) > 0.3}, rows, idx


def perturb_adapters(model, seed):
    """Non-zero B and a magnitude away from ||W||, so every adapter term is exercised."""
    rng = np.random.default_rng(seed)
    for _, linear in lora.adapted_linears(model):
        adapter = linear.adapter
        adapter.lora_b[...] = jnp.asarray(0.3 * rng.standard_normal(adapter.lora_b.shape), jnp.float32)
        if adapter.magnitude is not None:
            noise = 1 + 0.1 * rng.standard_normal(adapter.magnitude.shape)
            adapter.magnitude[...] = adapter.magnitude[...] * jnp.asarray(noise, jnp.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gqa"))
    hf = save_tiny_hf_dir(path, GQA_LLAMA3_CONFIG)
    cfg, params = load_tiny_params(path)
    model = model_from_params(cfg, params)
    lora.add_adapters(model, ADAPTERS, nnx.Rngs(1))
    perturb_adapters(model, seed=2)
    batch, rows, idx = make_batch(hf.config.text_config.vocab_size, B, K)
    return dict(hf=hf, cfg=cfg, params=params, model=model, batch=batch, rows=rows, idx=idx)


@pytest.fixture(scope="module")
def reference(setup):
    """float64 loss and adapter gradients from HF + PEFT, PEFT-keyed."""
    model, rows, idx = setup["model"], setup["rows"], setup["idx"]
    peft_model = get_peft_model(setup["hf"].double(), LoraConfig(
        r=ADAPTERS.rank, lora_alpha=ADAPTERS.alpha, lora_dropout=0.0, use_dora=True,
        target_modules=list(lora.MME5_PEFT_TARGETS)))
    ours = lora.peft_state_dict(model, ADAPTERS)
    result = set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v).double() for k, v in ours.items()})
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    peft_model.eval()
    out = peft_model(input_ids=torch.from_numpy(rows["input_ids"]),
                     attention_mask=torch.from_numpy(rows["attention_mask"]), output_hidden_states=True)
    last = torch.from_numpy(rows["attention_mask"].sum(1) - 1)
    emb = torch.nn.functional.normalize(out.hidden_states[-1][torch.arange(len(last)), last], dim=-1)
    emb = emb[torch.from_numpy(idx.reshape(-1))].reshape(B, 2 + K, -1)
    q, p, n = emb[:, 0], emb[:, 1], emb[:, 2:]
    hard = torch.einsum("nd,nkd->nk", q, n).masked_fill(~torch.from_numpy(setup["batch"]["negative_mask"]),
                                                        -math.inf)
    logits = torch.cat([q @ p.T, hard], 1) / TAU
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(B))
    loss.backward()
    grads = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            grads[key] = np.zeros(param.shape) if param.grad is None else param.grad.numpy()
    assert set(grads) == set(ours)
    return float(loss), grads


def fresh(model):
    """A copy with its own buffers: the train state takes over (and donates) the arrays it is given."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def sgd_step(setup, mesh, chunk_size=None):
    """One step with SGD(lr=1): the change of the adapters is exactly minus the gradient."""
    graphdef, state = ts.init_train_state(fresh(setup["model"]), optax.sgd(1.0), mesh)
    before = jax.tree.map(np.asarray, state.trainable)
    step = ts.TrainStep(graphdef, optax.sgd(1.0), mesh, temperature=TAU, chunk_size=chunk_size)
    new_state, metrics = step(state, setup["batch"], jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda old, new: old - np.asarray(new), before, new_state.trainable)
    return graphdef, new_state, metrics, grads


def peft_keyed(setup, graphdef, frozen, grads):
    return lora.peft_state_dict(nnx.merge(graphdef, grads, frozen), ADAPTERS)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_loss_and_gradients_match_float64_reference(setup, reference, shape):
    ref_loss, ref_grads = reference
    graphdef, state, metrics, grads = sgd_step(setup, make_mesh(*shape))
    # float32: ~5 roundings (6e-8) left in an embedding x 2/tau = 100 -> 3e-5 a logit, 6e-5 a row; loss ~15: 4e-6.
    assert abs(float(metrics["loss"]) - ref_loss) <= 1e-5 * ref_loss
    ours = peft_keyed(setup, graphdef, state.frozen, grads)
    worst = max(rel_err(ours[k], ref_grads[k]) for k in ref_grads if np.abs(ref_grads[k]).max() > 0)
    assert worst <= 3e-5, worst  # the softmax weights, so every adapter gradient, inherit the logits' 3e-5
    assert int(metrics["nonfinite_steps"]) == 0 and int(state.step) == 1


# A small text model (2 scanned blocks of self + cross layers) for the many GradCache compiles.
SMALL = {"vision": {"hidden_size": 16, "num_hidden_layers": 1, "num_global_layers": 1, "num_attention_heads": 2,
                    "intermediate_size": 16, "vision_output_dim": 32, "image_size": 28, "patch_size": 14,
                    "max_num_tiles": 1, "intermediate_layers_indices": [0]},
         "text": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 64, "cross_attention_layers": [1, 3]},
         "image_token_index": 128}


@pytest.fixture(scope="module")
def dropout_setup():
    """Adapter dropout on, to check that chunking leaves the masks unchanged."""
    model = MllamaModel(ModelConfig.from_dict(SMALL), rngs=nnx.Rngs(0))
    lora.add_adapters(model, lora.AdapterConfig(kind="dora", rank=4, alpha=8.0, dropout=0.2), nnx.Rngs(1))
    perturb_adapters(model, seed=2)
    return dict(model=model, batch=make_batch(SMALL["text"]["vocab_size"], B, K, seed=4)[0])


def tree_rel_err(ours, ref):
    """Relative error of a whole gradient: ||ours - ref|| / ||ref|| over all leaves."""
    diff = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
               for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)))
    return math.sqrt(diff / sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(ref)))


def test_gradcache_chunks_match_plain_backprop_with_dropout(dropout_setup):
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    graphdef, state = ts.init_train_state(fresh(dropout_setup["model"]), optax.sgd(1.0), mesh)
    batch = dropout_setup["batch"]

    def run(chunk_size):
        fn = ts.make_loss_and_grad(graphdef, mesh, temperature=TAU, chunk_size=chunk_size)
        (loss, _), grads = jax.jit(fn)(state.trainable, state.frozen, batch, jax.random.PRNGKey(0))
        return float(loss), grads

    seeded = jax.jit(ts.make_loss_and_grad(graphdef, mesh, temperature=TAU))
    def loss_for(seed):
        return float(seeded(state.trainable, state.frozen, batch, jax.random.PRNGKey(seed))[0][0])

    (plain_loss, _), plain = seeded(state.trainable, state.frozen, batch, jax.random.PRNGKey(0))
    plain_loss = float(plain_loss)
    assert loss_for(1) != plain_loss and loss_for(0) == plain_loss  # dropout is on and follows the step key
    errors = {}
    for chunk_size in (1, 2, B):
        loss, grads = run(chunk_size)
        # Encoding is row-local (chunks give the same embeddings); at most the 8-row mean reorders: 8 x 1.2e-7 = 1e-6.
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        errors[chunk_size] = tree_rel_err(grads, plain)
    print("GradCache gradient relative error by chunk size:", errors)
    # Chunked re-encoding sums the same float32 terms in another order (and XLA:CPU's thread split varies with
    # load): measured 2.7e-7 to 1.5e-6, so the bound is about a hundred float32 ulps (eps 1.2e-7), as below.
    assert max(errors.values()) <= 1e-5, errors


def test_strided_chunks_need_no_all_to_all(setup):
    mesh = make_mesh(8, 1, 1)
    graphdef, state = ts.init_train_state(fresh(setup["model"]), optax.sgd(1.0), mesh)
    batch, _, _ = make_batch(setup["cfg"].text.vocab_size, 16, K, seed=3)
    step = ts.TrainStep(graphdef, optax.sgd(1.0), mesh, chunk_size=8)
    hlo = step.lower(state, batch, jax.random.PRNGKey(0)).compile().as_text()
    assert "all-to-all" not in hlo


@pytest.fixture(scope="module")
def group_setup(setup):
    """16 examples on 8 devices, and the reference for groups of 4: the plain loss run on each group's 4 examples
    alone, losses and adapter gradients averaged over the groups."""
    mesh = make_mesh(8, 1, 1)
    graphdef, state = ts.init_train_state(fresh(setup["model"]), optax.sgd(1.0), mesh)
    batch = make_batch(setup["cfg"].text.vocab_size, 16, K, seed=3)[0]
    alone = jax.jit(ts.make_loss_and_grad(graphdef, mesh, temperature=TAU))
    parts = [alone(state.trainable, state.frozen, jax.tree.map(lambda x: x[i:i + 4], batch), jax.random.PRNGKey(0))
             for i in range(0, 16, 4)]
    loss = np.mean([float(loss) for (loss, _), _ in parts])
    grads = jax.tree.map(lambda *g: sum(np.asarray(x, np.float64) for x in g) / len(g), *[g for _, g in parts])
    return dict(mesh=mesh, graphdef=graphdef, state=state, batch=batch, reference=(loss, grads))


def step_loss_and_grad(s, **kwargs):
    """(loss, adapter gradients, compiled HLO) of the loss function `TrainStep` builds with `kwargs`."""
    step = ts.TrainStep(s["graphdef"], optax.sgd(1.0), s["mesh"], temperature=TAU, **kwargs)
    args = (s["state"].trainable, s["state"].frozen, s["batch"], jax.random.PRNGKey(0))
    compiled = jax.jit(step.loss_and_grad).lower(*args).compile()
    (loss, _), grads = compiled(*args)
    return float(loss), grads, compiled.as_text()


def worst_rel_err(ours, ref):
    return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)) if np.abs(b).max() > 0)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_contrastive_group_of_the_whole_batch_is_the_global_loss(group_setup, chunk_size):
    loss, grads, _ = step_loss_and_grad(group_setup, chunk_size=chunk_size, contrastive_group=16)
    ref_loss, ref_grads, _ = step_loss_and_grad(group_setup, chunk_size=chunk_size)
    # Same dots on a [1, 16] view; 18-term log-sum-exps and the 16-row mean may reorder: 18 x 1.2e-7 = 2e-6 -> 3e-6.
    assert loss == pytest.approx(ref_loss, rel=3e-6)
    assert worst_rel_err(grads, ref_grads) <= 3e-6


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_contrastive_groups_match_a_per_group_reference(group_setup, chunk_size):
    """Groups of 4 consecutive examples (2 devices each); GradCache's strided chunks mix the groups."""
    loss, grads, hlo = step_loss_and_grad(group_setup, chunk_size=chunk_size, contrastive_group=4)
    ref_loss, ref_grads = group_setup["reference"]
    # Two float32 runs differing in summation order, each within 1e-5 (loss) / 3e-5 (grads) of float64 (test above).
    assert loss == pytest.approx(ref_loss, rel=2e-5)
    assert worst_rel_err(grads, ref_grads) <= 6e-5
    assert "all-to-all" not in hlo


def test_non_finite_update_is_skipped(setup):
    mesh = make_mesh(8, 1, 1)
    optimizer = ts.make_optimizer(ts.make_schedule("mme5", 1e-3, 100))
    graphdef, state = ts.init_train_state(fresh(setup["model"]), optimizer, mesh)
    step = ts.TrainStep(graphdef, optimizer, mesh, temperature=TAU)
    state, metrics = step(state, setup["batch"], jax.random.PRNGKey(0))
    assert int(metrics["nonfinite_steps"]) == 0 and int(state.step) == 1 and float(metrics["lr"]) == 0.0
    leaves, treedef = jax.tree.flatten(state.trainable)
    leaves[0] = jax.device_put(leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan), leaves[0].sharding)
    state = dataclasses.replace(state, trainable=jax.tree.unflatten(treedef, leaves))
    before = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
    state, metrics = step(state, setup["batch"], jax.random.PRNGKey(1))
    assert int(metrics["nonfinite_steps"]) == 1 and int(state.nonfinite_steps) == 1 and int(state.step) == 1
    after = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(old, new)


def test_mme5_schedule_is_deepspeed_warmup_decay():
    total, peak = 200, 1e-5
    schedule = ts.make_schedule("mme5", peak, total)
    warmup = 10  # 5% of 200
    # float32 schedules: a few roundings (6e-8 each) against float64 formulas (0 exactly at the end): 1e-5 is ample.
    for step in (0, 1, 5, 9):
        assert float(schedule(step)) == pytest.approx(peak * math.log(step + 1) / math.log(warmup), rel=1e-5)
    for step in (10, 100, 199, 200):
        assert float(schedule(step)) == pytest.approx(peak * (total - step) / (total - warmup), rel=1e-5, abs=1e-12)
    for name in ("cosine", "linear", "constant"):
        s = ts.make_schedule(name, peak, total)
        assert float(s(0)) == 0.0 and float(s(warmup)) == pytest.approx(peak, rel=1e-5)
    with pytest.raises(ValueError, match="schedule 'step'"):
        ts.make_schedule("step", peak, total)
