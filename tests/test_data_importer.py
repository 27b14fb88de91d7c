"""`mme5 data import` on a hand-made parquet in the released layout, known defects included."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mme5_jax.cli import main
from mme5_jax.data.importer import parse_list
from mme5_jax.records import read_records

IMG = "<|image_1|>\n"
ROWS = [
    # 0: clean image query -> text target, stringified negative lists
    (f"{IMG}Represent the given image with the following question: What is it?", "imgs/a.jpg", "a cat", "",
     "['a dog', 'a fox']", "['', '']"),
    # 1: text -> image; negatives stringified by Python's str(list), which escapes the newline
    ("Find me an everyday image that matches the given caption: A cat.", "", f"{IMG}Represent the given image.",
     "imgs/b.jpg", str([f"{IMG}Represent the given image."]), "['imgs/c.jpg']"),
    # 2: empty positive -> skipped
    (f"{IMG}What is it?", "imgs/a.jpg", "", "", "[]", "[]"),
    # 3: stray image token on a text-only query -> repaired; one negative image missing -> dropped
    (f"{IMG}Find me an image of a dog.", "", f"{IMG}Represent the given image.", "imgs/b.jpg",
     str([f"{IMG}Represent the given image."] * 2), "['imgs/gone.jpg', 'imgs/c.jpg']"),
    # 4: missing query image -> skipped
    (f"{IMG}What is it?", "imgs/missing.jpg", "a cat", "", "[]", "[]"),
    # 5: path escaping the image root -> skipped
    (f"{IMG}What is it?", "../secret.jpg", "a cat", "", "[]", "[]"),
    # 6: negatives that are code, not a literal -> skipped, never executed
    (f"{IMG}What is it?", "imgs/a.jpg", "a cat", "", "__import__('os').system('touch PWNED')", "[]"),
    # 7: negative lists of different lengths -> skipped
    (f"{IMG}What is it?", "imgs/a.jpg", "a cat", "", "['x', 'y']", "['', '', '']"),
    # 8: text-only on both sides -> skipped (every record involves an image)
    ("What is a cat?", "", "an animal", "", "[]", "[]"),
    # 9: JSON-style negative list with an empty entry -> kept, empty negative dropped
    (f"{IMG}Find a caption.", "imgs/a.jpg", "a cat", "", '["a dog", ""]', "null"),
    # 10: absolute path -> skipped
    (f"{IMG}What is it?", "/etc/passwd", "a cat", "", "[]", "[]"),
]
EXPECTED = [
    {"id": "MSCOCO_i2t-00000000", "source": "MSCOCO_i2t", "task": "retrieval", "modality": "IT->T",
     "language": "en", "qry_text": "Represent the given image with the following question: What is it?",
     "qry_image": "imgs/a.jpg", "pos_text": "a cat", "pos_image": None, "neg_text": ["a dog", "a fox"],
     "neg_image": [None, None]},
    {"id": "MSCOCO_i2t-00000001", "source": "MSCOCO_i2t", "task": "retrieval", "modality": "T->IT",
     "language": "en", "qry_text": "Find me an everyday image that matches the given caption: A cat.",
     "qry_image": None, "pos_text": "Represent the given image.", "pos_image": "imgs/b.jpg",
     "neg_text": ["Represent the given image."], "neg_image": ["imgs/c.jpg"]},
    {"id": "MSCOCO_i2t-00000003", "source": "MSCOCO_i2t", "task": "retrieval", "modality": "T->IT",
     "language": "en", "qry_text": "Find me an image of a dog.", "qry_image": None,
     "pos_text": "Represent the given image.", "pos_image": "imgs/b.jpg",
     "neg_text": ["Represent the given image."], "neg_image": ["imgs/c.jpg"]},
    {"id": "MSCOCO_i2t-00000009", "source": "MSCOCO_i2t", "task": "retrieval", "modality": "IT->T",
     "language": "en", "qry_text": "Find a caption.", "qry_image": "imgs/a.jpg", "pos_text": "a cat",
     "pos_image": None, "neg_text": ["a dog"], "neg_image": [None]},
]


@pytest.fixture()
def released(tmp_path):
    root = tmp_path / "images"
    (root / "imgs").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "imgs" / f"{name}.jpg")
    (tmp_path / "secret.jpg").write_bytes(b"not for you")
    table = pa.table({name: [row[i] for row in ROWS] for i, name in enumerate(
        ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"))})
    parquet = tmp_path / "MSCOCO_i2t" / "train-00000-of-00001.parquet"
    parquet.parent.mkdir()
    pq.write_table(table, parquet)
    return parquet, root


def test_import_yields_exact_records_and_counts(released, tmp_path, monkeypatch, capsys):
    parquet, root = released
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "records"
    assert main(["data", "import", str(parquet), "--image-root", str(root), "--out", str(out),
                 "--records-per-shard", "3"]) == 0
    assert not (tmp_path / "PWNED").exists()
    assert list(read_records(out)) == EXPECTED
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["kept"], summary["rows_repaired"], summary["num_records"]) == (11, 4, 2, 4)
    assert summary["skipped"] == {"empty_positive": 1, "malformed_negatives": 1, "missing_image": 1,
                                  "negatives_length_mismatch": 1, "path_escapes_root": 2, "text_only_pair": 1}
    assert summary["repaired"] == {"negative_dropped_empty": 1, "negative_dropped_missing_image": 1,
                                   "stray_image_token": 1}
    assert summary["examples"]["skipped:missing_image"] == ["train-00000-of-00001.parquet:4: query image "
                                                             "'imgs/missing.jpg'"]
    assert summary["image_root"] == str(root.resolve())
    assert '"kept": 4' in capsys.readouterr().out

    assert main(["data", "stats", str(out), "--check-images"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 4 and stats["by_modality"] == {"IT->T": 2, "T->IT": 2}
    assert stats["missing_images"]["count"] == 0 and stats["distinct_images"] == 3
    assert stats["import_summary"]["skipped"] == summary["skipped"]


def test_symlink_escaping_root_is_skipped(released, tmp_path):
    parquet, root = released
    os.symlink(tmp_path / "secret.jpg", root / "imgs" / "link.jpg")
    table = pa.table({"qry": [f"{IMG}What?"], "qry_image_path": ["imgs/link.jpg"], "pos_text": ["x"],
                      "pos_image_path": [""], "neg_text": ["[]"], "neg_image_path": ["[]"]})
    pq.write_table(table, tmp_path / "link.parquet")
    from mme5_jax.data.importer import import_parquet

    summary = import_parquet([tmp_path / "link.parquet"], root, tmp_path / "out", task="vqa", progress=False)
    assert summary["kept"] == 0 and summary["skipped"] == {"path_escapes_root": 1}


def test_missing_column_is_named(tmp_path):
    pq.write_table(pa.table({"qry": ["x"]}), tmp_path / "bad.parquet")
    from mme5_jax.data.importer import import_parquet

    with pytest.raises(ValueError, match="bad.parquet lacks column 'qry_image_path'"):
        import_parquet([tmp_path / "bad.parquet"], tmp_path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("value, expected", [
    ("['a', \"b's\"]", ["a", "b's"]), ('["a", null]', ["a", None]), ("[None, 'x']", [None, "x"]),
    ("", []), (None, []), (["a"], ["a"]), ("('a',)", ["a"]),
])
def test_parse_list(value, expected):
    assert parse_list(value, "neg_text") == expected


@pytest.mark.parametrize("value", ["[1, 2]", "{'a': 1}", "open('x')", "[" * 500, "'a string'"])
def test_parse_list_rejects(value):
    from mme5_jax.data.importer import SkipRow

    with pytest.raises(SkipRow) as err:
        parse_list(value, "neg_text")
    assert err.value.reason == "malformed_negatives"


def test_optional_columns_are_used_and_invalid_values_skipped(released, tmp_path):
    from mme5_jax.data.importer import import_parquet

    _, root = released
    table = pa.table({"qry": [f"{IMG}What?", f"{IMG}Why?"], "qry_image_path": ["imgs/a.jpg"] * 2,
                      "pos_text": ["x", "y"], "pos_image_path": ["", ""], "neg_text": ["[]", "[]"],
                      "neg_image_path": ["[]", "[]"], "task": ["vqa", "captioning"], "language": ["fr", "de"]})
    pq.write_table(table, tmp_path / "synthetic.parquet")
    summary = import_parquet([tmp_path / "synthetic.parquet"], root, tmp_path / "out", progress=False)
    assert summary["kept"] == 1 and summary["skipped"] == {"invalid_record": 1}
    assert "field 'task' is 'captioning'" in summary["examples"]["skipped:invalid_record"][0]
    (record,) = read_records(tmp_path / "out")
    assert (record["id"], record["task"], record["language"], record["source"]) == (
        "synthetic-00000000", "vqa", "fr", "synthetic")
