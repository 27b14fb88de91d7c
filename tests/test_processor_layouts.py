"""Both on-disk processor layouts load everywhere with identical results: transformers 5.x's `save_pretrained`
(image settings inside `processor_config.json`, no `preprocessor_config.json`) and the 4.46 / released-checkpoint
layout (`preprocessor_config.json`). Exports come out in the layout both versions load. Also: only the training
pipeline applies mmE5's 1-px-high fix."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from assets import make_processor_dir
from hf_reference import hf_embed_items
from tiny_models import TILE, save_tiny_hf_dir

from mme5_jax.processing import (DEFAULT_MAX_IMAGE_PIXELS, MllamaInputProcessor, has_image_processor_config,
                                 load_image_processor_config)
from mme5_jax.testing import real_photos

LAYOUTS = ("5.x", "4.46")
# transformers 4.46 passes every key of processor_config.json except these to `MllamaProcessor(image_processor,
# tokenizer)`, so any other key (an `image_processor` section above all) makes it fail.
KEYS_446_ACCEPTS = {"processor_class", "auto_map"}


def photo(width, height):
    return real_photos()[0][1].resize((width, height), Image.Resampling.BILINEAR)


def items():
    return [{"text": "Represent the given image.\n", "image": photo(60, 1)},  # 1 px high
            {"text": "Find the caption: a cat on a mat.\n", "image": photo(70, 40)},
            {"text": "Un chat sur un tapis.", "image": None}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{layout: HF model directory}: the same tiny model and processor saved by the installed transformers, and
    rewritten into the 4.46 layout."""
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("layouts")
    new = str(root / "saved_5x")
    hf = save_tiny_hf_dir(new)
    AutoProcessor.from_pretrained(make_processor_dir(str(root / "processor"), image_size=TILE)).save_pretrained(new)
    old = str(root / "saved_446")
    shutil.copytree(new, old)
    with open(os.path.join(old, "processor_config.json")) as f:
        processor = json.load(f)
    with open(os.path.join(old, "preprocessor_config.json"), "w") as f:
        json.dump(processor.pop("image_processor"), f, indent=2)
    with open(os.path.join(old, "processor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
    return {"5.x": new, "4.46": old, "hf": hf}


def assert_loads_in_446_and_5x(path):
    """The layout both versions load: settings in preprocessor_config.json, none in processor_config.json."""
    from transformers import AutoProcessor

    assert os.path.isfile(os.path.join(path, "preprocessor_config.json"))
    with open(os.path.join(path, "processor_config.json")) as f:
        assert set(json.load(f)) <= KEYS_446_ACCEPTS
    assert AutoProcessor.from_pretrained(path).image_processor.max_image_tiles == 4


def test_the_two_layouts_on_disk(dirs):
    new, old = dirs["5.x"], dirs["4.46"]
    assert not os.path.exists(os.path.join(new, "preprocessor_config.json"))
    with open(os.path.join(new, "processor_config.json")) as f:
        assert json.load(f)["image_processor"]["size"] == {"height": TILE, "width": TILE}
    assert_loads_in_446_and_5x(old)
    assert has_image_processor_config(new) and has_image_processor_config(old)
    assert load_image_processor_config(new) == load_image_processor_config(old)


def test_the_section_wins_over_a_stale_preprocessor_config_as_in_transformers(dirs, tmp_path):
    """A 5.x save into an older directory leaves its preprocessor_config.json behind; 5.x ignores it."""
    from transformers import AutoImageProcessor

    from mme5_jax.base_checkpoint import copy_side_files

    both, copy = tmp_path / "both", tmp_path / "copy"
    shutil.copytree(dirs["5.x"], both)
    settings = load_image_processor_config(both)
    (both / "preprocessor_config.json").write_text(json.dumps(dict(settings, max_image_tiles=2)))
    assert AutoImageProcessor.from_pretrained(both).max_image_tiles == 4
    assert load_image_processor_config(both) == settings
    os.makedirs(copy)
    assert {"preprocessor_config.json", "processor_config.json"} <= set(copy_side_files(str(both), str(copy)))
    assert_loads_in_446_and_5x(copy)
    assert load_image_processor_config(copy) == settings


def test_missing_settings_name_the_directory_and_both_files(dirs, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(dirs["5.x"], name), tmp_path / name)
    (tmp_path / "processor_config.json").write_text('{"processor_class": "MllamaProcessor"}')
    assert not has_image_processor_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*preprocessor_config\.json.*'image_processor'.*"
                                                r"processor_config\.json"):
        MllamaInputProcessor.from_pretrained(str(tmp_path))
    (tmp_path / "processor_config.json").write_text('{"image_processor": [1]')
    with pytest.raises(ValueError, match=rf"{tmp_path}/processor_config\.json: not valid JSON"):
        load_image_processor_config(tmp_path)


@pytest.fixture(scope="module")
def embedders(dirs):
    from mme5_jax import Embedder

    return {layout: Embedder.from_pretrained(dirs[layout], batch_size=4) for layout in LAYOUTS}


def test_embedder_is_identical_in_both_layouts_and_equals_hf(dirs, embedders):
    from transformers import AutoProcessor

    new, old = (embedders[layout].encode(items()) for layout in LAYOUTS)
    np.testing.assert_array_equal(new, old)
    ref = hf_embed_items(dirs["hf"], AutoProcessor.from_pretrained(dirs["5.x"]), items())
    # 1 - cos = |new - ref|^2 / 2 <= 2e-9 at fp32 parity (1e-5 x sqrt(32)); the float32 dot rounds <= 32 x 6e-8 = 2e-6.
    assert np.sum(new * ref, axis=1).min() >= 0.99999


def test_only_the_training_pipeline_applies_the_one_pixel_fix(dirs, embedders):
    from transformers import AutoProcessor

    from mme5_jax.data.pipeline import load_processor

    training = load_processor(dirs["5.x"], "processor", 64, DEFAULT_MAX_IMAGE_PIXELS)
    inference = embedders["5.x"].processor
    assert training.min_height_fix and not inference.min_height_fix
    row = photo(60, 1)
    hf = AutoProcessor.from_pretrained(dirs["5.x"]).image_processor
    raw, fixed = (hf([[image]])["pixel_values"][0, 0] for image in (row, row.resize((60, 2))))
    assert np.abs(raw - fixed).max() > 0.01
    # Bit-identical: the same PIL resize, then HF's own rescale and normalise ops per uint8 value (a lookup).
    np.testing.assert_array_equal(inference.preprocess_image(row)["pixel_values"], raw)
    np.testing.assert_array_equal(training.preprocess_image(row)["pixel_values"], fixed)


def test_convert_round_trip_from_both_layouts(dirs, tmp_path):
    """hf-to-jax then jax-to-hf: the same weights and processor inputs, written in the layout both versions load."""
    from mme5_jax import base_checkpoint
    from mme5_jax.cli import main
    from mme5_jax.config import ModelConfig

    params, inputs = {}, {}
    for layout in LAYOUTS:
        ours, back = str(tmp_path / f"ours_{layout}"), str(tmp_path / f"back_{layout}")
        assert main(["convert", "hf-to-jax", dirs[layout], ours]) == 0
        assert main(["convert", "jax-to-hf", ours, back]) == 0
        for path in (ours, back):
            assert_loads_in_446_and_5x(path)
            assert load_image_processor_config(path) == load_image_processor_config(dirs[layout])
        params[layout] = base_checkpoint.load_base_params(ours, ModelConfig.from_pretrained(ours), "float32")
        inputs[layout] = [MllamaInputProcessor.from_pretrained(path)(items()) for path in (dirs[layout], ours, back)]
    assert sorted(params["5.x"]) == sorted(params["4.46"])
    for key, value in params["5.x"].items():
        np.testing.assert_array_equal(value, params["4.46"][key], err_msg=key)
    for arrays in inputs["5.x"][1:] + inputs["4.46"]:
        for key, value in inputs["5.x"][0].items():
            np.testing.assert_array_equal(arrays[key], value, err_msg=key)


def test_eval_is_identical_in_both_layouts(dirs, tmp_path):
    from test_eval_agreement import row, write_subsets

    from mme5_jax.cli import main
    from mme5_jax.embedder import Embedder

    images = tmp_path / "images"
    os.makedirs(images)
    sizes = [(60, 1), (70, 40), (40, 70), (50, 50)]
    for i, size in enumerate(sizes):
        photo(*size).save(images / f"{i}.png")
    query = "<|image_1|>\nFind an image caption describing the given everyday image.\n"
    rows = [row(query, f"{i}.png", [(f"caption {(i + k) % 4}", None) for k in range(3)]) for i in range(4)]
    write_subsets(str(tmp_path / "mmeb"), {"MSCOCO_i2t": rows})
    encoded = {}
    original_encode = Embedder.encode
    results = {}
    for layout in LAYOUTS:
        def recording(self, batch, *args, **kwargs):
            vectors = original_encode(self, batch, *args, **kwargs)
            encoded.setdefault(layout, []).append(vectors)
            return vectors

        out = tmp_path / f"{layout}.json"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Embedder, "encode", recording)
            assert main(["eval", "mmeb", "--model", dirs[layout], "--data", str(tmp_path / "mmeb"), "--image-root",
                         str(images), "--output", str(out), "--dtype", "float32", "--batch-size", "8",
                         "--no-cache"]) == 0
        with open(out) as f:
            results[layout] = json.load(f)
    assert results["5.x"]["datasets"] == results["4.46"]["datasets"]
    assert results["5.x"]["datasets"]["MSCOCO_i2t"]["n"] == 4
    np.testing.assert_array_equal(np.concatenate(encoded["5.x"]), np.concatenate(encoded["4.46"]))


def test_train_is_identical_in_both_layouts(dirs, tmp_path):
    from train_fixtures import train_losses, write_config

    from mme5_jax.cli import main
    from mme5_jax.data.demo import build_demo_dataset

    build_demo_dataset(tmp_path / "demo", num_train=64, num_heldout=16, photos=False)
    losses = {}
    for layout in LAYOUTS:
        config = write_config(tmp_path, layout, {
            "model": {"config": None, "path": dirs[layout], "processor_dir": dirs[layout]},
            "train": {"steps": 2}, "checkpoint": {"every_steps": 100}})
        assert main(["train", config]) == 0
        losses[layout] = train_losses(tmp_path / layout)
    assert sorted(losses["5.x"]) == [1, 2] and losses["5.x"] == losses["4.46"]
