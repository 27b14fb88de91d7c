"""Parity of `MllamaInputProcessor` with Hugging Face `MllamaProcessor` on real photos and multilingual text."""
import copy
import itertools

import numpy as np
import pytest
from PIL import Image

from assets import make_processor_dir, varied_images
from mme5_jax.processing import (
    BadItemError,
    MllamaInputProcessor,
    model_string,
)
from mme5_jax.testing import multilingual_texts, real_photos

IMAGE_ID, BOS_ID, PAD_ID = 128256, 128000, 128004
ARRAY_KEYS = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
              "cross_attention_mask")


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return make_processor_dir(str(tmp_path_factory.mktemp("mllama_processor")))


@pytest.fixture(scope="module")
def hf_processor(processor_dir):
    from transformers import AutoProcessor, MllamaProcessor

    processor = AutoProcessor.from_pretrained(processor_dir)
    assert isinstance(processor, MllamaProcessor)
    return processor


@pytest.fixture(scope="module")
def ours(processor_dir):
    return MllamaInputProcessor.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def single(ours):
    """The same processor with the 4.45-era single-BOS layout (shares the loaded tokenizer)."""
    single = copy.copy(ours)
    single.bos = "single"
    return single


@pytest.fixture(scope="module")
def images():
    return varied_images()


def hf_batch(hf_processor, items, **kwargs):
    texts = [model_string(item["text"], item["image"] is not None) for item in items]
    images = [[item["image"]] if item["image"] is not None else [] for item in items]
    if all(not row for row in images):
        images = None
    kwargs = {"padding": True, "truncation": True, "max_length": 256, **kwargs}
    return hf_processor(text=texts, images=images, return_tensors="np", **kwargs)


def assert_matches_hf(ours_out, hf_out):
    for key in ARRAY_KEYS:
        if key not in hf_out:  # HF returns no image arrays for a text-only batch
            continue
        expected = np.asarray(hf_out[key])
        assert ours_out[key].shape == expected.shape, key
        # Pixels too: our lookup table holds HF's rescale (float64 -> float32) and float32 normalise of each uint8.
        np.testing.assert_array_equal(ours_out[key], expected, err_msg=key)


def test_varied_images_cover_the_modes(images):
    modes = {image.mode for _, image in images}
    assert len(images) >= 30
    assert {"RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA", "1"} <= modes
    assert any(image.height == 1 for _, image in images)
    assert any(image.width > image.height * 20 for _, image in images)
    assert any(image.height > image.width * 20 for _, image in images)
    assert len(real_photos()) >= 10


def test_fixture_tokenizer_equals_meta_tiktoken(ours):
    from llama_models.llama3.tokenizer import Tokenizer

    meta = Tokenizer.get_instance()
    for text in multilingual_texts():
        assert ours.tokenizer(text, add_special_tokens=False)["input_ids"] == meta.encode(text, bos=False, eos=False)
    names = ours.tokenizer.convert_ids_to_tokens([128000, 128001, 128004, 128009, 128010, 128255, 128256])
    assert names == ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>",
                     "<|python_tag|>", "<|reserved_special_token_246|>", "<|image|>"]


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
def test_preprocess_image_equals_hf_image_processor(processor_dir, ours, images, resample):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    hf = MllamaImageProcessorPil.from_pretrained(processor_dir, resample=resample)
    ours = copy.copy(ours)
    ours.resample = resample
    for name, image in images:
        expected = hf([[image]])
        got = ours.preprocess_image(image)
        assert got["pixel_values"].dtype == np.float32
        # Bit-identical: the same PIL resize, then HF's own rescale and normalise ops per uint8 value (a lookup).
        np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"][0, 0], err_msg=name)
        assert got["aspect_ratio_id"] == expected["aspect_ratio_ids"][0, 0], name
        np.testing.assert_array_equal(got["aspect_ratio_mask"], expected["aspect_ratio_mask"][0, 0], err_msg=name)
        assert got["num_tiles"] == expected["num_tiles"][0][0], name


def test_single_items_equal_hf(ours, hf_processor, images):
    texts = itertools.cycle(multilingual_texts())
    for (name, image), text in zip(images, texts):
        item = {"text": text, "image": image}
        got = ours([item])
        assert got["has_image"].tolist() == [True]
        assert_matches_hf(got, hf_batch(hf_processor, [item]))
    for text in multilingual_texts():
        item = {"text": text, "image": None}
        got = ours([item])
        assert_matches_hf(got, hf_batch(hf_processor, [item]))
        assert not got["has_image"][0] and not got["pixel_values"].any() and not got["cross_attention_mask"].any()


