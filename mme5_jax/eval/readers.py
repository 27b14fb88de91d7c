"""Benchmark rows -> `EvalSet`s: each query with its candidate list (positive first) over a table of unique items.

Local copies of the Hugging Face repositories are read as they are: `<Subset>/*.parquet` (MMEB-eval) or
`<lang>/*.parquet` (XTD-10), rows with `qry_text`, `qry_img_path`, `tgt_text` (list) and `tgt_img_path` (list),
image paths relative to an image root. Texts stay in VLM2Vec format; the Embedder strips `<|image_1|>\\n`.

A row that cannot be scored as the benchmark defines it (missing image, empty candidate list, lists of different
lengths, non-text fields) is skipped and counted by reason, so every score says what its denominator is.
Items are (text, image path) pairs, deduplicated per set, so a candidate repeated across rows is encoded once.
"""
import glob
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


class DataError(ValueError):
    """A dataset that cannot be read at all (missing directory, file or column), as opposed to a bad row."""


@dataclass
class EvalSet:
    """Queries and candidate lists over `items`; row r's candidates are `candidates[offsets[r]:offsets[r+1]]`."""
    name: str
    items: list  # unique (text, image path | None) pairs
    queries: np.ndarray  # [R] item indices
    candidates: np.ndarray  # flat item indices, the positive first in every row
    offsets: np.ndarray  # [R + 1]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows

    @property
    def num_rows(self) -> int:
        return len(self.queries)

    def without_items(self, bad_items, reason: str) -> "EvalSet":
        """This set minus the rows that use any of `bad_items`, which are counted as skipped for `reason`."""
        bad = np.zeros(len(self.items), bool)
        bad[list(bad_items)] = True
        if not self.num_rows or not bad.any():
            return self
        counts = np.diff(self.offsets)
        bad_row = bad[self.queries] | (np.add.reduceat(bad[self.candidates], self.offsets[:-1]) > 0)
        if not bad_row.any():
            return self
        keep = ~bad_row
        pair_keep = np.repeat(keep, counts)
        skipped = self.skipped.copy()
        skipped[reason] += int(bad_row.sum())
        offsets = np.concatenate([[0], np.cumsum(counts[keep])])
        return EvalSet(self.name, self.items, self.queries[keep], self.candidates[pair_keep], offsets, skipped)


class SetBuilder:
    """Collects rows of one set; `image_exists` is shared so that each image file is checked once."""

    def __init__(self, name: str, image_exists=None):
        self.name = name
        self._index = {}
        self._queries, self._candidates, self._offsets = [], [], [0]
        self.skipped = Counter()
        self._exists = ExistsCache() if image_exists is None else image_exists

    def _item(self, item) -> int:
        return self._index.setdefault(item, len(self._index))

    def add(self, query, candidates) -> None:
        """Adds one row of (text, image path | None) items, or skips it with a counted reason."""
        reason = self._problem(query, candidates)
        if reason:
            self.skipped[reason] += 1
            return
        self._queries.append(self._item(query))
        self._candidates.extend(self._item(c) for c in candidates)
        self._offsets.append(len(self._candidates))

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def _problem(self, query, candidates):
        if not candidates:
            return "empty_candidates"
        if any(image is not None and not self._exists(image) for _, image in [query, *candidates]):
            return "missing_image"
        return None

    def build(self) -> EvalSet:
        return EvalSet(self.name, list(self._index), np.array(self._queries, np.int64),
                       np.array(self._candidates, np.int64), np.array(self._offsets, np.int64), self.skipped)


class ExistsCache(dict):
    """`os.path.isfile`, asked once per path."""

    def __call__(self, path):
        if path not in self:
            self[path] = os.path.isfile(path)
        return self[path]


