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
    # 7: negative lists of different lengths -> each padded by repeating its last entry, as mmE5 does
    (f"{IMG}What is it?", "imgs/a.jpg", "a cat", "", "['x', 'y']", "['', '', '']"),
    # 8: text-only on both sides -> kept (T->T)
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
    {"id": "MSCOCO_i2t-00000007", "source": "MSCOCO_i2t", "task": "retrieval", "modality": "IT->T",
     "language": "en", "qry_text": "What is it?", "qry_image": "imgs/a.jpg", "pos_text": "a cat", "pos_image": None,
     "neg_text": ["x", "y", "y"], "neg_image": [None, None, None]},
    {"id": "MSCOCO_i2t-00000008", "source": "MSCOCO_i2t", "task": "retrieval", "modality": "T->T",
     "language": "en", "qry_text": "What is a cat?", "qry_image": None, "pos_text": "an animal", "pos_image": None,
     "neg_text": [], "neg_image": []},
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
    assert (summary["rows"], summary["kept"], summary["rows_repaired"], summary["num_records"]) == (11, 6, 3, 6)
    assert summary["skipped"] == {"empty_positive": 1, "malformed_negatives": 1, "missing_image": 1,
                                  "path_escapes_root": 2}
    assert summary["repaired"] == {"negative_dropped_empty": 1, "negative_dropped_missing_image": 1,
                                   "negatives_padded": 1, "stray_image_token": 1}
    assert summary["examples"]["skipped:missing_image"] == ["train-00000-of-00001.parquet:4: query image "
                                                             "'imgs/missing.jpg'"]
    assert summary["image_root"] == os.path.abspath(root)
    assert '"kept": 6' in capsys.readouterr().out

    assert main(["data", "stats", str(out), "--check-images"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 6 and stats["by_modality"] == {"IT->T": 3, "T->IT": 2, "T->T": 1}
    assert stats["missing_images"]["count"] == 0 and stats["distinct_images"] == 3
    assert stats["import_summary"]["skipped"] == summary["skipped"]


def test_links_under_the_root_are_followed_and_climbing_paths_refused(released, tmp_path):
    """The operator mounts the image set as a link under the root; a data path that climbs out is refused."""
    parquet, root = released
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    Image.new("RGB", (8, 8)).save(mounted / "m.jpg")
    os.symlink(mounted, root / "set")
    os.symlink(tmp_path / "secret.jpg", root / "imgs" / "link.jpg")
    paths = ["set/m.jpg", "imgs/link.jpg", "set/../imgs/a.jpg", "set/../../secret.jpg", "imgs/../../secret.jpg",
             str(mounted / "m.jpg")]
    table = pa.table({"qry": [f"{IMG}What?"] * len(paths), "qry_image_path": paths, "pos_text": ["x"] * len(paths),
                      "pos_image_path": [""] * len(paths), "neg_text": ["[]"] * len(paths),
                      "neg_image_path": ["[]"] * len(paths)})
    pq.write_table(table, tmp_path / "link.parquet")
    from mme5_jax.data.importer import import_parquet

    summary = import_parquet([tmp_path / "link.parquet"], root, tmp_path / "out", task="vqa", progress=False)
    assert summary["kept"] == 3 and summary["skipped"] == {"path_escapes_root": 3}
    assert [r["qry_image"] for r in read_records(tmp_path / "out")] == ["set/m.jpg", "imgs/link.jpg",
                                                                       "set/../imgs/a.jpg"]


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


def test_optional_columns_are_used_and_unknown_values_counted(released, tmp_path):
    from mme5_jax.data.importer import import_parquet

    _, root = released
    table = pa.table({"qry": [f"{IMG}What?", f"{IMG}Why?"], "qry_image_path": ["imgs/a.jpg"] * 2,
                      "pos_text": ["x", "y"], "pos_image_path": ["", ""], "neg_text": ["[]", "[]"],
                      "neg_image_path": ["[]", "[]"], "task": ["vqa", "captioning"], "language": ["fr", "de"]})
    pq.write_table(table, tmp_path / "synthetic.parquet")
    summary = import_parquet([tmp_path / "synthetic.parquet"], root, tmp_path / "out", progress=False)
    assert summary["kept"] == 2 and summary["skipped"] == {}
    assert summary["labels"]["unknown"] == {"modality": {}, "task": {"captioning": 1}}
    first, second = read_records(tmp_path / "out")
    assert (first["id"], first["task"], first["language"], first["source"]) == (
        "synthetic-00000000", "vqa", "fr", "synthetic")
    assert (second["task"], second["language"]) == ("retrieval", "de")


def _released_images(tmp_path):
    """An image root whose image set is a linked folder, as a 1 TB set is mounted."""
    mount, root = tmp_path / "mount", tmp_path / "root"
    (mount / "00").mkdir(parents=True)
    root.mkdir()
    for i in range(14):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(mount / "00" / f"{i}.jpg")
    os.symlink(mount, root / "laion")
    return root


def _negatives(items):
    return str(list(items))


SYNTHETIC = [  # (qry, qry_image, pos_text, pos_image, neg_text, neg_image, modality code, task, expected modality)
    ("Find me an everyday image that matches the given caption: A cat.\n", "", f"{IMG}Represent the given image.\n",
     "laion/00/1.jpg", _negatives([f"{IMG}Represent the given image.\n"]), _negatives(["laion/00/2.jpg"]),
     "T2I", "Retrieval", "T->I"),
    # a stray image token on a text-only query (28K such rows in the released set)
    (f"{IMG}Find me an everyday image that matches the given caption: A dog.\n", "",
     f"{IMG}Represent the given image.\n", "laion/00/3.jpg", _negatives([f"{IMG}Represent the given image.\n"]),
     _negatives(["laion/00/4.jpg"]), "T2I", "Retrieval", "T->I"),
    (f"{IMG}Represent the given image for classification.\n", "laion/00/5.jpg", "tabby cat\n", "",
     _negatives(["tiger\n"]), _negatives([""]), "I2T", "Classification", "I->T"),
    (f"{IMG}Represent the given image with the following question: What is it?\n", "laion/00/6.jpg", "a cat\n", "",
     _negatives(["a dog\n"]), _negatives([""]), "IT2T", "VQA", "IT->T"),
    (f"{IMG}Find an image like this one, but at night.\n", "laion/00/7.jpg", f"{IMG}Represent the given image.\n",
     "laion/00/8.jpg", _negatives([f"{IMG}Represent the given image.\n"]), _negatives(["laion/00/9.jpg"]),
     "IT2I", "retrieval", "IT->I"),
    (f"{IMG}Represent the given image.\n", "laion/00/7.jpg", f"{IMG}Represent the given image.\n",
     "laion/00/8.jpg", _negatives([f"{IMG}Represent the given image.\n"]), _negatives(["laion/00/9.jpg"]),
     "I2I", "RETRIEVAL", "I->I"),
    (f"{IMG}Find a news image that matches: a storm\n", "laion/00/10.jpg", f"{IMG}A storm over the sea.\n",
     "laion/00/11.jpg", _negatives([f"{IMG}A calm sea.\n"] * 11), _negatives([f"laion/00/{i}.jpg" for i in range(11)]),
     "IT2IT", "Retrieval", "IT->IT"),
    ("Find a photo with this caption: a storm.\n", "", f"{IMG}A storm over the sea.\n", "laion/00/12.jpg",
     _negatives([""]), _negatives(["laion/00/13.jpg"]), "T2IT", "Retrieval", "T->IT"),
    # label disagrees with the content: a T2I row with a query image -> the content decides, counted
    (f"{IMG}Find a similar image.\n", "laion/00/1.jpg", f"{IMG}Represent the given image.\n", "laion/00/2.jpg",
     "[]", "[]", "T2I", "Retrieval", "IT->I"),
    # an unknown code is counted with its value and costs the row nothing
    ("Find a caption: cat\n", "", "a cat\n", "", "[]", "[]", "X2Y", "Retrieval", "T->T"),
]
HOSTILE = [  # (qry, qry_image, neg_text): refused and counted
    (f"{IMG}What?\n", "laion/../../secret.jpg", "[]"),
    (f"{IMG}What?\n", "/etc/passwd", "[]"),
    (f"{IMG}What?\n", "laion/00/1.jpg", "__import__('os').system('touch PWNED')"),
]


def test_released_synthetic_layout_keeps_every_good_row(tmp_path, monkeypatch):
    from mme5_jax.data.importer import import_parquet

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.jpg").write_bytes(b"not for you")
    root = _released_images(tmp_path)
    rows = [row[:8] for row in SYNTHETIC] + [(q, i, "a\n", "", n, "[]", "I2T", "Retrieval") for q, i, n in HOSTILE]
    columns = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path", "modality", "task")
    pq.write_table(pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)}), tmp_path / "syn.parquet")
    summary = import_parquet([tmp_path / "syn.parquet"], root, tmp_path / "out", progress=False)
    records = list(read_records(tmp_path / "out"))
    assert [r["modality"] for r in records] == [row[8] for row in SYNTHETIC]
    assert [r["task"] for r in records] == [row[7].lower() for row in SYNTHETIC]
    assert summary["skipped"] == {"malformed_negatives": 1, "path_escapes_root": 2}
    assert not (tmp_path / "PWNED").exists()
    assert summary["labels"] == {"disagreements": {"modality T2I but the row holds IT->I": 1},
                                 "unknown": {"modality": {"X2Y": 1}, "task": {}}}
    assert summary["repaired"] == {"stray_image_token": 1}
    assert records[1]["qry_text"] == "Find me an everyday image that matches the given caption: A dog.\n"
    assert len(records[6]["neg_text"]) == 11 and records[6]["neg_image"][10] == "laion/00/10.jpg"
    assert all(r["qry_text"].endswith("\n") and r["pos_text"].endswith("\n") for r in records)
    assert records[7]["neg_text"] == [""] and records[7]["neg_image"] == ["laion/00/13.jpg"]


