"""The project's training-record format: one JSON object per ArrayRecord entry.

Every producer (importer, demo data, synthesis) writes through `ShardWriter` and every consumer reads
through `read_records` or `RecordSource`, so a record is validated once, by one set of rules, and a
bad one is reported with its id and field instead of surfacing later as a shape error in training.

Shards are written with `group_size:1` so that Grain can read any entry without decoding its
neighbours, and they only get their final `data-XXXXX-of-YYYYY.array_record` names on a clean close:
an interrupted writer never leaves a record set that looks complete.

Each entry wraps the JSON in a one-feature tf.Example, and `close()` writes TFDS's metadata files next to
the shards, so a record set is also a TFDS dataset (`tfds.builder_from_directory`) without either side
needing TensorFlow. Readers still accept the bare-JSON entries of record sets written before that.
"""
import json
import os
import posixpath
import re
from pathlib import Path

from mme5_jax import tf_example

RECORD_FIELDS = ("id", "source", "task", "modality", "language", "qry_text", "qry_image",
                 "pos_text", "pos_image", "neg_text", "neg_image")
OPTIONAL_FIELDS = ("meta",)
TASKS = ("classification", "vqa", "retrieval")
# Query and target sides are text (T), image (I) or both (IT); all nine combinations are valid. Text-only
# pairs (T->T) keep a model's text retrieval quality when mixed into multimodal training.
SIDES = ("I", "T", "IT")
MODALITIES = tuple(f"{q}->{t}" for q in SIDES for t in SIDES)

SHARD_PATTERN = re.compile(r"^data-(\d{5})-of-(\d{5})\.array_record$")
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_WRITER_OPTIONS = "group_size:1"
# What makes a record set a TFDS dataset (see `write_tfds_metadata`): the feature holding each record's JSON,
# the metadata files next to the shards, and the one version and split they describe.
RECORD_FEATURE = "record"
TFDS_FILES = ("features.json", "dataset_info.json")
TFDS_VERSION = "1.0.0"
TFDS_SPLIT = "train"


class RecordError(ValueError):
    """A record that breaks the schema; the message names the record and the bad field.

    `reason` is a short code for counting failures (empty_text, special_token, path_escapes_root,
    malformed_json, malformed_entry, invalid_record).
    """

    def __init__(self, message, reason="invalid_record"):
        super().__init__(message)
        self.reason = reason


def _fail(record, index, field, problem, reason="invalid_record"):
    rid = record.get("id") if isinstance(record, dict) else None
    where = f"record {rid!r}" if isinstance(rid, str) and rid else f"record #{index}" if index is not None else "record"
    if isinstance(rid, str) and rid and index is not None:
        where += f" (#{index})"
    raise RecordError(f"{where}: field {field!r} {problem}", reason)


