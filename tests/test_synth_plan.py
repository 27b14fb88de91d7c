"""Planning and image pairing for `mme5-synth`: exact ratios, stable unique ids, neighbours, duplicates."""
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import write_images

from data_synth.config import load_defaults, load_languages, select_languages
from data_synth.images import ImagePool, image_tokens, list_images
from data_synth.plan import allocate, make_plan, task_modalities
from data_synth.run import Synthesis, resolve_settings


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = write_images(tmp_path_factory.mktemp("pool"), 300)
    return ImagePool.build(root, num_neighbours=5)


def test_languages_config_has_93_xlmr_languages_with_english_largest():
    languages = load_languages()
    assert len(languages) == 93
    assert max(languages, key=lambda c: languages[c]["weight"]) == "en"
    assert abs(sum(lang["weight"] for lang in languages.values()) - 1) < 1e-9  # float64: 2 x 93 x 1.1e-16 = 2e-14
    assert languages["no"]["name"] == "Norwegian"  # a YAML 'no' must stay a code, not False


def test_plan_of_10k_matches_task_modality_and_language_ratios(pool):
    tasks = load_defaults()["tasks"]
    languages = load_languages()
    specs = make_plan(10_000, pool, languages, tasks, seed=3)
    n = len(specs)
    assert n == 10_000 and len({s.id for s in specs}) == n
    task_counts = Counter(s.task for s in specs)
    # allocate() gives quotas within 1 of n x weight: shares (<= 10 combos summed) are off by <= 1e-3 < 0.01.
    for task, share in {"classification": 0.25, "vqa": 0.25, "retrieval": 0.5}.items():
        assert abs(task_counts[task] / n - share) < 0.01, task_counts
    modality_counts = Counter((s.task, s.modality) for s in specs)
    assert len(modality_counts) == 10
    for task, modality, weight in task_modalities(tasks):
        assert abs(modality_counts[(task, modality)] / n - weight) < 0.01
    language_counts = Counter(s.language for s in specs)
    assert set(language_counts) == set(languages)
    for code, lang in languages.items():
        assert abs(language_counts[code] / n - lang["weight"]) < 0.01, code
    assert language_counts.most_common(1)[0][0] == "en"
    assert len({(s.task, s.modality, s.language, s.anchor) for s in specs}) == n


def test_plan_is_deterministic_and_seeded(pool):
    tasks, languages = load_defaults()["tasks"], load_languages()
    a = make_plan(500, pool, languages, tasks, seed=1)
    assert a == make_plan(500, pool, languages, tasks, seed=1)
    assert [s.id for s in a] != [s.id for s in make_plan(500, pool, languages, tasks, seed=2)]


def test_plan_images_follow_the_modality(pool):
    specs = make_plan(400, pool, load_languages(), load_defaults()["tasks"], seed=0)
    for spec in specs:
        query, target = spec.modality.split("->")
        assert (spec.qry_image is not None) == ("I" in query)
        assert (spec.pos_image is not None) == ("I" in target) == (spec.neg_image is not None)
        if spec.pos_image is not None:
            assert spec.pos_image != spec.neg_image
            assert spec.anchor in (spec.qry_image, spec.pos_image)
        if spec.qry_image is not None and spec.pos_image is not None:
            assert spec.pos_image != spec.qry_image


def test_languages_option_restricts_and_rejects_unknown_codes(pool):
    chosen = select_languages(load_languages(), "de,ja,sw")
    specs = make_plan(300, pool, chosen, load_defaults()["tasks"])
    assert {s.language for s in specs} == {"de", "ja", "sw"}
    with pytest.raises(ValueError, match="xx"):
        select_languages(load_languages(), "de,xx")


def test_plan_too_large_for_the_pool_names_the_problem(tmp_path):
    small = ImagePool.build(write_images(tmp_path, 5), num_neighbours=3)
    with pytest.raises(ValueError, match="distinct images"):
        make_plan(200, small, select_languages(load_languages(), "en"), load_defaults()["tasks"])


def test_allocate_is_exact():
    assert allocate(10, [1, 1, 2]) == [3, 2, 5]
    assert sum(allocate(9973, np.random.default_rng(0).random(93))) == 9973


def test_neighbours_come_from_a_npy_index_and_duplicates_are_removed(tmp_path):
    root = write_images(tmp_path / "imgs", 6)
    shutil.copy(root / "0000.png", root / "0000_copy.png")  # byte-identical duplicate
    paths = list_images(root)
    assert len(paths) == 7
    # Index rows follow sorted paths: 0000, 0000_copy, 0001..0005. Put 0003 right next to 0001,
    # 0005 nearly on top of 0002 (a near-duplicate to drop), everything else far apart.
    vectors = {"0000.png": [1, 0, 0, 0, 0], "0000_copy.png": [1, 0, 0, 0, 0], "0001.png": [0, 1, 0, 0, 0],
               "0002.png": [0, 0, 1, 0, 0], "0003.png": [0, 0.9, 0, 0.1, 0], "0004.png": [0, 0, 0, 0, 1],
               "0005.png": [0, 0, 1, 0, 1e-6]}
    index = tmp_path / "index.npy"
    np.save(index, np.array([vectors[p] for p in paths], dtype=np.float32))
    pool = ImagePool.build(root, index=index, num_neighbours=3)
    assert pool.duplicates == 2
    assert "0000_copy.png" not in pool.paths and "0005.png" not in pool.paths
    assert pool.paths[pool.neighbours[pool.paths.index("0001.png")][0]] == "0003.png"
    for row, neighbours in enumerate(pool.neighbours):
        assert row not in neighbours
    np.save(index, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\[7, D\]"):
        ImagePool.build(root, index=index)


def test_embedder_index_is_used_lazily_and_cached(tmp_path, monkeypatch):
    import mme5_jax

    root = write_images(tmp_path / "imgs", 5)
    calls = []

    class RecordingEmbedder:
        """Stands in for the model: embeds image i as a vector that makes image i+1 its nearest neighbour."""

        @classmethod
        def from_pretrained(cls, path):
            calls.append(path)
            return cls()

        def encode(self, items):
            assert all(item["text"] == "Represent the given image.\n" for item in items)
            angles = np.array([int(Path(item["image"]).stem) for item in items]) * 0.3
            return np.stack([np.cos(angles), np.sin(angles), np.ones_like(angles)], axis=1)

    monkeypatch.setitem(vars(mme5_jax), "Embedder", RecordingEmbedder)  # without importing the real one
    pool = ImagePool.build(root, embedder="/models/mme5", cache_dir=tmp_path / "cache", num_neighbours=2)
    assert calls == ["/models/mme5"]
    assert pool.paths[pool.neighbours[0][0]] == "0001.png"
    ImagePool.build(root, embedder="/models/mme5", cache_dir=tmp_path / "cache", num_neighbours=2)
    assert calls == ["/models/mme5"], "embeddings are cached in the run directory"


def test_image_token_rule():
    assert image_tokens((4000, 3000), "low") == 85
    assert image_tokens((1024, 1024), "high") == 765
    assert image_tokens((2048, 4096), "high") == 1105


def test_dry_run_estimates_cost_without_sending(pool, tmp_path):
    settings = resolve_settings(images=str(pool.root), out=str(tmp_path / "out"), num_samples=200, progress=False)
    estimate = Synthesis(settings).dry_run()
    assert estimate["samples"] == 200
    assert 0 < estimate["estimated_cost_usd"] <= estimate["worst_case_cost_usd"]
    assert sum(estimate["by_language"].values()) == 200
    assert not (tmp_path / "out" / "journal.jsonl").exists()