def test_mixed_batch_equals_hf_with_right_padding_and_truncation(ours, hf_processor, images):
    texts = multilingual_texts()
    long_text = max(texts, key=len)
    items = [
        {"text": texts[0], "image": None},
        {"text": "<|image_1|>\n" + texts[1], "image": images[0][1]},
        {"text": long_text, "image": None},
        {"text": texts[3], "image": images[8][1]},
        {"text": long_text, "image": images[5][1]},
        {"text": texts[6], "image": None},
        {"text": texts[12], "image": images[20][1]},
    ]
    got = ours(items)
    assert_matches_hf(got, hf_batch(hf_processor, items))
    lengths = got["attention_mask"].sum(1)
    assert lengths.max() == 256 and len(set(lengths.tolist())) > 2
    for row, length in enumerate(lengths):
        assert (got["input_ids"][row, length:] == PAD_ID).all()
    assert got["has_image"].tolist() == [False, True, False, True, True, False, True]
    assert {key: got[key].dtype.name for key in got} == {
        "input_ids": "int32", "attention_mask": "int32", "pixel_values": "float32", "aspect_ratio_ids": "int32",
        "aspect_ratio_mask": "int32", "cross_attention_mask": "int32", "has_image": "bool"}


def test_pad_to_bucket_equals_hf_max_length_padding(ours, hf_processor, images):
    items = [{"text": "A cat and a dog.", "image": images[1][1]}, {"text": "Кошка.", "image": None}]
    got = ours(items, pad_to=64)
    assert got["input_ids"].shape == (2, 64) and got["cross_attention_mask"].shape == (2, 64, 1, 4)
    assert_matches_hf(got, hf_batch(hf_processor, items, padding="max_length", max_length=64))
    with pytest.raises(ValueError, match="pad_to=3"):
        ours(items, pad_to=3)


def test_bos_layouts(processor_dir, ours, single, images):
    text = "Represent the given image.\n"
    plain = ours.tokenizer(text, add_special_tokens=False)["input_ids"]
    items = [{"text": text, "image": images[0][1]}, {"text": text, "image": None}]

    processor_ids = ours(items)["input_ids"]
    assert processor_ids[0, : len(plain) + 3].tolist() == [BOS_ID, IMAGE_ID, BOS_ID] + plain
    assert processor_ids[1, : len(plain) + 2].tolist() == [BOS_ID, BOS_ID] + plain

    got = single(items)
    assert got["input_ids"][0, : len(plain) + 2].tolist() == [IMAGE_ID, BOS_ID] + plain
    assert got["input_ids"][1, : len(plain) + 1].tolist() == [BOS_ID] + plain
    assert got["attention_mask"].sum(1).tolist() == [len(plain) + 2, len(plain) + 1]
    assert got["cross_attention_mask"][0, :, 0, :].tolist() == [[1, 1, 1, 1]] * got["input_ids"].shape[1]
    np.testing.assert_array_equal(got["pixel_values"], ours(items)["pixel_values"])
    with pytest.raises(ValueError, match="bos"):
        MllamaInputProcessor.from_pretrained(processor_dir, bos="double")


def test_truncation_keeps_max_length_in_both_modes(ours, single):
    long_text = max(multilingual_texts(), key=len)
    for processor in (ours, single):
        ids = processor.tokenize([model_string(long_text, True), long_text])
        assert [len(row) for row in ids] == [256, 256]


def test_model_string_rule():
    assert model_string("<|image_1|>\nRepresent the given image.\n", True) == (
        "<|image|><|begin_of_text|>Represent the given image.\n")
    assert model_string("Represent the given image.\n", True) == (
        "<|image|><|begin_of_text|>Represent the given image.\n")
    assert model_string("A cat and a dog", False) == "A cat and a dog"
    assert model_string("<|image_1|>\nA cat", False) == "A cat"
    assert model_string("<|image_1|>A <|image_1|>cat", True) == "<|image|><|begin_of_text|>A cat"
    assert model_string(" <|image_1|>\nx", False) == " \nx"


