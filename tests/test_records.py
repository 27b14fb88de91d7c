"""The record schema: validation names the bad field, shards round-trip, writes are atomic, entries are
tf.Examples described by TFDS metadata, and sets of bare-JSON entries still read."""
import json

import pytest

from mme5_jax.records import (MODALITIES, RECORD_FIELDS, RecordError, RecordSource, ShardWriter, decode_record,
                              encode_record, read_records, shard_paths, tfds_name, validate_record)


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
    assert "IT->IT" in MODALITIES and "T->T" in MODALITIES and len(MODALITIES) == 9


def test_text_only_pair_is_a_valid_record():
    record = make_record(modality="T->T", qry_image=None, pos_text="a cat\n", pos_image=None,
                         neg_text=["a dog\n"], neg_image=[None])
    assert validate_record(record) is record
    with pytest.raises(RecordError, match="'neg_text\\[0\\]' is empty"):
        validate_record(dict(record, neg_text=[" "]))


def test_image_negative_of_an_image_text_target_may_lack_text():
    record = make_record(modality="IT->IT", pos_text="Represent the given image.\n")
    assert validate_record(dict(record, neg_text=["", ""])) is not None


@pytest.mark.parametrize("overrides, field, words", [
    ({"task": "captioning"}, "task", "expected one of"),
    ({"modality": "T-T"}, "modality", "expected one of"),
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
    assert len(source) == 25 and decode_record(source[13]) == records[13]
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


def test_writer_describes_its_shards_to_tfds(tmp_path):
    """Metadata TFDS reads without our help: one `train` split with the real shard lengths and entry bytes."""
    with ShardWriter(tmp_path / "My Set-2", records_per_shard=2) as writer:
        for i in range(5):
            writer.write(make_record(i))
    info = json.loads((tmp_path / "My Set-2" / "dataset_info.json").read_text())
    (split,) = info["splits"]
    assert (info["name"], info["version"], info["fileFormat"]) == ("my_set_2", "1.0.0", "array_record")
    assert split["name"] == "train" and split["shardLengths"] == ["2", "2", "1"]
    assert split["filepathTemplate"].format(SHARD_X_OF_Y="00002-of-00003", FILEFORMAT="array_record") == \
        shard_paths(tmp_path / "My Set-2")[2].name
    source = RecordSource(tmp_path / "My Set-2")
    assert int(split["numBytes"]) == sum(len(source[i]) for i in range(5))
    features = json.loads((tmp_path / "My Set-2" / "features.json").read_text())["featuresDict"]["features"]
    assert features["record"]["pythonClassName"].endswith("text_feature.Text")
    assert [tfds_name(n) for n in ("train", "mmE5 import", "2024", "..")] == ["train", "mme5_import", "records_2024",
                                                                             "records"]


def test_entries_are_tf_examples_holding_the_json():
    record = make_record(3)
    entry = encode_record(record)
    payload = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
    # Example{features{feature{key: "record", value{bytes_list{value: payload}}}}}, each level length-prefixed
    assert entry.startswith(b"\n") and entry.endswith(payload) and b"\n\x06record\x12" in entry
    assert decode_record(entry) == record
    pb2 = pytest.importorskip("tensorflow_datasets.core.example_parser").tf_example_pb2  # protobuf's own reading
    example = pb2.Example.FromString(entry)
    assert example.features.feature["record"].bytes_list.value == [payload]
    example.features.feature["image"].bytes_list.value.append(b"\x00" * 300)  # other features are passed over
    example.features.feature["label"].int64_list.value.extend([7, 1 << 40])
    assert decode_record(example.SerializeToString()) == record


@pytest.mark.parametrize("entry, reason, words", [
    (b"\n\x08\n\x06\n\x04name", "malformed_entry", "no bytes feature 'record'"),
    (b"\n\xff\x01", "malformed_entry", "truncated"),
    (b"{not json", "malformed_json", "entry is not UTF-8 JSON"),
    (b"\n\x12\n\x10\n\x06record\x12\x06\n\x04\n\x02\xff{", "malformed_json", "entry is not UTF-8 JSON"),
])
def test_undecodable_entries_name_the_reason(entry, reason, words):
    with pytest.raises(RecordError, match=words) as err:
        decode_record(entry, index=4)
    assert err.value.reason == reason and str(err.value).startswith("record #4: ")


def test_record_sets_of_bare_json_entries_still_read(tmp_path):
    """Sets written before entries became tf.Examples hold one JSON text per entry and no TFDS metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter

    records = [make_record(i) for i in range(7)]
    (tmp_path / "old").mkdir()
    for shard, part in enumerate((records[:4], records[4:])):
        writer = ArrayRecordWriter(str(tmp_path / "old" / f"data-0000{shard}-of-00002.array_record"), "group_size:1")
        for record in part:
            writer.write(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        writer.close()
    assert list(read_records(tmp_path / "old")) == records
    source = RecordSource(tmp_path / "old")
    assert [decode_record(source[i], i) for i in range(len(source))] == records
    assert decode_record(json.dumps(records[0])) == records[0]