def check_image_path(path):
    """Return why `path` cannot be an image path relative to a dataset root, or None if it can."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty string or null"
    if path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return f"is absolute ({path!r}); image paths are relative to the image root"
    normalised = posixpath.normpath(path.replace("\\", "/"))
    if normalised == ".." or normalised.startswith("../"):
        return f"escapes the image root ({path!r})"
    return None


def resolve_image_path(root, path):
    """The file a checked relative image path names: `root` joined with the path's normal form.

    Normalising first means the operating system never sees a `..`, so a link under the root cannot combine
    with one to climb out of it; the links themselves are followed.
    """
    return os.path.join(root, posixpath.normpath(path.replace("\\", "/")))


def _check_text(record, index, field, value, required):
    if not isinstance(value, str):
        _fail(record, index, field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        _fail(record, index, field, "is empty but the modality needs text", "empty_text")
    token = _SPECIAL_TOKEN.search(value)
    if token:
        _fail(record, index, field, f"contains the special token {token.group(0)!r}; texts carry no special tokens",
              "special_token")


def _check_image(record, index, field, value, required):
    if value is None:
        if required:
            _fail(record, index, field, "is null but the modality needs an image")
        return
    problem = check_image_path(value)
    if problem:
        reason = "path_escapes_root" if isinstance(value, str) and value else "invalid_record"
        _fail(record, index, field, problem, reason)


def validate_record(record, index=None):
    """Check `record` against the schema and return it; raise RecordError naming the first bad field."""
    if not isinstance(record, dict):
        raise RecordError(f"record #{index}: must be a JSON object, got {type(record).__name__}")
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        _fail(record, index, missing[0], "is missing")
    unknown = sorted(set(record) - set(RECORD_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        _fail(record, index, unknown[0], "is not part of the schema; put extra metadata under 'meta'")
    for field in ("id", "source", "language"):
        if not isinstance(record[field], str) or not record[field]:
            _fail(record, index, field, "must be a non-empty string")
    if record["task"] not in TASKS:
        _fail(record, index, "task", f"is {record['task']!r}, expected one of {', '.join(TASKS)}")
    if record["modality"] not in MODALITIES:
        _fail(record, index, "modality", f"is {record['modality']!r}, expected one of {', '.join(MODALITIES)}")
    query_side, target_side = record["modality"].split("->")
    _check_text(record, index, "qry_text", record["qry_text"], required=query_side == "T" or query_side == "IT")
    _check_image(record, index, "qry_image", record["qry_image"], required="I" in query_side)
    if record["qry_image"] is not None and "I" not in query_side:
        _fail(record, index, "qry_image", f"is set but modality {record['modality']!r} has a text-only query")
    _check_text(record, index, "pos_text", record["pos_text"], required=target_side == "T" or target_side == "IT")
    _check_image(record, index, "pos_image", record["pos_image"], required="I" in target_side)
    if record["pos_image"] is not None and "I" not in target_side:
        _fail(record, index, "pos_image", f"is set but modality {record['modality']!r} has a text-only target")
    for field in ("neg_text", "neg_image"):
        if not isinstance(record[field], list):
            _fail(record, index, field, f"must be a list, got {type(record[field]).__name__}")
    if len(record["neg_text"]) != len(record["neg_image"]):
        _fail(record, index, "neg_image", f"has {len(record['neg_image'])} entries but neg_text has "
                                          f"{len(record['neg_text'])}")
    for i, (text, image) in enumerate(zip(record["neg_text"], record["neg_image"])):
        # An image negative of an IT target may have lost its text (mmE5's data has such rows): it keeps its image.
        _check_text(record, index, f"neg_text[{i}]", text, required=target_side == "T")
        _check_image(record, index, f"neg_image[{i}]", image, required="I" in target_side)
    if "meta" in record and not isinstance(record["meta"], dict):
        _fail(record, index, "meta", f"must be an object, got {type(record['meta']).__name__}")
    return record


def encode_record(record):
    """The stored entry: a tf.Example whose one bytes feature `record` holds the record as UTF-8 JSON.

    TFDS decodes every ArrayRecord entry as a tf.Example, so this shape makes a record set a TFDS dataset.
    It is encoded by hand: writing and reading records needs neither TensorFlow nor TFDS.
    """
    return tf_example.encode_bytes_feature(RECORD_FEATURE, json.dumps(record, ensure_ascii=False,
                                                                      sort_keys=True).encode("utf-8"))


def decode_record(data, index=None):
    """Parse and validate one stored entry: a tf.Example (see `encode_record`) or, as in record sets
    written before those, the JSON text itself."""
    if isinstance(data, (bytes, bytearray, memoryview)) and data[:1] == b"\n":  # a tf.Example's field 1
        try:
            data = tf_example.read_bytes_feature(memoryview(data), RECORD_FEATURE)
        except (ValueError, IndexError) as err:
            raise RecordError(f"record #{index}: entry is not a tf.Example with feature {RECORD_FEATURE!r} ({err})",
                              "malformed_entry") from None
    try:
        record = json.loads(data if isinstance(data, str) else bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"record #{index}: entry is not UTF-8 JSON ({err})", "malformed_json") from None
    return validate_record(record, index)


def shard_name(shard, num_shards):
    return f"data-{shard:05d}-of-{num_shards:05d}.array_record"


def tfds_name(directory_name):
    """A valid TFDS dataset name (a letter, then lower-case letters, digits and `_`) made from a directory name."""
    name = re.sub(r"[^a-z0-9]+", "_", directory_name.lower()).strip("_")
    return name if name[:1].isalpha() else f"records_{name}".rstrip("_")


def write_tfds_metadata(out_dir, name, shard_lengths, num_bytes):
    """Write the files TFDS reads to load `out_dir`'s shards as split `train` of dataset `name`.

    They are the JSON forms of TFDS's DatasetInfo and FeaturesDict, written directly so that tfds is not
    needed; `filepathTemplate` lets the shards keep their names. `num_bytes` counts the entries' bytes.
    """
    info = {
        "name": name, "version": TFDS_VERSION, "fileFormat": "array_record", "disableShuffling": True,
        "description": f"mmE5 training records: feature {RECORD_FEATURE!r} holds one record as JSON.",
        "splits": [{"name": TFDS_SPLIT, "filepathTemplate": "data-{SHARD_X_OF_Y}.{FILEFORMAT}",
                    "shardLengths": [str(n) for n in shard_lengths], "numBytes": str(num_bytes)}]}
    features = {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                "featuresDict": {"features": {RECORD_FEATURE: {
                    "pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}}}}
    for file_name, content in zip(TFDS_FILES, (features, info)):  # dataset_info.json last: TFDS looks for it
        path = Path(out_dir) / file_name
        temp = path.with_name(f".tmp-{os.getpid()}-{file_name}")
        temp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        os.replace(temp, path)


class ShardWriter:
    """Validate records and write them into ArrayRecord shards of at most `records_per_shard` entries.

    Shards are written under temporary names; `close()` gives them their final names (which carry the
    shard count, unknown until the end) and then writes the TFDS metadata naming the set `dataset_name`
    (default: made from the directory's name). Leaving the `with` block through an exception deletes them.
    """

    def __init__(self, out_dir, records_per_shard=10000, check_unique_ids=True, dataset_name=None):
        from array_record.python.array_record_module import ArrayRecordWriter

        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self._writer_class = ArrayRecordWriter
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.out_dir.iterdir() if SHARD_PATTERN.match(p.name))
        if existing:
            raise FileExistsError(f"{self.out_dir} already holds record shards ({existing[0]}, ...); "
                                  f"write to an empty directory")
        self.records_per_shard = records_per_shard
        self.num_records = 0
        self._temp_paths = []
        self._writer = None
        self._shard_lengths = []
        self.num_bytes = 0
        self.dataset_name = dataset_name or tfds_name(self.out_dir.resolve().name)
        # The id set grows with the output; producers whose ids are unique by construction switch it off.
        self._ids = set() if check_unique_ids else None
        self.paths = []

    def write(self, record):
        validate_record(record, self.num_records)
        if self._ids is not None:
            if record["id"] in self._ids:
                raise RecordError(f"record {record['id']!r} (#{self.num_records}): field 'id' repeats an earlier "
                                  f"record")
            self._ids.add(record["id"])
        if self._writer is None or self._shard_lengths[-1] == self.records_per_shard:
            self._open_next_shard()
        entry = encode_record(record)
        self._writer.write(entry)
        self._shard_lengths[-1] += 1
        self.num_records += 1
        self.num_bytes += len(entry)

    def _open_next_shard(self):
        if self._writer is not None:
            self._writer.close()
        path = self.out_dir / f".tmp-{os.getpid()}-{len(self._temp_paths):05d}.array_record"
        self._temp_paths.append(path)
        self._writer = self._writer_class(str(path), _WRITER_OPTIONS)
        self._shard_lengths.append(0)

    def close(self):
        """Finish the last shard, publish all shards under their final names, then the TFDS metadata."""
        if self._writer is None and not self._temp_paths:
            self._open_next_shard()  # an empty record set is still one valid, empty shard
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        total = len(self._temp_paths)
        self.paths = [self.out_dir / shard_name(i, total) for i in range(total)]
        for temp, final in zip(self._temp_paths, self.paths):
            os.replace(temp, final)
        self._temp_paths = []
        write_tfds_metadata(self.out_dir, self.dataset_name, self._shard_lengths, self.num_bytes)
        return self.paths

    def abort(self):
        """Drop everything written so far."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for temp in self._temp_paths:
            temp.unlink(missing_ok=True)
        self._temp_paths = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def shard_paths(dir_or_paths):
    """The shard files of a record set, in order; a directory must hold a complete `-of-N` series."""
    if isinstance(dir_or_paths, (str, os.PathLike)):
        path = Path(dir_or_paths)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise FileNotFoundError(f"no record set at {path}")
        found = {}
        for child in path.iterdir():
            match = SHARD_PATTERN.match(child.name)
            if match:
                found.setdefault(int(match.group(2)), []).append((int(match.group(1)), child))
        if not found:
            raise FileNotFoundError(f"{path} holds no data-XXXXX-of-YYYYY.array_record shards")
        if len(found) > 1:
            raise ValueError(f"{path} mixes shard series of sizes {sorted(found)}")
        (total, shards), = found.items()
        present = {i for i, _ in shards}
        absent = sorted(set(range(total)) - present)
        if absent:
            raise FileNotFoundError(f"{path} is missing shard {shard_name(absent[0], total)}")
        return [p for _, p in sorted(shards)]
    paths = [Path(p) for p in dir_or_paths]
    if not paths:
        raise ValueError("no record shards given")
    return [p for item in paths for p in (shard_paths(item) if item.is_dir() else [item])]


def read_records(dir_or_paths):
    """Yield every record of a record set in stored order, validated."""
    from array_record.python.array_record_module import ArrayRecordReader

    index = 0
    for path in shard_paths(dir_or_paths):
        reader = ArrayRecordReader(str(path))
        try:
            for start in range(0, reader.num_records(), 1024):
                chunk = reader.read(list(range(start, min(start + 1024, reader.num_records()))))
                for data in chunk:
                    yield decode_record(data, index)
                    index += 1
        finally:
            reader.close()


class RecordSource:
    """Random access to the raw entries of a record set, for `grain.MapDataset.source`.

    Entries stay bytes here: decoding happens in Grain's worker processes, where a malformed entry
    is counted and skipped rather than failing the whole pipeline.
    """

    def __init__(self, dir_or_paths):
        import grain

        self.paths = [str(p) for p in shard_paths(dir_or_paths)]
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        return self._source[index]

    def __repr__(self):
        return f"RecordSource({len(self.paths)} shards, {len(self)} records)"
