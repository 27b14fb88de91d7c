"""Adapters against PEFT: our LoRA/DoRA exported to PEFT's files give the same embeddings through Hugging Face,
target selection equals mmE5's PEFT target list, and merging is exact."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from peft import PeftModel
from safetensors.numpy import save_file

from hf_reference import hf_forward, random_batch
from mme5_jax.config import ModelConfig
from mme5_jax.model import lora
from mme5_jax.model.mllama import MllamaModel, model_from_params
from tiny_models import EDGE_LAYERS_CONFIG, load_tiny_params, save_tiny_hf_dir, tiny_hf_model

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def embed(model, batch):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, a: nnx.merge(graphdef, s).embed(a))(state, batch))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("edge"))
    hf = save_tiny_hf_dir(path, EDGE_LAYERS_CONFIG)
    cfg, params = load_tiny_params(path)
    batch = random_batch(hf.config, [7, 5, 8, 4, 6, 8], image_rows={0, 2, 3}, grids=[(1, 1), (2, 2), (1, 3)])
    return dict(path=path, cfg=cfg, params=params, batch=batch)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_matches_peft_and_merges(base, tmp_path, kind):
    cfg = lora.AdapterConfig(kind=kind, rank=4, alpha=16.0, dropout=0.1)
    model = model_from_params(base["cfg"], base["params"])
    lora.add_adapters(model, cfg, nnx.Rngs(3))
    rng = np.random.default_rng(1)
    for _, linear in lora.adapted_linears(model):
        linear.adapter.lora_b[...] = jnp.asarray(0.5 * rng.standard_normal(linear.adapter.lora_b.shape), jnp.float32)

    export = tmp_path / "adapter"
    export.mkdir()
    save_file(lora.peft_state_dict(model, cfg), str(export / "adapter_model.safetensors"))
    (export / "adapter_config.json").write_text(json.dumps(lora.adapter_config_json(cfg, base["path"])))
    peft_model = PeftModel.from_pretrained(tiny_hf_model(EDGE_LAYERS_CONFIG), str(export)).eval()
    injected = sorted(name[len(lora.PEFT_PREFIX):] for name, module in peft_model.named_modules()
                      if hasattr(module, "lora_A") and name.startswith(lora.PEFT_PREFIX))
    assert injected == sorted(lora.peft_target_modules(model))

    batch = base["batch"]
    ours = embed(model, {k: jnp.asarray(v) for k, v in batch.items()})
    image_rows, text_rows = [0, 2, 3], [1, 4, 5]
    for rows in (image_rows, text_rows):
        _, ref = hf_forward(peft_model, batch, rows)
        # float64 cosine of fp32 embeddings: 1 - cos = |ours - ref|^2 / 2 <= 2e-9 at parity (1e-5 x sqrt(32) apart).
        assert cosine(ours[rows], ref).min() >= 0.99999
    base_model = model_from_params(base["cfg"], base["params"])
    plain = embed(base_model, {k: jnp.asarray(v) for k, v in batch.items()})
    assert cosine(ours, plain).min() < 0.9999  # the adapters really change the embeddings

    lora.merge_adapters(model)
    assert not lora.adapted_linears(model) and not jax.tree.leaves(nnx.state(model, lora.LoRAParam))
    merged = embed(model, {k: jnp.asarray(v) for k, v in batch.items()})
    # Merging rounds each weight a few times (6e-8 relative): embeddings move ~1e-6, so 1 - cos ~1e-11 << 1e-5.
    assert cosine(merged, ours).min() >= 0.99999


def test_mme5_targets_and_11b_parameter_count():
    big = ModelConfig.from_yaml("llama-3.2-11b-vision")

    def build():
        model = MllamaModel(big, dtype="bfloat16", rngs=nnx.Rngs(0))
        lora.add_adapters(model, lora.AdapterConfig(), nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    paths = [p for p, _ in lora.adapted_linears(model)]
    assert not any("mlp.fc" in p or "gate_proj" in p or "up_proj" in p or "projector" in p for p in paths)
    # 40 vision layers x 4 + 40 text layers x 5, counted per stacked layer.
    assert len(lora.peft_target_modules(model)) == 40 * 4 + 40 * 5
    assert lora.count_adapter_params(model) == 18_472_960  # mmE5 reports about 18.5M


def test_bad_config_and_targets_are_named():
    with pytest.raises(ValueError, match="kind 'ia3'"):
        lora.AdapterConfig(kind="ia3")
    with pytest.raises(ValueError, match="not a valid regex"):
        lora.AdapterConfig(targets=("q_proj(",))
    model = nnx.eval_shape(lambda: MllamaModel(ModelConfig.from_yaml("tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no Linear module matches"):
        lora.add_adapters(model, lora.AdapterConfig(targets=("nothing",)), nnx.Rngs(0))


def test_dropout_keep_mask_rate_and_independence():
    """The hashed keep mask keeps 1 - rate of each row (binomial bound), draws differently per key and per
    element, and is a function of (key, position) alone."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(8))
    rate, shape = 0.1, (96, 130)
    mask = np.asarray(lora.keep_mask(keys, shape, rate))
    n = np.prod(shape)
    # 6 sigma of a binomial per row, and of the pooled share.
    assert np.abs(mask.mean(axis=(1, 2)) - (1 - rate)).max() < 6 * np.sqrt(rate * (1 - rate) / n)
    assert abs(mask.mean() - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / (8 * n))
    # Rows are independent: two rows agree where both keep or both drop, 1 - 2 rate (1 - rate) of the time.
    agree = (mask[0] == mask[1]).mean()
    assert abs(agree - (1 - 2 * rate * (1 - rate))) < 6 * np.sqrt(0.18 * 0.82 / n)
    # Neighbouring elements are independent too: a dropped element's right neighbour is dropped at the base rate.
    dropped = ~mask[:, :, :-1]
    assert abs((~mask[:, :, 1:])[dropped].mean() - rate) < 6 * np.sqrt(rate * (1 - rate) / dropped.sum())
    # Raw uint32 key data gives the same masks as typed keys; a prefix of the rows gives their masks.
    np.testing.assert_array_equal(np.asarray(lora.keep_mask(jax.random.key_data(keys), shape, rate)), mask)
    np.testing.assert_array_equal(np.asarray(lora.keep_mask(keys[3:5], shape, rate)), mask[3:5])
    assert np.asarray(lora.keep_mask(keys, (7,), 0.0)).all()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_gradient_rule_equals_autodiff_of_peft_formula(dropout):
    """The hand-written DoRA gradient (`lora._dora`) against autodiff of PEFT's expression
    x W + (g - 1) x' W + g s x' A B, in float64: values, and gradients for x, W, A, B and the magnitude."""
    scale = 4.0
    keys = jax.random.split(jax.random.key(2), 5) if dropout else None
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w, a, b = (jnp.asarray(rng.standard_normal(shape)) for shape in ((24, 20), (24, 3), (3, 20)))
        m = jnp.linalg.norm(w, axis=0) * jnp.asarray(1 + 0.2 * rng.standard_normal(20))
        x, probe = jnp.asarray(rng.standard_normal((5, 7, 24))), jnp.asarray(rng.standard_normal((5, 7, 20)))

        def gain(w, a, b, m):
            return m / jax.lax.stop_gradient(jnp.linalg.norm(w + scale * a @ b, axis=0))

        def reference(w, a, b, m, x):
            x_drop = x if keys is None else jnp.where(lora.keep_mask(keys, x.shape[1:], dropout), x / (1 - dropout), 0)
            g = gain(w, a, b, m)
            return x @ w + (g - 1) * (x_drop @ w) + g * scale * (x_drop @ a @ b)

        def ours(w, a, b, m, x):
            return lora._dora(x, x @ w, w, a, b, gain(w, a, b, m), keys, scale, dropout)

        params = (w, a, b, m, x)
        np.testing.assert_allclose(ours(*params), reference(*params), rtol=1e-12, atol=1e-12)
        want_grads = jax.grad(lambda *p: jnp.sum(reference(*p) * probe), argnums=range(5))(*params)
        got_grads = jax.grad(lambda *p: jnp.sum(ours(*p) * probe), argnums=range(5))(*params)
        for name, got, want in zip(("W", "A", "B", "magnitude", "x"), got_grads, want_grads):
            assert float(jnp.max(jnp.abs(want))) > 0, name
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(want))),
                                       err_msg=name)
