"""`mme5 demo-data`: deterministic, multilingual, all tasks and modalities, one-attribute hard negatives."""
import hashlib
import json

import pytest
from PIL import Image

from mme5_jax.cli import main
from mme5_jax.data.demo import ATTRIBUTES, LANGUAGES, caption, write_scene_split
from mme5_jax.records import read_records, shard_paths

SEVEN = {"I->T", "IT->T", "T->IT", "T->I", "I->I", "IT->I", "IT->IT"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(out), "--num-train", "280", "--num-heldout", "60", "--image-size", "48"]) == 0
    return out


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    # the same directory name: it names the TFDS dataset in the metadata written next to the shards
    a = write_scene_split(tmp_path / "a" / "train", "train", 60, image_size=32, seed=5, records_per_shard=25)
    b = write_scene_split(tmp_path / "b" / "train", "train", 60, image_size=32, seed=5, records_per_shard=25)
    c = write_scene_split(tmp_path / "c" / "train", "train", 60, image_size=32, seed=6, records_per_shard=25)
    assert _digest(a) == _digest(b) != _digest(c)
    assert len(shard_paths(a)) == 3


def test_covers_tasks_modalities_and_languages(demo_dir):
    records = list(read_records(demo_dir / "train"))
    assert len(records) == 280  # 5 blocks of the 56-entry task schedule
    assert {r["modality"] for r in records} == SEVEN
    assert {r["task"] for r in records} == {"classification", "vqa", "retrieval"}
    assert {(r["task"], r["modality"]) for r in records if r["task"] != "retrieval"} == {
        ("classification", "I->T"), ("classification", "IT->T"), ("vqa", "IT->T")}
    assert {r["language"] for r in records} == set(LANGUAGES) and len(LANGUAGES) >= 5
    tasks = [r["task"] for r in records]
    assert tasks.count("retrieval") == 2 * tasks.count("vqa") == 2 * tasks.count("classification")
    heldout = list(read_records(demo_dir / "heldout"))
    assert len(heldout) == 60 and not {r["id"] for r in heldout} & {r["id"] for r in records}
    summary = json.loads((demo_dir / "train" / "summary.json").read_text())
    assert summary["num_records"] == 280 and summary["counts"]["modality"].keys() == SEVEN


def test_hard_negatives_differ_in_exactly_one_attribute(demo_dir):
    for record in read_records(demo_dir / "train"):
        target = record["meta"]["scene"]
        negatives = record["meta"]["neg_scenes"]
        assert 2 <= len(negatives) == len(record["neg_text"]) <= 3
        for negative in negatives:
            assert sum(negative[a] != target[a] for a in ATTRIBUTES) == 1, record["id"]
        assert len({json.dumps(n, sort_keys=True) for n in negatives}) == len(negatives)
        if record["modality"] in ("I->T", "IT->T") and record["task"] == "retrieval":
            assert record["pos_text"] == caption(target, record["language"])
            assert record["pos_text"] not in record["neg_text"]


def test_images_exist_and_are_small(demo_dir):
    root = demo_dir / "train"
    paths = {p for r in read_records(root) for p in [r["qry_image"], r["pos_image"], *r["neg_image"]] if p}
    assert paths
    for path in sorted(paths)[:50]:
        with Image.open(root / path) as image:
            assert image.size == (48, 48) and image.mode == "RGB"


def test_captions_in_every_language_name_the_colour():
    scene = {"shape": "triangle", "colour": "blue", "position": "left", "count": 2}
    captions = {lang: caption(scene, lang) for lang in LANGUAGES}
    assert captions["en"] == "two blue triangles on the left"
    assert captions["de"] == "zwei Dreiecke in Blau links"
    assert captions["zh"] == "左边有两个蓝色的三角形"
    assert captions["fr"] == "deux triangles de couleur bleu à gauche"
    assert len(set(captions.values())) == len(LANGUAGES)


def test_real_photo_split(demo_dir):
    root = demo_dir / "photos"
    records = list(read_records(root))
    modes = set()
    for record in records:
        for path in [record["qry_image"], record["pos_image"], *record["neg_image"]]:
            if path:
                with Image.open(root / path) as image:
                    modes.add(image.mode)
                    assert max(image.size) <= 112
    assert {"RGB", "L", "RGBA"} <= modes
    assert {r["modality"] for r in records} == {"T->I", "I->I"}
    assert {r["language"] for r in records} == set(LANGUAGES)
