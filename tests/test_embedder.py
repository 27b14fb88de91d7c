"""`Embedder` on raw (text, PIL image) items against HF `MllamaProcessor` + model + mmE5 pooling, with the real
Llama-3 tokenizer; plus bad input, the CLI and the scanned stack's compile cost."""
import json
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

from assets import varied_images
from hf_reference import hf_embed_items
from mme5_jax import Embedder
from mme5_jax.processing import BadItemError
from mme5_jax.testing import multilingual_texts
from tiny_models import save_tiny_hf_dir

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_mllama"))
    return path, save_tiny_hf_dir(path, processor=True)


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder.from_pretrained(model_dir[0], dtype="float32", batch_size=4)


def raw_items():
    texts = multilingual_texts()
    images = varied_images()
    items = [{"text": texts[i % len(texts)], "image": image} for i, (_, image) in enumerate(images)]
    items += [{"text": "<|image_1|>\nRepresent the given image.\n", "image": images[0][1]}]
    items += [{"text": text, "image": None} for text in texts]
    return items


def test_raw_input_parity_with_hf_processor_and_model(model_dir, embedder):
    from transformers import AutoProcessor

    path, hf = model_dir
    items = raw_items()
    assert any(item["image"] is not None and item["image"].height == 1 for item in items)
    ours = embedder.encode(items)
    ref = hf_embed_items(hf, AutoProcessor.from_pretrained(path), items)  # 1-px-high images as they are
    cosines = np.sum(ours * ref, axis=1)
    print(f"raw-input parity: {len(items)} items, min fp32 cosine {cosines.min():.8f}")
    assert ours.shape == (len(items), 32) and ours.dtype == np.float32
    # float32: ours and np.linalg.norm each sum 32 squares (<= 32 x 6e-8, halved by the sqrt) -> 2e-6.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=2e-6)
    # 1 - cos = |ours - ref|^2 / 2 <= 2e-9 at fp32 parity (1e-5 x sqrt(32)); the float32 dot rounds <= 32 x 6e-8 = 2e-6.
    assert cosines.min() >= 0.99999, np.argsort(cosines)[:5]


def test_embedding_independent_of_batch_neighbours(embedder):
    items = raw_items()[:10]
    together = embedder.encode(items)
    alone = np.concatenate([embedder.encode([item]) for item in items[:3]])
    # float32: reordered sums stay within test_model_parity's 1e-5 of max|component| (<= 0.53 here) -> 5e-6.
    np.testing.assert_allclose(together[:3], alone, atol=5e-6)


def test_truncation_at_max_length(embedder):
    long_text = " ".join(["multilingual"] * 400)
    truncated = embedder.processor.tokenize([long_text])[0]
    assert len(truncated) == 256
    a, b = embedder.encode([{"text": long_text, "image": None}, {"text": long_text + " tail", "image": None}])
    np.testing.assert_allclose(a, b, atol=5e-6)  # float32 reorderings, as in the test above -> 5e-6


def test_bad_items_name_their_index(embedder, tmp_path):
    good = {"text": "fine", "image": None}
    missing = {"text": "x", "image": str(tmp_path / "nope.jpg")}
    corrupt_path = tmp_path / "corrupt.jpg"
    corrupt_path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(BadItemError, match="item 5"):
        embedder.encode([good] * 5 + [missing])
    with pytest.raises(BadItemError, match="item 2"):
        embedder.encode([good, good, {"text": "y", "image": str(corrupt_path)}])
    with pytest.raises(BadItemError, match="item 1"):
        embedder.encode([good, ("not", "a dict")])
    with pytest.raises(BadItemError, match="item 0"):
        embedder.encode([{"text": "z", "image": 42}])


def test_weight_shape_mismatch_names_tensor_and_shapes(model_dir, tmp_path):
    from mme5_jax.hf.weights import WeightError

    path, _ = model_dir
    bad = tmp_path / "bad"
    os.makedirs(bad)
    for name in os.listdir(path):
        if name != "config.json":
            os.symlink(os.path.join(path, name), bad / name)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["intermediate_size"] = 80
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightError, match=r"mlp\.(gate|up|down)_proj\.weight.*\(64, 32\).*\(80, 32\)|"
                                          r"mlp\.down_proj\.weight.*\(32, 64\).*\(32, 80\)"):
        Embedder.from_pretrained(str(bad))


def test_cli_embed(model_dir, tmp_path):
    from mme5_jax.cli import main

    path, _ = model_dir
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "red.png")
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "a red image", "image": "red.png"}\n{"text": "just text", "image": null}\n')
    out = tmp_path / "emb.npy"
    assert main(["embed", "--model", path, "--input", str(items), "--output", str(out)]) == 0
    vectors = np.load(out)
    ref = Embedder.from_pretrained(path).encode([{"text": "a red image", "image": str(tmp_path / "red.png")},
                                                 {"text": "just text", "image": None}])
    np.testing.assert_array_equal(vectors, ref)  # the CLI's Embedder is this one (float32, batch 8, no mesh): same ops


def test_scanned_text_stack_compile_cost_is_flat_in_depth():
    """HLO size and compile time of the text stack at 4 vs 20 layers (same 3-self + 1-cross period)."""
    from flax import nnx

    from mme5_jax.config import TextConfig
    from mme5_jax.model.text import TextModel

    stats = {}
    for layers in (4, 20):
        cfg = TextConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64,
                         cross_attention_layers=tuple(range(3, layers, 4)))
        model = TextModel(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
        ids = np.ones((2, 16), np.int32)
        start = time.perf_counter()
        lowered = fn.lower(state, ids, ids)
        lowered.compile()
        stats[layers] = (len(lowered.as_text()), time.perf_counter() - start)
    print(f"text stack HLO chars / compile s: 4 layers {stats[4]}, 20 layers {stats[20]}")
    assert stats[20][0] < 1.1 * stats[4][0]


def test_sharded_embedder_matches_single_device(model_dir, embedder):
    from mme5_jax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = Embedder.from_pretrained(model_dir[0], batch_size=4, mesh=mesh)
    kernel = sharded.model.language_model.blocks.layers.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    items = raw_items()[:6] + raw_items()[-3:]
    # float32: split contractions reorder sums, within test_model_parity's 1e-5 of max|component| (<= 0.53) -> 5e-6.
    np.testing.assert_allclose(sharded.encode(items), embedder.encode(items), atol=5e-6)


def test_transformers_446_key_layout_loads_identically(model_dir, tmp_path):
    """Released mmE5 checkpoints use the 4.46 on-disk keys (`language_model.model.layers.N...`)."""
    from safetensors.numpy import load_file, save_file

    from mme5_jax.config import ModelConfig
    from mme5_jax.hf.layout import canonical_key, installed_key
    from mme5_jax.hf.reader import load_hf_params

    path, _ = model_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    old = {installed_key(canonical_key(k), "4.46"): v for k, v in tensors.items()}
    assert any(k.startswith("language_model.model.layers.") for k in old) and "language_model.lm_head.weight" in old
    save_file(old, str(tmp_path / "model.safetensors"))
    cfg = ModelConfig.from_pretrained(path)
    cfg.save_pretrained(tmp_path, layout="4.46")
    new_params = load_hf_params(path, cfg, np.float32, progress=False)
    old_params = load_hf_params(str(tmp_path), ModelConfig.from_pretrained(tmp_path), np.float32, progress=False)
    assert new_params.keys() == old_params.keys()
    assert all(np.array_equal(new_params[k], old_params[k]) for k in new_params)