def test_one_pixel_high_fix_only_when_asked(processor_dir, ours, hf_processor):
    row = real_photos()[0][1].crop((0, 100, 512, 101))
    raw = hf_processor.image_processor([[row]])  # transformers itself accepts 1-px-high images
    fixed = hf_processor.image_processor([[row.resize((512, 2))]])
    np.testing.assert_array_equal(ours.preprocess_image(row)["pixel_values"], raw["pixel_values"][0, 0])  # same ops
    training = MllamaInputProcessor.from_pretrained(processor_dir, min_height_fix=True)
    got = training.preprocess_image(row)["pixel_values"]
    np.testing.assert_array_equal(got, fixed["pixel_values"][0, 0])
    assert np.abs(got - raw["pixel_values"][0, 0]).max() > 0.01
    two_high = real_photos()[0][1].crop((0, 100, 512, 102))
    np.testing.assert_array_equal(training.preprocess_image(two_high)["pixel_values"],
                                  ours.preprocess_image(two_high)["pixel_values"])


def test_image_paths_load_like_pil_images(ours, tmp_path, images):
    path = tmp_path / "photo.png"
    images[9][1].save(path)  # RGBA logo: transparency survives the round trip
    from_path = ours([{"text": "x", "image": path}, {"text": "y", "image": str(path)}])
    from_pil = ours([{"text": "x", "image": images[9][1]}, {"text": "y", "image": images[9][1]}])
    for key in ARRAY_KEYS:
        np.testing.assert_array_equal(from_path[key], from_pil[key])


def _bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    real_photos()[1][1].save(good, quality=90)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image at all" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:2000])
    return good, {"missing": tmp_path / "missing.png", "corrupt": corrupt, "empty": empty, "truncated": truncated}


@pytest.mark.parametrize("kind", ["missing", "corrupt", "empty", "truncated"])
def test_unreadable_image_names_the_item(ours, tmp_path, kind):
    good, bad = _bad_files(tmp_path)
    items = [{"text": "a", "image": good}, {"text": "b", "image": None}, {"text": "c", "image": bad[kind]}]
    with pytest.raises(BadItemError, match=r"^item 2: cannot process image") as caught:
        ours(items)
    assert caught.value.index == 2 and str(bad[kind]) in str(caught.value)


@pytest.mark.parametrize("item, message", [
    ({"text": "a", "image": 42}, "'image' must be"),
    ({"text": "a", "image": np.zeros((4, 4, 3), np.uint8)}, "'image' must be"),
    ({"text": 7, "image": None}, "expected a dict"),
    ("just a string", "expected a dict"),
    ({"text": "<|image|>a", "image": None}, "contains <|image|>"),
])
def test_unsupported_items_name_the_index(ours, item, message):
    with pytest.raises(BadItemError, match=r"^item 1: ") as caught:
        ours([{"text": "fine", "image": None}, item])
    assert message in caught.value.message and caught.value.index == 1


def test_decompression_bomb_limit(ours, tmp_path):
    strict = copy.copy(ours)
    strict.max_image_pixels = 100 * 100
    path = tmp_path / "big.png"
    Image.new("RGB", (101, 100)).save(path)
    with pytest.raises(BadItemError, match="item 0: .*101x100 = 10100 pixels exceeds max_image_pixels=10000"):
        strict([{"text": "a", "image": path}])
    with pytest.raises(ValueError, match="max_image_pixels"):
        strict.preprocess_image(Image.new("RGB", (200, 200)))
    assert strict.preprocess_image(Image.new("RGB", (100, 100)))["num_tiles"] == 1


def test_attributes(ours):
    assert (ours.image_token_id, ours.pad_token_id, ours.bos_token_id) == (IMAGE_ID, PAD_ID, BOS_ID)
    assert (ours.tile_size, ours.max_image_tiles) == (448, 4)
    assert ours.resample == Image.Resampling.BILINEAR and ours.max_length == 256


def test_processing_runs_without_importing_torch(processor_dir):
    import subprocess
    import sys

    script = (
        "import sys; from PIL import Image; from mme5_jax.processing import MllamaInputProcessor; "
        f"p = MllamaInputProcessor.from_pretrained({processor_dir!r}); "
        "p([{'text': 'a', 'image': Image.new('RGB', (9, 5))}, {'text': 'b', 'image': None}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)


def test_pickles_for_data_loader_workers(ours, images):
    import pickle

    clone = pickle.loads(pickle.dumps(ours))
    items = [{"text": "Représente l'image.\n", "image": images[3][1]}, {"text": "x", "image": None}]
    expected, got = ours(items), clone(items)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
