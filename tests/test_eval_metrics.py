"""The evaluation protocol without a model: ties, ranks and metrics, macro averages, bad rows, deduplication,
the embedding cache and its model fingerprint, the records hook and the reports."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mme5_jax.eval.cache import EmbeddingCache, item_key, model_fingerprint
from mme5_jax.eval.catalog import MMEB_SUBSETS
from mme5_jax.eval.harness import evaluate_sets
from mme5_jax.eval.metrics import mmeb_summary, pair_scores, positive_ranks, ranking_metrics
from mme5_jax.eval.readers import read_parquet_set, set_from_items, set_from_records
from mme5_jax.eval.report import mmeb_markdown, xtd_markdown
from mme5_jax.processing import BadItemError


class HashEncoder:
    """A deterministic stand-in encoder: unit vectors from a hash of the item; counts the items it encodes."""

    def __init__(self, dim=8, salt=""):
        self.dim, self.salt, self.calls, self.items, self.encoded = dim, salt, 0, 0, []

    def vector(self, item):
        seed = int.from_bytes(item_key((self.salt + item["text"], None)).encode()[:8], "little") % 2**32
        v = np.random.default_rng(seed).normal(size=self.dim)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def __call__(self, items):
        self.calls += 1
        self.items += len(items)
        for i, item in enumerate(items):
            if item["text"].startswith("unreadable"):
                raise BadItemError(i, "cannot decode image")
        self.encoded += [item["text"] for item in items]
        return np.stack([self.vector(item) for item in items])


def items(texts):
    return [{"text": t, "image": None} for t in texts]


def test_ties_go_to_the_positive_and_duplicates_never_outrank_it():
    vectors = np.array([[1, 0], [1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1]], np.float32)
    # item 1 is a different item with exactly the positive's vector; item 3 scores higher than positive 2.
    candidates = np.array([0, 1, 4,    2, 3, 2,    0, 0, 4,    4])
    offsets = np.array([0, 3, 6, 9, 10])

    class Set:
        queries = np.array([0, 0, 0, 4])
        num_rows = 4
    Set.candidates, Set.offsets = candidates, offsets
    scores = pair_scores(vectors, Set, rows_per_block=3, cols_per_block=2)
    # Products with 0 and 1 are exact; only 0.6 and 0.8 differ, by their float32 rounding (half an ulp, <= 3e-8).
    np.testing.assert_allclose(scores, [1, 1, 0, 0.6, 0.8, 0.6, 1, 1, 0, 1], atol=1e-7)
    assert positive_ranks(scores, candidates, offsets).tolist() == [0, 1, 0, 0]


def test_block_scores_equal_direct_dot_products():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 16)).astype(np.float32)
    counts = rng.integers(1, 12, size=25)
    s = set_from_items("random", items([f"q{i}" for i in range(25)]),
                       [items([f"c{j}" for j in rng.integers(0, 20, size=n)]) for n in counts])
    table = np.stack([vectors[int(text[1:]) + (0 if text[0] == "q" else 5)] for text, _ in s.items])
    direct = np.array([table[s.queries[r]] @ table[c] for r in range(s.num_rows)
                       for c in s.candidates[s.offsets[r]:s.offsets[r + 1]]])
    for rows, cols in ((1, 1), (4, 3), (7, 64), (256, 4096)):
        # float32: 16-term dots in another order differ <= 16 x 1.2e-7 x sum|a_i b_i| (<= 25 here) -> 5e-5.
        np.testing.assert_allclose(pair_scores(table, s, rows, cols), direct, rtol=1e-5, atol=5e-5)


def test_ranking_metrics_by_hand():
    m = ranking_metrics(np.array([0, 1, 4, 12]), ks=(1, 5, 10))
    # float64 means of 4 terms (~1e-16 relative each): pytest.approx's default rel=1e-6 is ample.
    assert m["recall@1"] == 0.25 and m["recall@5"] == 0.75 and m["recall@10"] == 0.75
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)
    assert ranking_metrics(np.array([], np.int64))["recall@1"] is None


def test_mmeb_macro_averages_and_coverage():
    values = {name: (i % 7) / 10 for i, name in enumerate(MMEB_SUBSETS)}
    summary = mmeb_summary(values)
    classification = [values[s.name] for s in MMEB_SUBSETS.values() if s.meta_task == "classification"]
    ood = [values[s.name] for s in MMEB_SUBSETS.values() if s.split == "ood"]
    # float64 means of <= 36 terms (~1e-16 relative each): pytest.approx's default rel=1e-6 is ample.
    assert summary["meta_tasks"]["classification"] == pytest.approx(np.mean(classification))
    assert summary["ood"] == pytest.approx(np.mean(ood)) and len(ood) == 16
    assert summary["overall"] == pytest.approx(np.mean(list(values.values())))
    assert summary["coverage"]["overall"] == [36, 36]
    partial = mmeb_summary({"ImageNet-1K": 0.5, "CIRR": 0.25, "RefCOCO": None})
    assert partial["overall"] == 0.375 and partial["meta_tasks"]["vqa"] is None
    assert partial["coverage"]["grounding"] == [0, 4] and partial["coverage"]["overall"] == [2, 36]


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("qry_text", pa.string()), ("qry_img_path", pa.string()),
        ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])), path)


@pytest.fixture
def bad_input_dir(tmp_path):
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "ok.png")
    def good(q):
        return {"qry_text": q, "qry_img_path": "ok.png", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]}
    rows = [good("a"), good("b"),
            {"qry_text": "c", "qry_img_path": "gone.png", "tgt_text": ["cat"], "tgt_img_path": [""]},
            {"qry_text": "d", "qry_img_path": "", "tgt_text": ["cat"], "tgt_img_path": ["ok.png", "gone.png"]},
            {"qry_text": "e", "qry_img_path": "", "tgt_text": [], "tgt_img_path": []},
            {"qry_text": "f", "qry_img_path": "", "tgt_text": None, "tgt_img_path": None},
            {"qry_text": "g", "qry_img_path": "", "tgt_text": ["x", "y"], "tgt_img_path": ["", "gone.png"]},
            {"qry_text": None, "qry_img_path": "", "tgt_text": ["x"], "tgt_img_path": [""]}]
    write_parquet(str(tmp_path / "N24News" / "test-00000-of-00002.parquet"), rows[:4])
    write_parquet(str(tmp_path / "N24News" / "test-00001-of-00002.parquet"), rows[4:])
    return tmp_path


def test_bad_rows_are_skipped_and_counted(bad_input_dir):
    s = read_parquet_set(str(bad_input_dir), "N24News")
    assert s.num_rows == 2
    assert dict(s.skipped) == {"missing_image": 2, "mismatched_lengths": 1, "empty_candidates": 2,
                               "bad_query_text": 1}
    assert s.num_rows + sum(s.skipped.values()) == 8
    assert s.items[0] == ("a", str(bad_input_dir / "ok.png"))
    result = evaluate_sets(HashEncoder(), [s])["sets"]["N24News"]
    assert result["n"] == 2 and result["skipped"] == 6 and result["skipped_reasons"]["missing_image"] == 2


def test_missing_column_names_file_and_columns(tmp_path):
    os.makedirs(tmp_path / "CIRR")
    pq.write_table(pa.table({"qry_text": ["q"], "tgt_text": [["t"]]}), tmp_path / "CIRR" / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet.*qry_img_path.*found \['qry_text', 'tgt_text'\]"):
        read_parquet_set(str(tmp_path), "CIRR")


def test_duplicates_encoded_once_and_unreadable_items_skip_their_rows():
    a = set_from_items("A", items(["q1", "q2", "q3"]),
                       [items(["cat", "dog", "cat"]), items(["dog", "cat", "bird"]), items(["unreadable x", "dog"])])
    b = set_from_items("B", items(["q1", "q4"]), [items(["dog", "bird"]), items(["fish", "unreadable x"])])
    encoder = HashEncoder()
    result = evaluate_sets(encoder, [a, b], chunk_size=4)
    unique = {"q1", "q2", "q3", "q4", "cat", "dog", "bird", "fish", "unreadable x"}
    # Every unique item is encoded exactly once; the unreadable one is dropped and the rest of its chunk retried.
    assert sorted(encoder.encoded) == sorted(unique - {"unreadable x"})
    one_chunk = HashEncoder()
    evaluate_sets(one_chunk, [a, b], chunk_size=len(unique))
    assert one_chunk.calls == 2 and one_chunk.items == len(unique) + len(unique) - 1
    assert result["sets"]["A"]["n"] == 2 and result["sets"]["A"]["skipped_reasons"] == {"unreadable_item": 1}
    assert result["sets"]["B"]["n"] == 1 and result["sets"]["B"]["skipped"] == 1
    # Reference ranks straight from the encoder's vectors.
    v = {t: encoder.vector({"text": t}) for t in unique}
    def hit(q, cands):
        s = [float(v[q] @ v[c]) for c in cands]
        return s[0] >= max(s[1:])
    expected_a = np.mean([hit("q1", ["cat", "dog", "cat"]), hit("q2", ["dog", "cat", "bird"])])
    assert result["sets"]["A"]["recall@1"] == expected_a


def test_cache_rerun_does_no_encoder_work_and_survives_interruption(tmp_path):
    s = set_from_items("A", items([f"q{i}" for i in range(10)]),
                       [items([f"t{i}", f"t{(i + 1) % 10}"]) for i in range(9)] + [items(["t9", "unreadable"])])
    first = HashEncoder()
    cold = evaluate_sets(first, [s], cache=EmbeddingCache(str(tmp_path), "m1"), chunk_size=6)
    assert len(first.encoded) == 20 and cold["sets"]["A"]["skipped_reasons"] == {"unreadable_item": 1}
    again = HashEncoder()
    warm = evaluate_sets(again, [s], cache=EmbeddingCache(str(tmp_path), "m1"))
    assert again.items == 0 and warm == cold
    other_model = HashEncoder(salt="other")
    evaluate_sets(other_model, [s], cache=EmbeddingCache(str(tmp_path), "m2"))
    assert len(other_model.encoded) == 20

    class Interrupted(HashEncoder):
        def __call__(self, batch):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().__call__(batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_sets(Interrupted(), [s], cache=EmbeddingCache(str(tmp_path), "m3"), chunk_size=6)
    resumed = HashEncoder()
    evaluate_sets(resumed, [s], cache=EmbeddingCache(str(tmp_path), "m3"), chunk_size=6)
    assert len(resumed.encoded) == 21 - 12 - 1  # two chunks were kept; the unreadable item is refused again


def test_model_fingerprint_follows_weights_config_and_settings(tmp_path):
    model = tmp_path / "model"
    os.makedirs(model / "sub")
    (model / "config.json").write_text('{"hidden_size": 32}')
    (model / "sub" / "model.safetensors").write_bytes(b"\x00" * 1000)
    settings = {"dtype": "float32"}
    base = model_fingerprint(str(model), settings, str(tmp_path / "cache"))
    assert model_fingerprint(str(model), settings, str(tmp_path / "cache")) == base
    assert model_fingerprint(str(model), {"dtype": "bfloat16"}, str(tmp_path / "cache")) != base
    stat = os.stat(model / "sub" / "model.safetensors")
    (model / "sub" / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")  # same size
    os.utime(model / "sub" / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    changed_weights = model_fingerprint(str(model), settings, str(tmp_path / "cache"))
    assert changed_weights != base
    (model / "config.json").write_text('{"hidden_size": 33}')
    assert model_fingerprint(str(model), settings, str(tmp_path / "cache")) not in (base, changed_weights)


def test_item_key_changes_with_the_image_file(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    key = item_key(("t", str(path)))
    assert item_key(("t", str(path))) == key and item_key(("t", None)) != key
    Image.new("RGB", (5, 4)).save(path)
    assert item_key(("t", str(path))) != key


def test_records_hook_pools_positives(tmp_path):
    records = [{"qry_text": f"query {i}", "qry_image": None, "pos_text": f"answer {i}", "pos_image": None,
                "neg_text": [f"wrong {i}"], "neg_image": [None]} for i in range(4)]
    records.append({"qry_text": "q", "qry_image": "missing.png", "pos_text": "p", "pos_image": None,
                    "neg_text": [], "neg_image": []})
    records.append({"qry_text": "q2", "qry_image": None, "pos_text": "p2", "pos_image": "missing.png",
                    "neg_text": [], "neg_image": []})
    s = set_from_records("heldout", records, str(tmp_path))
    assert s.num_rows == 4 and dict(s.skipped) == {"missing_image": 2}
    first = s.candidates[s.offsets[0]:s.offsets[1]]
    assert [s.items[i][0] for i in first] == ["answer 0", "wrong 0", "answer 1", "answer 2", "answer 3"]
    positives_only = set_from_records("heldout", records, str(tmp_path), hard_negatives=False)
    first = positives_only.candidates[positives_only.offsets[0]:positives_only.offsets[1]]
    assert [positives_only.items[i][0] for i in first] == ["answer 0", "answer 1", "answer 2", "answer 3"]
    result = evaluate_sets(HashEncoder(), [s])
    assert set(result["average"]) == {"recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"}


def test_reports_show_published_numbers_and_denominators():
    datasets = {"ImageNet-1K": {"precision@1": 0.5, "n": 10, "skipped": 2,
                                "skipped_reasons": {"missing_image": 2}, "meta_task": "classification",
                                "split": "ind"}}
    results = {"datasets": datasets, **mmeb_summary({"ImageNet-1K": 0.5}), "missing": ["CIRR"]}
    text = mmeb_markdown(results, "tiny")
    assert "| **tiny** (this run) | 50.0 | – | – | – | 50.0 | – | 50.0 |" in text
    assert "| mmE5 supervised | 67.6 | 62.8 | 70.9 | 89.7 | 72.3 | 66.7 | 69.8 |" in text
    assert "| ImageNet-1K | classification | IND | 50.0 | 10 | 2 (missing_image 2) |" in text
    assert "overall 1/36" in text
    languages = {"es": {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 1.0, "n": 4, "skipped": 0,
                        "skipped_reasons": {}}}
    xtd = xtd_markdown({"languages": languages, "average": {"recall@10": 1.0}, "coverage": [1, 7],
                        "missing": ["it"]}, "tiny")
    assert "| **tiny** (this run) | – | 100.0 | – | – | – | – | – | 100.0 |" in xtd
    assert "| mmE5 | 96.1 | 96.2 | 93.3 | 96.3 | 95.4 | 93.6 | 96.0 | 95.3 |" in xtd
    json.dumps(results)


def test_cli_names_bad_datasets_before_touching_the_model(tmp_path, capsys):
    from mme5_jax.cli import main

    os.makedirs(tmp_path / "data" / "CIRR")
    os.makedirs(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
              "--output", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", "mmeb", *common, "--datasets", "CIRR", "ImageNet-2K"]) == 2
    assert "unknown MMEB datasets ['ImageNet-2K']" in capsys.readouterr().err
    assert main(["eval", "mmeb", *common, "--datasets", "VisDial"]) == 2
    assert "['VisDial'] not found under" in capsys.readouterr().err
    assert main(["eval", "xtd", *common]) == 2
    assert "none of the XTD languages" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "r.json")
