"""TFDS datasets stored as ArrayRecord, as an image pool or a record source (optional: the `tfds` extra).

`tfds.data_source` gives random access to a prepared TFDS dataset without TensorFlow, which is what both
uses need: synthesis and retrieval index images by position, and Grain shuffles record indices.
Image features may be decoded arrays or encoded bytes; both come back as PIL images.
Every record set this project writes is such a dataset (see `mme5_jax.records`), as is any TFDS dataset
with a Text feature holding one record's JSON.
"""
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mme5_jax.data.mixture import RecordSet


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError("TFDS sources need tensorflow-datasets: pip install 'mme5-jax[tfds]'") from err
    return tfds


def data_source(name, split, data_dir=None):
    return _tfds().data_source(name, split=split, data_dir=data_dir)


def to_pil(value, where):
    """A TFDS image feature value (uint8 array or encoded image bytes) as a PIL image."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        return Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value)
    if isinstance(value, (bytes, np.bytes_)):
        image = Image.open(io.BytesIO(value))
        image.load()
        return image
    raise TypeError(f"{where}: expected a uint8 image array or encoded image bytes, got "
                    f"{type(value).__name__} {getattr(value, 'shape', '')}")


class TfdsImagePool:
    """The images of a TFDS dataset split, by index."""

    def __init__(self, name, split, data_dir=None, image_key="image"):
        self.name, self.split, self.image_key = name, split, image_key
        self._source = data_source(name, split, data_dir)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        example = self._source[index]
        if self.image_key not in example:
            raise KeyError(f"{self.name}/{self.split}: no feature {self.image_key!r}; it has {sorted(example)}")
        return to_pil(example[self.image_key], f"{self.name}/{self.split}[{index}]")


class TfdsRecords:
    """Random access to records stored one JSON text per example in feature `record_key`, as the JSON bytes
    that `decode_record` parses."""

    def __init__(self, name, split, data_dir=None, record_key="record"):
        self.name, self.split, self.record_key = name, split, record_key
        self._source = data_source(name, split, data_dir)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        value = self._source[index][self.record_key]
        return value if isinstance(value, bytes) else str(value).encode("utf-8")

    def __repr__(self):
        return f"TfdsRecords({self.name}/{self.split}, {len(self)} records)"


@dataclasses.dataclass(frozen=True)
class TfdsRecordSet(RecordSet):
    """A record set kept in a TFDS dataset (`path` is the dataset name); images are files under `image_root`,
    by default the one in the `summary.json` that a record set placed in `data_dir` keeps next to its shards."""

    split: str = "train"
    data_dir: str | None = None
    record_key: str = "record"

    def open(self):
        return TfdsRecords(self.path, self.split, self.data_dir, self.record_key)

    def resolved_image_root(self):
        if self.image_root is not None:
            return str(self.image_root)
        directory = Path(_tfds().builder(self.path, data_dir=self.data_dir).data_dir)
        summary = directory / "summary.json"
        root = json.loads(summary.read_text(encoding="utf-8")).get("image_root") if summary.is_file() else None
        if root is None:
            raise ValueError(f"TFDS record set {self.path}/{self.split} needs image_root for its image paths: "
                             f"{directory} has no summary.json naming one")
        return str(directory / root)