def _image(value, image_root):
    """Image path joined to the root, None for no image; raises TypeError for a non-string."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError
    return os.path.join(image_root, value)


def parse_row(row: dict, image_root: str):
    """(query item, candidate items) of one benchmark row, or the reason it cannot be scored."""
    texts = [] if row["tgt_text"] is None else row["tgt_text"]
    images = [] if row["tgt_img_path"] is None else row["tgt_img_path"]
    if not isinstance(row["qry_text"], str):
        return "bad_query_text"
    if not isinstance(texts, list) or not isinstance(images, list):
        return "bad_candidates"
    if len(texts) != len(images):
        return "mismatched_lengths"
    if not texts:
        return "empty_candidates"
    if any(t is not None and not isinstance(t, str) for t in texts):
        return "bad_candidates"
    try:
        query = (row["qry_text"], _image(row["qry_img_path"], image_root))
        candidates = [(t or "", _image(p, image_root)) for t, p in zip(texts, images)]
    except TypeError:
        return "bad_image_path"
    return query, candidates


def parquet_files(data_dir: str, name: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_dir, name, "**", "*.parquet"), recursive=True))
    if not files:
        raise DataError(f"no parquet files for {name!r} under {os.path.join(data_dir, name)}")
    return files


def read_parquet_set(data_dir: str, name: str, image_root: str | None = None, image_exists=None) -> EvalSet:
    """One `<name>/*.parquet` dataset in the MMEB row format."""
    root = data_dir if image_root is None else image_root
    builder = SetBuilder(name, image_exists)
    for path in parquet_files(data_dir, name):
        try:
            table = pq.read_table(path, columns=list(COLUMNS))
        except (KeyError, ValueError) as err:
            have = pq.read_schema(path).names
            raise DataError(f"{path}: expected columns {list(COLUMNS)}, found {have}") from err
        for row in table.to_pylist():
            parsed = parse_row(row, root)
            if isinstance(parsed, str):
                builder.skip(parsed)
            else:
                builder.add(*parsed)
    return builder.build()


def present_subsets(data_dir: str, names) -> list[str]:
    """The names among `names` that have a directory in `data_dir`, in the given order."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist")
    return [n for n in names if os.path.isdir(os.path.join(data_dir, n))]


def set_from_records(name: str, records, image_root: str, *, pool: bool = True,
                     hard_negatives: bool = True) -> EvalSet:
    """A retrieval set from project records (`mme5_jax/records.py`), e.g. a held-out split for in-training evaluation.

    Each query's candidates are its positive, its own hard negatives (with `hard_negatives`) and, with `pool`,
    every other record's positive: the in-batch setting of training, over the whole set (pooling makes N^2
    pairs, which suits held-out sets of up to a few thousand records).
    """
    exists = ExistsCache()
    builder = SetBuilder(name, exists)
    rows = []
    for record in records:
        try:
            query = (record["qry_text"], _image(record.get("qry_image"), image_root))
            positive = (record["pos_text"], _image(record.get("pos_image"), image_root))
            negatives = [(t, _image(p, image_root)) for t, p in zip(record.get("neg_text") or [],
                                                                     record.get("neg_image") or [])]
        except (KeyError, TypeError):
            builder.skip("bad_record")
            continue
        if any(image is not None and not exists(image) for _, image in [query, positive, *negatives]):
            builder.skip("missing_image")  # before pooling: a missing positive must not sink other rows
            continue
        rows.append((query, positive, negatives))
    positives = [positive for _, positive, _ in rows]
    for i, (query, positive, negatives) in enumerate(rows):
        others = positives[:i] + positives[i + 1:] if pool else []
        builder.add(query, [positive, *(negatives if hard_negatives else []), *others])
    return builder.build()


def set_from_items(name: str, queries, candidate_lists) -> EvalSet:
    """A set from `{"text", "image": path | None}` dicts; each candidate list has its positive first."""
    if len(queries) != len(candidate_lists):
        raise ValueError(f"{name}: {len(queries)} queries but {len(candidate_lists)} candidate lists")
    builder = SetBuilder(name)
    def as_item(d):
        return (d["text"], d.get("image"))
    for query, candidates in zip(queries, candidate_lists):
        builder.add(as_item(query), [as_item(c) for c in candidates])
    return builder.build()
