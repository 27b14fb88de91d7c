"""TFDS ArrayRecord datasets as an image pool and as a record source, and record sets as TFDS datasets
(the optional `tfds` extra)."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from assets import make_processor_dir  # noqa: E402
from train_fixtures import train_losses, write_config  # noqa: E402
from mme5_jax.cli import main  # noqa: E402
from mme5_jax.data.demo import write_scene_split  # noqa: E402
from mme5_jax.data.mixture import RecordSet  # noqa: E402
from mme5_jax.data.pipeline import PipelineConfig, make_dataset  # noqa: E402
from mme5_jax.data.tfds_source import TfdsImagePool, TfdsRecords, TfdsRecordSet  # noqa: E402
from mme5_jax.records import RecordSource, decode_record, read_records, shard_paths  # noqa: E402
from mme5_jax.train import load_config, train, train_record_sets  # noqa: E402


def _build(data_dir, records):
    """A TFDS dataset in ArrayRecord format with an image array and a JSON record per example (no TF needed)."""

    class DemoInTfds(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
                "record": tfds.features.Text()}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, record in enumerate(records):
                yield i, {"image": np.full((6 + i % 3, 9, 3), i, np.uint8), "record": json.dumps(record)}

    DemoInTfds(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "demo_in_tfds"


def test_tfds_image_pool_and_record_source(tmp_path):
    split_dir = write_scene_split(tmp_path / "train", "train", 32, image_size=32, seed=2, records_per_shard=32)
    name = _build(tmp_path / "tfds", list(read_records(split_dir)))
    old_dir = _bare_json_copy(split_dir, tmp_path / "old")

    pool = TfdsImagePool(name, "train", data_dir=str(tmp_path / "tfds"))
    assert len(pool) == 32
    image = pool[4]
    assert image.size == (9, 7) and np.asarray(image)[0, 0].tolist() == [4, 4, 4]

    processor_dir = make_processor_dir(str(tmp_path / "processor"), image_size=28, max_image_tiles=4)
    config = PipelineConfig(processor_dir=processor_dir, global_batch_size=8, max_length=64, seed=1)
    from_shards = list(make_dataset(config, [RecordSet(str(split_dir))]))
    from_tfds = list(make_dataset(config, [TfdsRecordSet(name, split="train", data_dir=str(tmp_path / "tfds"),
                                                         image_root=str(split_dir))]))
    from_old = list(make_dataset(config, [RecordSet(str(old_dir), image_root=str(split_dir))]))
    assert len(from_shards) == len(from_tfds) == len(from_old) == 4 and len(shard_paths(split_dir)) == 1
    for a, b, c in zip(from_shards, from_tfds, from_old):
        for group in ("query", "positive", "negatives"):
            for key in a[group]:
                np.testing.assert_array_equal(a[group][key], b[group][key])
                np.testing.assert_array_equal(a[group][key], c[group][key])
        np.testing.assert_array_equal(a["record_index"], b["record_index"])
        np.testing.assert_array_equal(a["record_index"], c["record_index"])


def _bare_json_copy(split_dir, out_dir):
    """The record set as written before entries became tf.Examples: one JSON text per entry, no TFDS files."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out_dir.mkdir()
    writer = ArrayRecordWriter(str(out_dir / "data-00000-of-00001.array_record"), "group_size:1")
    for record in read_records(split_dir):
        writer.write(json.dumps(record).encode("utf-8"))
    writer.close()
    return out_dir


def _released_parquet(tmp_path):
    """Five rows in the released mmE5 parquet layout, with their images."""
    root = tmp_path / "images"
    (root / "imgs").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 20, 30)).save(root / "imgs" / f"{i}.jpg")
    rows = [(f"<|image_1|>\nWhat is in picture {i}?", f"imgs/{i}.jpg", f"thing {i} ✓", "",
             str([f"thing {i + 1}"]), "['']") for i in range(4)]
    rows.append(("Find me an everyday image that matches the given caption: four.", "",
                 "<|image_1|>\nRepresent the given image.", "imgs/4.jpg", "[]", "[]"))
    table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(
        ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"))})
    parquet = tmp_path / "MSCOCO_i2t" / "train-00000-of-00001.parquet"
    parquet.parent.mkdir()
    pq.write_table(table, parquet)
    return parquet, root


def test_imported_record_set_loads_with_tfds(tmp_path):
    """`mme5 data import` output is a TFDS dataset: from its directory, and by name once placed in a data_dir."""
    parquet, root = _released_parquet(tmp_path)
    out = tmp_path / "mmE5-import"
    assert main(["data", "import", str(parquet), "--image-root", str(root), "--out", str(out),
                 "--records-per-shard", "2"]) == 0
    records = list(read_records(out))
    assert len(records) == 5 and len(shard_paths(out)) == 3

    builder = tfds.builder_from_directory(str(out))
    split = builder.info.splits["train"]
    assert (builder.info.name, str(builder.info.version)) == ("mme5_import", "1.0.0")
    assert (split.num_examples, split.num_shards) == (5, 3)
    source = builder.as_data_source(split="train")
    assert [decode_record(source[i]["record"], i) for i in range(len(source))] == records
    raw = RecordSource(out)
    assert split.num_bytes == sum(len(raw[i]) for i in range(len(raw)))

    data_dir = tmp_path / "tfds"
    shutil.copytree(out, data_dir / "mme5_import" / "1.0.0")
    source = tfds.data_source("mme5_import", split="train", data_dir=str(data_dir))
    assert [decode_record(source[i]["record"], i) for i in range(len(source))] == records
    assert tfds.builder("mme5_import", data_dir=str(data_dir)).info.splits["train[1:3]"].num_examples == 2
    entries = TfdsRecords("mme5_import", "train", str(data_dir))
    assert [decode_record(entries[i], i) for i in range(len(entries))] == records
    # images resolve through the summary.json that came along with the shards
    tfds_set = TfdsRecordSet("mme5_import", data_dir=str(data_dir))
    assert tfds_set.resolved_image_root() == os.path.abspath(root)
    (data_dir / "mme5_import" / "1.0.0" / "summary.json").unlink()
    with pytest.raises(ValueError, match="mme5_import/train needs image_root.*no summary.json"):
        tfds_set.resolved_image_root()


def test_train_reads_a_tfds_dataset_by_name(tmp_path):
    """Two `mme5 train` steps from a record set placed in a TFDS data_dir and named in the config."""
    data_dir = tmp_path / "tfds"
    write_scene_split(tmp_path / "scenes", "train", 32, image_size=32, seed=3, records_per_shard=16)
    (data_dir / "scenes").mkdir(parents=True)
    os.rename(tmp_path / "scenes", data_dir / "scenes" / "1.0.0")  # images and summary.json move with the shards
    make_processor_dir(str(tmp_path / "processor"), image_size=28, max_image_tiles=4)
    config = load_config(write_config(tmp_path, "run", {
        "data": {"demo_dir": None, "train": [{"tfds": "scenes", "data_dir": str(data_dir)}]},
        "train": {"steps": 2}, "checkpoint": {"every_steps": 100}}))
    (record_set,) = train_record_sets(config)
    assert isinstance(record_set, TfdsRecordSet) and (record_set.path, record_set.split) == ("scenes", "train")
    assert train(config)["step"] == 2
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
