"""Which records one pass of training reads: record sets, their weights, and their interleaving.

Everything here works on indices (the entries stay unread bytes), so building a pass over millions of records costs
nothing, and `mme5 train` can plan its steps and warn about replayed sets before it starts.
"""
import dataclasses
import json
import os
from pathlib import Path

import grain

from mme5_jax.records import RecordSource

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class RecordSet:
    """A record directory, its mixture weight and its image root (default: from summary.json, else the dir).

    A weight of `auto` stands for the set's record count (see `open_mixture`).
    """

    path: str
    weight: float | str = 1.0
    image_root: str | None = None

    def open(self):
        """Random access to the raw entries (bytes of one JSON record each)."""
        return RecordSource(self.path)

    def resolved_image_root(self):
        if self.image_root is not None:
            return str(self.image_root)
        summary = Path(self.path) / "summary.json"
        root = json.loads(summary.read_text(encoding="utf-8")).get("image_root", ".") if summary.is_file() else "."
        return str(Path(self.path) / root)


@dataclasses.dataclass(frozen=True)
class _Tag:
    """Labels entries with their record set and position; indices past the first epoch wrap around."""

    source_index: int
    num_records: int

    def __call__(self, index, data):
        return self.source_index, index % self.num_records, data


@dataclasses.dataclass(frozen=True)
class Mixture:
    """One pass over the training record sets, interleaved: `dataset` yields (source_index, record_index, entry).

    When every weight is `auto`, the sets are concatenated and shuffled as one, as mmE5 shuffles its concatenated
    data, so a pass reads each record exactly once. Otherwise Grain mixes them by weight (`auto` standing for the
    set's record count), and a pass ends when the first set runs out: the others are read only in part.
    """

    dataset: grain.MapDataset
    names: tuple
    sizes: tuple
    weights: tuple

    def __len__(self):
        return len(self.dataset)

    def replays(self, num_examples):
        """[(name, records, expected draws)] of the sets that `num_examples` examples would read more than once."""
        total = sum(self.weights)
        draws = [num_examples * w / total for w in self.weights]
        return [(n, size, d) for n, size, d in zip(self.names, self.sizes, draws) if d > size]


def open_mixture(record_sets, seed):
    """The `Mixture` of `record_sets` (RecordSet or path), each shuffled with its own seed."""
    if not record_sets:
        raise ValueError("no record sets given")
    record_sets = [RecordSet(r) if isinstance(r, (str, os.PathLike)) else r for r in record_sets]
    sources, sizes = [], []
    for i, record_set in enumerate(record_sets):
        if record_set.weight != AUTO and not (isinstance(record_set.weight, (int, float)) and record_set.weight > 0):
            raise ValueError(f"record set {record_set.path}: weight must be > 0 or {AUTO!r}, got {record_set.weight!r}")
        source = record_set.open()
        if not len(source):
            raise ValueError(f"record set {record_set.path} is empty")
        sizes.append(len(source))
        sources.append(grain.MapDataset.source(source).map_with_index(_Tag(i, len(source))))
    weights = [size if r.weight == AUTO else float(r.weight) for r, size in zip(record_sets, sizes)]
    if len(sources) == 1:
        ds = sources[0].shuffle(seed)
    elif all(r.weight == AUTO for r in record_sets):
        ds = grain.MapDataset.concatenate(sources).shuffle(seed)
    else:
        ds = grain.MapDataset.mix([s.shuffle(seed + i) for i, s in enumerate(sources)], weights)
    return Mixture(ds, tuple(str(r.path) for r in record_sets), tuple(sizes), tuple(weights))