def test_released_hardneg_layout_and_max_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _released_images(tmp_path)
    rows = []
    for i in range(6):  # WebQA: text-only questions with a stray image token, image+text positives, 11 negatives
        rows.append((f"{IMG}Find a Wikipedia image that answers this question: question {i}?\n", "",
                     f"{IMG}Represent the given Wikipedia image with related text information: title {i}\n",
                     f"laion/00/{i}.jpg", _negatives([f"{IMG}Represent ...: other {j}\n" for j in range(11)]),
                     _negatives([f"laion/00/{j}.jpg" for j in range(11)])))
    columns = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
    parquet = tmp_path / "WebQA" / "train.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)}), parquet, row_group_size=4)
    assert main(["data", "import", str(parquet), "--image-root", str(root), "--out", "out", "--max-rows", "5"]) == 0
    records = list(read_records(tmp_path / "out"))
    assert [r["id"] for r in records] == [f"WebQA-{i:08d}" for i in range(5)]
    assert {r["modality"] for r in records} == {"T->IT"} and {r["task"] for r in records} == {"retrieval"}
    assert all(len(r["neg_image"]) == 11 and r["qry_image"] is None for r in records)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["rows"], summary["kept"], summary["max_rows"]) == (5, 5, 5)
    assert summary["repaired"] == {"stray_image_token": 5}


