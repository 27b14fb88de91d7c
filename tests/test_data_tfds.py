"""TFDS ArrayRecord datasets as an image pool and as a record source (the optional `tfds` extra)."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from assets import make_processor_dir  # noqa: E402
from mme5_jax.data.demo import write_scene_split  # noqa: E402
from mme5_jax.data.pipeline import PipelineConfig, RecordSet, make_dataset  # noqa: E402
from mme5_jax.data.tfds_source import TfdsImagePool, TfdsRecordSet  # noqa: E402
from mme5_jax.records import RecordSource, shard_paths  # noqa: E402


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
                yield i, {"image": np.full((6 + i % 3, 9, 3), i, np.uint8), "record": record.decode("utf-8")}

    DemoInTfds(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "demo_in_tfds"


def test_tfds_image_pool_and_record_source(tmp_path):
    split_dir = write_scene_split(tmp_path / "train", "train", 32, image_size=32, seed=2, records_per_shard=32)
    raw = RecordSource(split_dir)
    entries = [raw[i] for i in range(len(raw))]
    name = _build(tmp_path / "tfds", entries)

    pool = TfdsImagePool(name, "train", data_dir=str(tmp_path / "tfds"))
    assert len(pool) == 32
    image = pool[4]
    assert image.size == (9, 7) and np.asarray(image)[0, 0].tolist() == [4, 4, 4]

    processor_dir = make_processor_dir(str(tmp_path / "processor"), image_size=28, max_image_tiles=4)
    config = PipelineConfig(processor_dir=processor_dir, global_batch_size=8, max_length=64, seed=1)
    from_shards = list(make_dataset(config, [RecordSet(str(split_dir))]))
    from_tfds = list(make_dataset(config, [TfdsRecordSet(name, split="train", data_dir=str(tmp_path / "tfds"),
                                                         image_root=str(split_dir))]))
    assert len(from_shards) == len(from_tfds) == 4 and len(shard_paths(split_dir)) == 1
    for a, b in zip(from_shards, from_tfds):
        for group in ("query", "positive", "negatives"):
            for key in a[group]:
                np.testing.assert_array_equal(a[group][key], b[group][key])
        np.testing.assert_array_equal(a["record_index"], b["record_index"])
