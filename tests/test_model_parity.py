"""Parity of our Flax Mllama against HF torch on random tiny configs (fp32 within 1e-5 relative; bf16 cosine).

Worst relative errors seen are printed (`pytest -s`) for the closing note.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import hf_forward, random_batch, rel_err
from mme5_jax.model.mllama import model_from_params, pool_last_token
from tiny_models import EDGE_LAYERS_CONFIG, GQA_LLAMA3_CONFIG, HF_TEST_CONFIG, load_tiny_params, save_tiny_hf_dir

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process

TOL = 1e-5  # float32 vs float32: ~100 eps (1.2e-7) of rounding over <= 10 layers of <= 96-term dots (max err/max)
ALL_GRIDS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
WORST = {}


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    """Prints the worst relative errors over the module (run with -s for the closing note)."""
    yield
    for key, value in sorted(WORST.items()):
        print(f"worst {key}: {value:.3g}")


def note(name, value):
    WORST[name] = max(WORST.get(name, 0.0), value)
    assert value <= TOL, f"{name}: relative error {value:.3g} > {TOL}"


@pytest.fixture(scope="module", params=["hf_test", "edge_layers", "gqa_llama3"])
def pair(request, tmp_path_factory):
    config = {"hf_test": HF_TEST_CONFIG, "edge_layers": EDGE_LAYERS_CONFIG, "gqa_llama3": GQA_LLAMA3_CONFIG}
    path = str(tmp_path_factory.mktemp(request.param))
    hf = save_tiny_hf_dir(path, config[request.param])
    cfg, params = load_tiny_params(path)
    ours = Compiled(model_from_params(cfg, params))
    bf16 = Compiled(model_from_params(cfg, load_tiny_params(path, jnp.bfloat16)[1], "bfloat16"))
    return request.param, hf, ours, bf16


def vision_and_projector(model, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
    features = model.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
    return features, model.multi_modal_projector(features)


class Compiled:
    """Jitted entry points with the parameters as arguments, compiled once per input shape."""

    def __init__(self, model):
        graphdef, self.state = nnx.split(model)
        def m(s):
            return nnx.merge(graphdef, s)
        self._forward = jax.jit(lambda s, a: m(s)(a, collect=True))
        self._embed = jax.jit(lambda s, a: m(s).embed(a))
        self._vision = jax.jit(lambda s, *images: vision_and_projector(m(s), *images))

    @staticmethod
    def inputs(batch):
        keys = batch.keys() if batch["has_image"].any() else ("input_ids", "attention_mask")
        return {k: jnp.asarray(batch[k]) for k in keys}

    def forward(self, batch):
        return self._forward(self.state, self.inputs(batch))

    def embed(self, batch):
        return np.asarray(self._embed(self.state, self.inputs(batch)))

    def vision(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        return self._vision(self.state, pixel_values, aspect_ratio_ids, aspect_ratio_mask)


CROSS_LAYERS = {"hf_test": [1], "edge_layers": [0, 3], "gqa_llama3": [3, 8]}


def compare_row(name, final, layers, hf_hidden, length, text_only):
    """One sample: HF lists the embeddings, then each *executed* layer's output, the last one after the final norm
    (text-only inputs skip the cross-attention layers)."""
    executed = [i for i in range(layers.shape[0]) if not (text_only and i in CROSS_LAYERS[name])]
    assert len(hf_hidden) == len(executed) + 1
    for k, layer in enumerate(executed[:-1]):
        note(f"{name} text layer", rel_err(layers[layer, :length], hf_hidden[k + 1][0]))
    note(f"{name} final norm", rel_err(final[:length], hf_hidden[-1][0]))


def test_vision_and_projector_all_aspect_ratios(pair):
    name, hf, ours, _ = pair
    import torch

    batch = random_batch(hf.config, [6] * 8, image_rows=set(range(8)), grids=ALL_GRIDS)
    pv, ar, arm = (batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"))
    with torch.no_grad():
        ref = hf.model.vision_model(torch.from_numpy(pv), torch.from_numpy(ar), torch.from_numpy(arm))
        ref = ref.last_hidden_state
        ref_proj = hf.model.multi_modal_projector(ref).numpy()
    got, got_proj = ours.vision(pv[:, 0], ar[:, 0], arm[:, 0])
    note(f"{name} vision", rel_err(got, ref.numpy()[:, 0]))
    note(f"{name} projector", rel_err(got_proj, ref_proj[:, 0]))


@pytest.mark.parametrize("kind", ["image", "text", "mixed"])
def test_text_hidden_states_and_embeddings(pair, kind):
    """Every sample equals HF's forward of that sample alone (batch independence), padding and all."""
    name, hf, ours, bf16 = pair
    lengths = [9, 5, 12, 7]
    image_rows = {"image": {0, 1, 2, 3}, "text": set(), "mixed": {1, 2}}[kind]
    batch = random_batch(hf.config, lengths, image_rows, grids=[(2, 2), (1, 3), (4, 1), (1, 1)], seed=len(kind))
    final, layers = ours.forward(batch)
    emb = np.asarray(pool_last_token(final, jnp.asarray(batch["attention_mask"])))
    emb16 = bf16.embed(batch)
    for row in range(len(lengths)):
        hidden, ref_emb = hf_forward(hf, batch, rows=[row])
        text_only = not batch["has_image"][row]
        compare_row(name, np.asarray(final)[row], np.asarray(layers)[:, row], hidden, lengths[row], text_only)
        note(f"{name} embedding", rel_err(emb[row], ref_emb[0]))
        cosine = float(emb16[row] @ ref_emb[0] / np.linalg.norm(emb16[row]))
        WORST[f"{name} bf16 1-cosine"] = max(WORST.get(f"{name} bf16 1-cosine", 0.0), 1 - cosine)
        # bf16 rounds to 2^-9 ~ 2e-3, ~20 roundings deep: |emb16 - ref| <= 4e-2, 1 - cos = |.|^2 / 2 <= 1e-3.
        assert cosine >= 0.999, f"bf16 embedding cosine {cosine}"


def test_whole_batch_matches_hf_when_homogeneous(pair):
    """A batch of image samples run together in HF equals ours run together (same padding and masks)."""
    name, hf, ours, _ = pair
    batch = random_batch(hf.config, [8, 4, 6], {0, 1, 2}, grids=[(1, 2), (2, 1), (1, 1)], seed=7)
    final, _ = ours.forward(batch)
    hidden, _ = hf_forward(hf, batch)
    mask = batch["attention_mask"].astype(bool)
    note(f"{name} final norm", rel_err(np.asarray(final)[mask], hidden[-1][mask]))