def test_import_errors_name_the_problem(released, tmp_path, capsys):
    parquet, root = released
    assert main(["data", "import", str(parquet), "--image-root", str(root), "--out", str(tmp_path / "o"),
                 "--max-rows", "0"]) == 2
    assert "--max-rows must be >= 1, got 0" in capsys.readouterr().err
    assert main(["data", "import", str(tmp_path / "absent.parquet"), "--image-root", str(root), "--out",
                 str(tmp_path / "o")]) == 2
    assert "absent.parquet" in capsys.readouterr().err


def test_same_content_gives_the_same_tokens_from_importer_synthesis_and_mmeb(released, tmp_path):
    """One text convention: instruction, text and trailing newline, whichever way a text enters."""
    from assets import make_processor_dir
    from data_synth.layout import mmeb_text
    from mme5_jax.data.importer import import_parquet
    from mme5_jax.eval.readers import parse_row
    from mme5_jax.processing import MllamaInputProcessor, model_string

    _, root = released
    instruction, question = "Represent the given image with the following question:", "What is it?"
    released_text = f"{IMG}{instruction} {question}\n"
    table = pa.table({"qry": [released_text], "qry_image_path": ["imgs/a.jpg"], "pos_text": ["a cat\n"],
                      "pos_image_path": [""], "neg_text": ["[]"], "neg_image_path": ["[]"]})
    pq.write_table(table, tmp_path / "one.parquet")
    import_parquet([tmp_path / "one.parquet"], root, tmp_path / "one", progress=False)
    (imported,) = read_records(tmp_path / "one")
    (eval_text, _), candidates = parse_row({"qry_text": released_text, "qry_img_path": "imgs/a.jpg",
                                            "tgt_text": ["a cat\n"], "tgt_img_path": [""]}, str(root))
    processor = MllamaInputProcessor.from_pretrained(make_processor_dir(str(tmp_path / "proc"), image_size=28))
    queries = [imported["qry_text"], mmeb_text(instruction, question), eval_text]
    ids = processor.tokenize([model_string(text, has_image=True) for text in queries])
    assert ids[0] == ids[1] == ids[2]
    targets = [imported["pos_text"], mmeb_text("a cat"), candidates[0][0]]
    ids = processor.tokenize([model_string(text, has_image=False) for text in targets])
    assert ids[0] == ids[1] == ids[2]


def test_max_rows_counts_the_files_of_one_subset_together(released, tmp_path):
    from mme5_jax.data.importer import import_parquet

    parquet, root = released
    second = parquet.parent / "train-00001-of-00001.parquet"
    second.write_bytes(parquet.read_bytes())
    summary = import_parquet([parquet, second, parquet], root, tmp_path / "capped", max_rows=14, progress=False)
    assert summary["rows"] == 14 and summary["counts"]["source"] == {"MSCOCO_i2t": summary["kept"]}
    assert summary["examples"]["skipped:empty_positive"] == ["train-00000-of-00001.parquet:2",
                                                             "train-00001-of-00001.parquet:2"]
