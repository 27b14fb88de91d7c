"""`mme5 eval` on a fixture in the MMEB and XTD-10 layouts (real photos, several subsets of every meta-task,
classification with varying candidate counts, bad rows) against an independent computation: HF torch
embeddings of every item, scored with plain numpy from the rows as written. Also: duplicates are encoded once,
and a rerun with the cache never loads the model."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hf_reference import hf_embed_items
from tiny_models import save_tiny_hf_dir, tiny_hf_config

from mme5_jax.eval.harness import evaluate_mmeb
from mme5_jax.testing import multilingual_texts, real_photos

# Wider random weights than HF's default (0.02) spread the tiny model's embeddings, so that no positive is within
# fp32 noise of a distinct candidate and our scores can be compared exactly with the HF reference.
EVAL_CONFIG = tiny_hf_config(vision=dict(initializer_range=0.1), text=dict(initializer_range=0.1))
IMAGE_PROMPT = "<|image_1|>\nRepresent the given image.\n"
SCHEMA = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                    ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])


def row(query_text, query_image, candidates):
    return {"qry_text": query_text, "qry_img_path": query_image or "",
            "tgt_text": [t for t, _ in candidates], "tgt_img_path": [p or "" for _, p in candidates]}


def mmeb_rows(names):
    """{subset: [row]}: good rows only; each candidate list has its positive first."""
    n, texts = len(names), multilingual_texts()[:15]
    def image(i):
        return f"photos/{names[i % n]}.png"
    def crop(i, k):
        return f"crops/{names[i % n]}_{k}.png"
    def label(i):
        return names[i % n].replace("_", " ")
    def caption(i):
        return f"A photo of {label(i)}. {texts[i % len(texts)]}"
    sets = {
        "ImageNet-1K": [row("<|image_1|>\nRepresent the given image for classification\n", image(i),
                            [(label(i + k), None) for k in range(5)]) for i in range(4)],
        # Varying candidate counts, 1 to 6.
        "N24News": [row(f"<|image_1|>\nRepresent the given news image with the following caption for domain "
                        f"classification\n{texts[i]}", image(i + 3), [(label(i + 3 + k), None) for k in range(1 + i)])
                    for i in range(6)],
        # The positive label repeated among the negatives: an exact tie, resolved for the positive.
        "Place365": [row("<|image_1|>\nIdentify the scene shown in the image\n", image(i),
                         [(label(i), None), (label(i + 1), None), (label(i), None), (label(i + 2), None)])
                     for i in range(4)],
        "OK-VQA": [row(f"<|image_1|>\nRepresent the given image with the following question: What is in the "
                       f"image? {texts[i]}\n", image(i), [(texts[(i + k) % 15], None) for k in range(5)])
                   for i in range(4)],
        "ScienceQA": [row(f"<|image_1|>\nRepresent the given image with the following question: {texts[i + 5]}\n",
                          image(2 * i), [(f"choice {k} {label(i + k)}", None) for k in range(4)]) for i in range(4)],
        "MSCOCO_t2i": [row(f"Find me an everyday image that matches the given caption: {caption(i)}\n", None,
                           [(IMAGE_PROMPT, image(i + k)) for k in range(5)]) for i in range(4)],
        "MSCOCO_i2t": [row("<|image_1|>\nFind an image caption describing the given everyday image.\n", image(i),
                           [(caption(i + k), None) for k in range(5)]) for i in range(4)],
        "EDIS": [row(f"Find a news image that matches the provided caption: {caption(i)}\n", None,
                     [(f"<|image_1|>\nRepresent the given image with related text information: {label(i + k)}\n",
                       image(i + k)) for k in range(5)]) for i in range(4)],
        "MSCOCO": [row(f"<|image_1|>\nSelect the portion of the image that isolates the object of the given "
                       f"label: {label(i)}\n", image(i), [(IMAGE_PROMPT, crop(i + k, k % 2)) for k in range(4)])
                   for i in range(4)],
        "RefCOCO": [row(f"<|image_1|>\nSelect the portion of the image that follows the language expressions. "
                        f"{texts[i]}\n", image(i + 1), [(IMAGE_PROMPT, crop(i + 1 + k, 1)) for k in range(5)])
                    for i in range(4)],
    }
    return sets


BAD_ROWS = [row("x", "photos/not_there.png", [("a", None)]),
            {"qry_text": "y", "qry_img_path": "", "tgt_text": [], "tgt_img_path": []},
            {"qry_text": "z", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": [""]}]
BAD_REASONS = {"missing_image": 1, "empty_candidates": 1, "mismatched_lengths": 1}


def xtd_rows(names):
    captions = {"es": "Una fotografía de {}.", "zh": "一张关于{}的照片。"}
    n = 10
    return {lang: [row(template.format(names[i].replace("_", " ")), None,
                       [(IMAGE_PROMPT, f"photos/{names[(i + k) % n]}.png") for k in range(n)]) for i in range(n)]
            for lang, template in captions.items()}


def write_subsets(root, sets, bad=None):
    for name, rows in sets.items():
        os.makedirs(os.path.join(root, name))
        rows = rows + (BAD_ROWS if name == bad else [])
        half = len(rows) // 2  # two shards, as the hub writes large subsets
        for shard, part in enumerate([rows[:half], rows[half:]]):
            pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA),
                           os.path.join(root, name, f"test-{shard:05d}-of-00002.parquet"))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = str(root / "model")
    hf = save_tiny_hf_dir(model, EVAL_CONFIG, processor=True)
    images = root / "images"
    os.makedirs(images / "photos")
    os.makedirs(images / "crops")
    photos = real_photos()
    for name, photo in photos:
        photo = photo.convert("RGB")
        photo.thumbnail((96, 96))
        photo.save(images / "photos" / f"{name}.png")
        w, h = photo.size
        photo.crop((0, 0, w // 2, h // 2)).save(images / "crops" / f"{name}_0.png")
        photo.crop((w // 3, h // 4, w, h)).save(images / "crops" / f"{name}_1.png")
    names = [name for name, _ in photos]
    mmeb, xtd = mmeb_rows(names), xtd_rows(names)
    write_subsets(str(root / "mmeb"), mmeb, bad="N24News")
    write_subsets(str(root / "xtd"), xtd)
    return dict(root=root, model=model, hf=hf, images=str(images), mmeb=mmeb, xtd=xtd)


def item_of(text, path, image_root):
    return text, os.path.join(image_root, path) if path else None


def row_items(r, image_root):
    query = item_of(r["qry_text"], r["qry_img_path"], image_root)
    return query, [item_of(t, p, image_root) for t, p in zip(r["tgt_text"], r["tgt_img_path"])]


@pytest.fixture(scope="module")
def reference(fixture):
    """HF torch embedding of every unique item of the good rows, and numpy ranks of the positives."""
    from transformers import AutoProcessor

    image_root = fixture["images"]
    rows = {**fixture["mmeb"], **fixture["xtd"]}
    unique = sorted({item for rs in rows.values() for r in rs
                     for item in [row_items(r, image_root)[0], *row_items(r, image_root)[1]]},
                    key=lambda it: (it[0], it[1] or ""))
    processor = AutoProcessor.from_pretrained(fixture["model"])
    # The base MllamaModel gives the same final hidden states as the full model, without the 128K-vocab logits.
    vectors = hf_embed_items(fixture["hf"].model, processor,
                             [{"text": t, "image": Image.open(p) if p else None} for t, p in unique])
    table = dict(zip(unique, vectors))
    ranks, margins = {}, []
    for name, rs in rows.items():
        ranks[name] = []
        for r in rs:
            query, candidates = row_items(r, image_root)
            scores = np.array([np.dot(table[query].astype(np.float64), table[c].astype(np.float64))
                               for c in candidates])
            ranks[name].append(int(np.sum(scores > scores[0])))
            others = [s for s, c in zip(scores[1:], candidates[1:]) if c != candidates[0]]
            margins += [abs(scores[0] - s) for s in others]
    occurrences = sum(1 + len(r["tgt_text"]) for name in fixture["mmeb"] for r in fixture["mmeb"][name])
    mmeb_unique = {item for rs in fixture["mmeb"].values() for r in rs
                   for item in [row_items(r, image_root)[0], *row_items(r, image_root)[1]]}
    xtd_unique = {item for rs in fixture["xtd"].values() for r in rs
                  for item in [row_items(r, image_root)[0], *row_items(r, image_root)[1]]}
    return dict(table=table, ranks=ranks, min_margin=min(margins), occurrences=occurrences,
                mmeb_unique=len(mmeb_unique), xtd_new=len(xtd_unique - mmeb_unique))


def test_harness_on_hf_embeddings_equals_numpy_reference(fixture, reference):
    calls = []

    def hf_lookup(items):
        calls.append(len(items))
        return np.stack([reference["table"][(it["text"], it["image"])] for it in items])

    results = evaluate_mmeb(hf_lookup, str(fixture["root"] / "mmeb"), image_root=fixture["images"], progress=False)
    assert sum(calls) == reference["mmeb_unique"] < reference["occurrences"]
    for name in fixture["mmeb"]:
        expected = np.mean(np.array(reference["ranks"][name]) == 0)
        assert results["datasets"][name]["precision@1"] == expected, name
        assert results["datasets"][name]["n"] == len(fixture["mmeb"][name])
    assert results["datasets"]["N24News"]["skipped_reasons"] == BAD_REASONS
    assert results["coverage"]["overall"] == [10, 36] and len(results["missing"]) == 26
    for task in ("classification", "vqa", "retrieval", "grounding"):
        assert results["meta_tasks"][task] is not None


@pytest.fixture(scope="module")
def cli_runs(fixture):
    """`mme5 eval mmeb` and `xtd` with the JAX Embedder (fp32), counting the items it encodes."""
    from mme5_jax.cli import main
    from mme5_jax.embedder import Embedder

    encoded, loaded = [], {}
    original_encode, original_load = Embedder.encode, Embedder.from_pretrained

    def counting(self, items, *args, **kwargs):
        encoded.append(len(items))
        return original_encode(self, items, *args, **kwargs)

    def load_once(path, *args, **kwargs):  # both commands share one model and its compiled buckets
        if path not in loaded:
            loaded[path] = original_load(path, *args, **kwargs)
        return loaded[path]

    root = fixture["root"]
    common = ["--model", fixture["model"], "--image-root", fixture["images"], "--dtype", "float32",
              "--batch-size", "8", "--cache-dir", str(root / "cache")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Embedder, "encode", counting)
        mp.setattr(Embedder, "from_pretrained", load_once)
        assert main(["eval", "mmeb", "--data", str(root / "mmeb"), "--output", str(root / "mmeb.json"), *common]) == 0
        mmeb_encoded = sum(encoded)
        assert main(["eval", "xtd", "--data", str(root / "xtd"), "--output", str(root / "xtd.json"), *common]) == 0
    with open(root / "mmeb.json") as f:
        mmeb = json.load(f)
    with open(root / "xtd.json") as f:
        xtd = json.load(f)
    assert len(loaded) == 1 and loaded[fixture["model"]].mesh is not None  # encoded across the 8-device mesh
    return dict(mmeb=mmeb, xtd=xtd, mmeb_encoded=mmeb_encoded, xtd_encoded=sum(encoded) - mmeb_encoded,
                common=common)


def test_cli_mmeb_scores_equal_hf_reference(fixture, reference, cli_runs):
    print(f"smallest reference score margin between positive and a distinct candidate: {reference['min_margin']:.2e}")
    # No argmax can flip: at fp32 parity (1e-5 a component) a score moves <= 2 x sqrt(32) x 1e-5, two of them 2.3e-4.
    assert reference["min_margin"] > 2.5e-4
    results = cli_runs["mmeb"]
    assert cli_runs["mmeb_encoded"] == reference["mmeb_unique"]
    for name, ranks in reference["ranks"].items():
        if name in fixture["mmeb"]:
            entry = results["datasets"][name]
            assert entry["precision@1"] == np.mean(np.array(ranks) == 0), name
            assert entry["n"] == len(ranks) and entry["skipped"] == (3 if name == "N24News" else 0)
    assert results["datasets"]["N24News"]["skipped_reasons"] == BAD_REASONS
    report = (fixture["root"] / "mmeb.md").read_text()
    assert "| mmE5 supervised | 67.6 | 62.8 | 70.9 | 89.7 | 72.3 | 66.7 | 69.8 |" in report
    assert "| N24News | classification | IND |" in report and "mismatched_lengths 1" in report


def test_cli_xtd_recall_equals_hf_reference(fixture, reference, cli_runs):
    results = cli_runs["xtd"]
    # Items already encoded for MMEB (most images) come from the cache.
    assert 0 < cli_runs["xtd_encoded"] == reference["xtd_new"]
    for lang in fixture["xtd"]:
        ranks = np.array(reference["ranks"][lang])
        for k in (1, 5, 10):
            assert results["languages"][lang][f"recall@{k}"] == np.mean(ranks < k), (lang, k)
    assert results["coverage"] == [2, 7] and "| mmE5 | 96.1 |" in (fixture["root"] / "xtd.md").read_text()


def test_cli_rerun_uses_the_cache_without_loading_the_model(fixture, cli_runs, monkeypatch):
    from mme5_jax.cli import main
    from mme5_jax.embedder import Embedder

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every item is cached")

    monkeypatch.setattr(Embedder, "from_pretrained", refuse)
    out = fixture["root"] / "rerun.json"
    assert main(["eval", "mmeb", "--data", str(fixture["root"] / "mmeb"), "--output", str(out),
                 *cli_runs["common"]]) == 0
    with open(out) as f:
        assert json.load(f) == cli_runs["mmeb"]
