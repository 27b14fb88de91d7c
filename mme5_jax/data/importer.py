"""Import mmE5's released parquet data (`intfloat/mmE5-synthetic`, `intfloat/mmE5-MMEB-hardneg`) into records.

The released layout is VLM2Vec's: `qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path`,
with `<|image_1|>\\n` in front of image-bearing texts and the negatives as *stringified Python lists*. The
synthetic set adds `modality` (codes such as `T2I`, `IT2IT`) and `task` (`Classification`, `VQA`, `Retrieval`)
columns; a label that disagrees with what its row holds loses to the content, and is counted.
The data has known defects (empty positives, stray image tokens on text-only queries, missing images),
so every row is checked and each one is either kept, kept after a named repair, or skipped for a named
reason; `summary.json` counts them all. Negative lists are parsed with `ast.literal_eval`, never executed.
"""
import ast
import functools
import json
import os
import re
from collections import Counter
from pathlib import Path

from mme5_jax.records import MODALITIES, TASKS, RecordError, ShardWriter, check_image_path, resolve_image_path

COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
OPTIONAL_COLUMNS = ("task", "modality", "language")

# The 24 labelled subsets mmE5 trains on and their task; grounding counts as retrieval.
SUBSET_TASKS = {
    **dict.fromkeys(("ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"), "classification"),
    **dict.fromkeys(("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "TAT-DQA", "ArxivQA"),
                    "vqa"),
    **dict.fromkeys(("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                     "WebQA", "MSCOCO", "InfoSeek_it2t", "InfoSeek_it2it"), "retrieval"),
}
_LEADING_IMAGE_TOKEN = re.compile(r"^\s*<\|image_\d+\|>[ \t]*\n?")
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_EXAMPLES_PER_REASON = 5


class SkipRow(Exception):
    """A row that cannot become a record; `reason` is the summary key."""

    def __init__(self, reason, detail=""):
        super().__init__(detail or reason)
        self.reason = reason


class ImportStats:
    """Rows kept and skipped, repairs made to kept rows, by reason, with a few example locations per reason."""

    def __init__(self):
        self.rows = 0
        self.kept = 0
        self.rows_repaired = 0
        self.skipped = Counter()
        self.repaired = Counter()
        self.examples = {}

    def note(self, kind, reason, where, detail=""):
        (self.skipped if kind == "skipped" else self.repaired)[reason] += 1
        examples = self.examples.setdefault(f"{kind}:{reason}", [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(f"{where}: {detail}" if detail else where)

    def as_dict(self):
        return {"rows": self.rows, "kept": self.kept, "rows_repaired": self.rows_repaired,
                "skipped": dict(sorted(self.skipped.items())),
                "repaired": dict(sorted(self.repaired.items())), "examples": dict(sorted(self.examples.items()))}


class ImageChecker:
    """Decides whether a released image path is usable: inside the root as written, and present.

    Containment is judged on the path as written (no absolute path, no `..` above the root); links the operator
    placed under the root (a mounted image set, say) are followed. The verdict cache is bounded, so a billion-row
    import does not grow with its distinct paths.
    """

    def __init__(self, image_root, check_files=True):
        self.root = Path(image_root)
        self.check_files = check_files
        self.problem = functools.lru_cache(maxsize=1 << 16)(self._problem)

    def _problem(self, path):
        if check_image_path(path):
            return "path_escapes_root"
        if self.check_files and not os.path.isfile(resolve_image_path(self.root, path)):
            return "missing_image"
        return None


def _text(value):
    return value if isinstance(value, str) else ""


def _image_path(value):
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().replace("\\", "/")


def clean_text(value, has_image, note):
    """Drop VLM2Vec's image-token prefix; report a token without an image, or any other special token."""
    text = _text(value)
    stripped = _LEADING_IMAGE_TOKEN.sub("", text, count=1)
    if stripped != text and not has_image:
        note("stray_image_token")
    if _SPECIAL_TOKEN.search(stripped):
        stripped = _SPECIAL_TOKEN.sub("", stripped)
        note("special_token_removed")
    return stripped


def parse_list(value, column):
    """A released negative list: a real list, or a stringified Python/JSON list. Never evaluated as code."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                raise SkipRow("malformed_negatives", f"{column} is not a list literal") from None
    if value is None:
        return []
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise SkipRow("malformed_negatives", f"{column} parses to {type(value).__name__}, not a list")
    if not all(item is None or isinstance(item, str) for item in value):
        raise SkipRow("malformed_negatives", f"{column} holds non-string items")
    return value


def _side(text, image):
    return ("I" if image else "") + ("T" if text.strip() else "")


def released_modality(code):
    """`T2I`, `it2it`, `IT->I`, ... as the records' `T->I`, `IT->IT`, `IT->I`; None for any other value."""
    query, sep, target = str(code).strip().upper().replace("->", "2").partition("2")
    modality = f"{query}->{target}"
    return modality if sep and modality in MODALITIES else None


class Labels:
    """Reconciles a row's released `modality`/`task` labels with what it holds, counting every disagreement.

    The content decides which sides have an image. A labelled image side (`I`) may still carry text: that text
    is the instruction ("Represent the given image."), so `I` with text is consistent. Unknown label values are
    counted with their value (the first `max_values` distinct ones; the rest as `<other>`) and cost the row
    nothing.
    """

    max_values = 100

    def __init__(self):
        self.disagreements = Counter()
        self.unknown = {"modality": Counter(), "task": Counter()}

    def _unknown(self, column, value):
        counts = self.unknown[column]
        key = str(value) if str(value) in counts or len(counts) < self.max_values else "<other>"
        counts[key] += 1

    def modality(self, label, query_side, target_side):
        content = f"{query_side}->{target_side}"
        if label is None or (isinstance(label, str) and not label.strip()):
            return content
        modality = released_modality(label)
        if modality is None:
            self._unknown("modality", label)
            return content
        sides = []
        for labelled, held in zip(modality.split("->"), (query_side, target_side)):
            consistent = labelled == held or (labelled == "I" and held == "IT")
            sides.append(labelled if consistent else held)
        decided = "->".join(sides)
        if decided != modality:
            self.disagreements[f"modality {str(label).strip()} but the row holds {decided}"] += 1
        return decided

    def task(self, label, default):
        if label is None or (isinstance(label, str) and not label.strip()):
            return default
        task = str(label).strip().lower()
        if task in TASKS:
            return task
        self._unknown("task", label)
        return default

    def as_dict(self):
        return {"disagreements": dict(sorted(self.disagreements.items())),
                "unknown": {column: dict(sorted(c.items())) for column, c in self.unknown.items()}}


def _pad_to(values, length):
    """mmE5 pads a short negative list by repeating its last element."""
    return values + values[-1:] * (length - len(values))


class RowConverter:
    """Turns one released row into a record (validated when written), noting repairs; raises SkipRow when it
    cannot."""

    def __init__(self, images, labels, source, task, language):
        self.images, self.labels = images, labels
        self.source, self.task, self.language = source, task, language

    def __call__(self, row, row_id, note_repair):
        qry_image = self._image(row.get("qry_image_path"), "query")
        pos_image = self._image(row.get("pos_image_path"), "positive")
        qry_text = clean_text(row.get("qry"), qry_image is not None, note_repair)
        pos_text = clean_text(row.get("pos_text"), pos_image is not None, note_repair)
        query_side, target_side = _side(qry_text, qry_image), _side(pos_text, pos_image)
        if not query_side:
            raise SkipRow("empty_query")
        if not target_side:
            raise SkipRow("empty_positive")
        neg_text, neg_image = self._negatives(row, "I" in target_side, target_side == "T", note_repair)
        return {
            "id": row_id, "source": self.source, "task": self.labels.task(row.get("task"), self.task),
            "modality": self.labels.modality(row.get("modality"), query_side, target_side),
            "language": _text(row.get("language")) or self.language,
            "qry_text": qry_text, "qry_image": qry_image, "pos_text": pos_text, "pos_image": pos_image,
            "neg_text": neg_text, "neg_image": neg_image,
        }

    def _image(self, value, role):
        path = _image_path(value)
        if path is None:
            return None
        problem = self.images.problem(path)
        if problem:
            raise SkipRow(problem, f"{role} image {path!r}")
        return path

    def _negatives(self, row, need_image, need_text, note_repair):
        texts = parse_list(row.get("neg_text"), "neg_text")
        images = parse_list(row.get("neg_image_path"), "neg_image_path")
        count = max(len(texts), len(images))
        if texts and images and len(texts) != len(images):
            note_repair("negatives_padded")
            texts, images = _pad_to(texts, count), _pad_to(images, count)
        texts, images = texts or [""] * count, images or [None] * count
        kept_text, kept_image = [], []
        for text, image in zip(texts, images):
            image = _image_path(image)
            problem = self.images.problem(image) if image else None
            if problem:
                note_repair(f"negative_dropped_{problem}")
                continue
            text = clean_text(text, image is not None, note_repair)
            if not text.strip() and image is None:
                note_repair("negative_dropped_empty")
                continue
            if (need_image and image is None) or (need_text and not text.strip()):
                note_repair("negative_dropped_modality_mismatch")
                continue
            kept_text.append(text)
            kept_image.append(image)
        return kept_text, kept_image


def source_name(path):
    """The subset a parquet file belongs to: a known subset name in its path, else its file stem."""
    path = Path(path)
    for part in reversed(path.with_suffix("").parts):
        if part in SUBSET_TASKS:
            return part
    return path.stem


def _first_rows(parquet, columns, max_rows):
    """The file's rows in stored order, in batches, stopping after `max_rows` (all when None)."""
    left = parquet.metadata.num_rows if max_rows is None else min(max_rows, parquet.metadata.num_rows)
    if left <= 0:
        return
    for batch in parquet.iter_batches(batch_size=2048, columns=columns):
        if left <= 0:
            return
        rows = batch.slice(0, left).to_pylist()
        left -= len(rows)
        yield rows


def import_parquet(parquet_paths, image_root, out_dir, source=None, task=None, language="en", check_images=True,
                   records_per_shard=10000, max_rows=None, progress=True):
    """Convert released parquet files into a record set at `out_dir`; returns the summary dict.

    `max_rows` keeps the first N rows of each subset (`source`, named by each file's path unless given): files of
    one subset count together, in the order given. mmE5 trains on the first 50,000 rows of each labelled subset.
    Rows stream through in batches, so memory does not grow with the input.
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if max_rows is not None and max_rows < 1:
        raise ValueError(f"--max-rows must be >= 1, got {max_rows}")
    image_root, out_dir = Path(image_root), Path(out_dir)
    if not image_root.is_dir():
        raise FileNotFoundError(f"--image-root {image_root} is not a directory")
    files = [pq.ParquetFile(p) for p in parquet_paths]
    for path, parquet in zip(parquet_paths, files):
        missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path} lacks column {missing[0]!r}; the released layout has {', '.join(COLUMNS)}")
    images, labels = ImageChecker(image_root, check_files=check_images), Labels()
    stats, rows_per_source = ImportStats(), Counter()
    counts = {"task": Counter(), "modality": Counter(), "source": Counter()}
    rows_by_source = Counter()
    for path, parquet in zip(parquet_paths, files):
        rows_by_source[source or source_name(path)] += parquet.metadata.num_rows
    total_rows = sum(n if max_rows is None else min(n, max_rows) for n in rows_by_source.values())
    # Ids are `<source>-<row number>`, unique by construction: no id set to grow with the output.
    with ShardWriter(out_dir, records_per_shard=records_per_shard, check_unique_ids=False) as writer, \
            tqdm(total=total_rows, desc="import", unit="row", disable=not progress) as bar:
        for path, parquet in zip(parquet_paths, files):
            name = source or source_name(path)
            convert = RowConverter(images, labels, name, task or SUBSET_TASKS.get(name, "retrieval"), language)
            columns = list(COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in parquet.schema_arrow.names]
            row_in_file, file_name = 0, Path(path).name
            left = None if max_rows is None else max_rows - rows_per_source[name]
            for rows in _first_rows(parquet, columns, left):
                for row in rows:
                    where = f"{file_name}:{row_in_file}"
                    row_id = f"{name}-{rows_per_source[name]:08d}"
                    rows_per_source[name] += 1
                    row_in_file += 1
                    stats.rows += 1
                    repairs = []
                    try:
                        record = convert(row, row_id, repairs.append)
                        writer.write(record)  # validates before writing anything
                    except SkipRow as skip:
                        stats.note("skipped", skip.reason, where, str(skip) if str(skip) != skip.reason else "")
                        continue
                    except RecordError as err:
                        stats.note("skipped", "invalid_record", where, str(err))
                        continue
                    stats.kept += 1
                    stats.rows_repaired += bool(repairs)
                    for reason in repairs:
                        stats.note("repaired", reason, where)
                    for key in counts:
                        counts[key][record[key]] += 1
                bar.update(len(rows))
    summary = {"generator": "mme5 data import", "inputs": [str(p) for p in parquet_paths],
               "image_root": os.path.abspath(image_root), "images_checked": check_images, "max_rows": max_rows,
               "num_records": writer.num_records, **stats.as_dict(), "labels": labels.as_dict(),
               "counts": {k: dict(sorted(v.items())) for k, v in counts.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
