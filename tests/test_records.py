"""The record schema: validation names the bad field, shards round-trip, writes are atomic."""
import json

import pytest

from mme5_jax.records import (MODALITIES, RECORD_FIELDS, RecordError, RecordSource, ShardWriter, read_records,
                              shard_paths, validate_record)


def make_record(i=0, **overrides):
    record = {
        "id": f"r{i}", "source": "unit", "task": "retrieval", "modality": "IT->I", "language": "de",
        "qry_text": f"Ein roter Kreis, Nummer {i} — ünïcödé ✓", "qry_image": f"img/{i}.png",
        "pos_text": "Represent the given image.\n", "pos_image": f"img/{i}b.png",
        "neg_text": ["", "x"], "neg_image": ["img/n1.png", "img/n2.png"], "meta": {"k": i},
    }
    record.update(overrides)
    return record


def test_valid_record_passes_and_all_fields_are_known():
    record = make_record()
    assert validate_record(record) is record
    assert set(RECORD_FIELDS) <= set(record)
    assert "IT->IT" in MODALITIES and "T->T" not in MODALITIES and len(MODALITIES) == 8


@pytest.mark.parametrize("overrides, field, words", [
    ({"task": "captioning"}, "task", "expected one of"),
    ({"modality": "T->T"}, "modality", "expected one of"),
    ({"qry_text": "<|image_1|>\nWhat is it?"}, "qry_text", "special token"),
    ({"qry_text": "<|begin_of_text|>hi"}, "qry_text", "special token"),
    ({"qry_image": None}, "qry_image", "needs an image"),
    ({"qry_image": "../etc/passwd"}, "qry_image", "escapes the image root"),
    ({"pos_image": "/abs/x.png"}, "pos_image", "absolute"),
    ({"pos_image": "a/../../x.png"}, "pos_image", "escapes"),
    ({"neg_image": ["img/n1.png"]}, "neg_image", "1 entries but neg_text has 2"),
    ({"neg_image": ["img/n1.png", None]}, "neg_image[1]", "needs an image"),
    ({"neg_text": "x"}, "neg_text", "must be a list"),
    ({"language": ""}, "language", "non-empty"),
    ({"meta": [1]}, "meta", "must be an object"),
    ({"extra": 1}, "extra", "not part of the schema"),
    ({"modality": "T->I", "qry_text": "  "}, "qry_text", "empty"),
    ({"modality": "T->I"}, "qry_image", "text-only query"),
])
def test_validation_names_record_and_field(overrides, field, words):
    with pytest.raises(RecordError) as err:
        validate_record(make_record(7, **overrides), index=3)
    message = str(err.value)
    assert "'r7'" in message and "#3" in message and f"'{field}'" in message and words in message


def test_missing_field_and_non_dict():
    record = make_record()
    del record["pos_text"]
    with pytest.raises(RecordError, match="'pos_text' is missing"):
        validate_record(record)
    with pytest.raises(RecordError, match="record #5: must be a JSON object"):
        validate_record([1], index=5)


def test_shards_round_trip_in_order(tmp_path):
    records = [make_record(i) for i in range(25)]
    with ShardWriter(tmp_path / "set", records_per_shard=10) as writer:
        for record in records:
            writer.write(record)
    names = [p.name for p in shard_paths(tmp_path / "set")]
    assert names == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
    assert list(read_records(tmp_path / "set")) == records
    source = RecordSource(tmp_path / "set")
    assert len(source) == 25 and json.loads(source[13]) == records[13]
    assert list(read_records(shard_paths(tmp_path / "set")[1:])) == records[10:]


def test_writer_rejects_bad_records_and_duplicates(tmp_path):
    with ShardWriter(tmp_path / "set") as writer:
        writer.write(make_record(0))
        with pytest.raises(RecordError, match="'id' repeats"):
            writer.write(make_record(0))
        with pytest.raises(RecordError, match=r"'r1' \(#1\): field 'task'"):
            writer.write(make_record(1, task="x"))
    assert [r["id"] for r in read_records(tmp_path / "set")] == ["r0"]


def test_interrupted_writer_publishes_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path / "set", records_per_shard=2) as writer:
            for i in range(5):
                writer.write(make_record(i))
            raise KeyboardInterrupt
    assert list((tmp_path / "set").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="holds no data-"):
        shard_paths(tmp_path / "set")


def test_writer_refuses_existing_set_and_reader_detects_missing_shard(tmp_path):
    with ShardWriter(tmp_path / "set", records_per_shard=1) as writer:
        writer.write(make_record(0))
        writer.write(make_record(1))
    with pytest.raises(FileExistsError, match="already holds record shards"):
        ShardWriter(tmp_path / "set")
    (tmp_path / "set" / "data-00001-of-00002.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="missing shard data-00001-of-00002"):
        list(read_records(tmp_path / "set"))


def test_empty_record_set_is_valid(tmp_path):
    with ShardWriter(tmp_path / "empty"):
        pass
    assert list(read_records(tmp_path / "empty")) == []
