"""The Grain input pipeline: record sets in, static-shape (query, positive, k negatives) batches out.

Order of work:

    record sets -> one shuffled pass over them (`mixture.open_mixture`: index-level, so it costs nothing)
    -> repeat(num_epochs) = the global order -> this process's rows of each global batch (`ProcessRows`)
    -> map(decode, load images, Mllama preprocessing)           (in `num_workers` processes)
    -> count rejected examples -> batch into length buckets

Global batch s is entries [position + s * G, position + (s + 1) * G) of the global order, in that row order, and
process p of P contributes rows [p * G / P, (p + 1) * G / P). A run's data position is therefore one number,
`position`, whatever the number of processes: a checkpoint written by P processes resumes on P' processes with
no example skipped or repeated. A rejected example keeps its row, as a placeholder that `example_mask` marks
False so the loss ignores it; dropping it would shift every later row by one, on one process only.

Every example passes through `MllamaInputProcessor`, the same code as the `Embedder`, so training sees exactly
the inputs inference will. Rejections are counted by reason in the counting stage's checkpointable state, so
"skipped" is visible instead of silent.

Workers send only the real image tiles of an example (text-only items and repeated negatives cost nothing), and
the batching step packs the real images per device and GradCache chunk (`mme5_jax.data.images`): text-only slots
carry no pixels, and the step's vision tower encodes only the images that exist.

A host batch is a dict of numpy arrays: `query` and `positive` hold the processor's text arrays [B, ...]
(`input_ids`, `attention_mask`, `cross_attention_mask`, `has_image`) and `image_index` [B], `negatives` the same
with [B, k, ...], plus `negative_mask` [B, k], `example_mask`, `source_index` and `record_index` [B] (-1 for a
rejected row), `row_index` [B] (each row's place in the global batch: rows are reordered within a process to
even out images per device) and `images` (packed pixel arrays). `to_global_batch` turns it into `jax.Array`s
sharded over the mesh's batch axes.
"""
import dataclasses
import functools
import logging
import os
from collections import Counter

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from mme5_jax.data.images import IMAGE_KEYS, ImageLayout, drop_unused_images, group_slots, pack_batch, \
    step_images, widen
from mme5_jax.processing import DEFAULT_MAX_IMAGE_PIXELS, BadItemError, MllamaInputProcessor, bucket_for
from mme5_jax.data.mixture import RecordSet, open_mixture
from mme5_jax.data.pipeline_config import POLICIES, PipelineConfig
from mme5_jax.records import RecordError, check_image_path, decode_record, resolve_image_path

log = logging.getLogger(__name__)
TEXT_KEYS = ("input_ids", "attention_mask", "cross_attention_mask")
ROW_KEYS = ("negative_mask", "example_mask", "source_index", "record_index")


class BadExampleError(ValueError):
    """Raised under `bad_input="raise"`; names the record and the reason."""


class _Reject(Exception):
    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


def _image_problem(error):
    """Map an image loading error onto a counted reason."""
    if isinstance(error, FileNotFoundError):
        return "missing_image"
    if isinstance(error, Image.DecompressionBombError) or "max_image_pixels" in str(error):
        return "decompression_bomb"
    if isinstance(error, (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)):
        return "corrupt_image"
    return "unreadable_image"


@functools.lru_cache(maxsize=4)
def load_processor(processor_dir, bos, max_length, max_image_pixels):
    """One processor per process and setting: loading a Llama-3 tokenizer takes seconds. Training applies mmE5's
    training-collator fix for 1-px-high images (inference does not)."""
    return MllamaInputProcessor.from_pretrained(processor_dir, bos=bos, max_length=max_length,
                                                max_image_pixels=max_image_pixels, min_height_fix=True)


class PrepareExample:
    """Grain map, run in worker processes: raw entry -> processor arrays for query, positive and k negatives.

    Only the configuration is pickled; each worker loads its processor once (see `load_processor`).
    """

    def __init__(self, config, image_roots):
        self.config = config
        self.image_roots = image_roots

    @property
    def processor(self):
        return load_processor(self.config.processor_dir, self.config.bos, self.config.max_length,
                              self.config.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS)

    def __call__(self, element):
        source_index, record_index, data = element
        where = f"source {source_index} record #{record_index}"
        try:
            try:
                record = decode_record(data, record_index)
            except RecordError as err:
                raise _Reject(err.reason, str(err)) from None
            where = f"record {record['id']!r} (source {source_index}, #{record_index})"
            example = self._prepare(record, self.image_roots[source_index])
        except _Reject as reject:
            if self.config.bad_input == "raise":
                raise BadExampleError(f"{where}: {reject.reason}: {reject}") from None
            return {"rejected": reject.reason, "detail": f"{where}: {reject}"}
        example["example_mask"] = np.bool_(True)
        example["source_index"] = np.int32(source_index)
        example["record_index"] = np.int64(record_index)
        return example

    def _load_image(self, root, path, field):
        # Judged on the path as written; links the operator placed under the root are followed.
        if check_image_path(path):
            raise _Reject("path_escapes_root", f"{field} {path!r}")
        processor = self.processor
        try:
            return processor.load_image(resolve_image_path(root, path))
        except Exception as err:  # PIL raises many types on malformed files: each is the file's fault, counted
            raise _Reject(_image_problem(err), f"{field} {path!r}: {type(err).__name__}: {err}") from None

    def _item(self, root, text, image, field):
        if len(text) > self.config.max_text_chars:
            raise _Reject("text_too_long", f"{field} has {len(text)} characters > max_text_chars="
                                           f"{self.config.max_text_chars}")
        return {"text": text, "image": None if image is None else self._load_image(root, image, field)}

    def _prepare(self, record, root):
        notes = []
        query = self._item(root, record["qry_text"], record["qry_image"], "qry")
        positive = self._item(root, record["pos_text"], record["pos_image"], "pos")
        negatives = []
        for i, (text, image) in enumerate(zip(record["neg_text"], record["neg_image"])):
            if len(negatives) == self.config.num_negatives:
                break
            try:
                negatives.append(self._item(root, text, image, f"neg[{i}]"))
            except _Reject as reject:
                if not self.config.drop_bad_negatives:
                    raise
                notes.append(f"negative_dropped_{reject.reason}")
        try:
            arrays = self.processor([query, positive, *negatives])
        except BadItemError as err:
            raise _Reject("unprocessable_image", str(err)) from None
        if (arrays["attention_mask"].sum(axis=1) >= self.config.max_length).any():
            notes.append("truncated_text")
        k = self.config.num_negatives
        if negatives:
            # mmE5 pads a short negative list by repeating its last entry.
            neg_rows = [2 + min(i, len(negatives) - 1) for i in range(k)]
            mask = np.ones(k, dtype=bool)
        else:
            neg_rows, mask = [1] * k, np.zeros(k, dtype=bool)  # placeholders, masked out of the loss
            notes.append("no_negatives")
        # Only real tiles travel between processes; `CollateBuckets` rebuilds the zero-padded pixel_values.
        num_tiles = np.where(arrays["has_image"], arrays["aspect_ratio_mask"][:, 0].sum(axis=1), 0)
        tiles = np.concatenate([arrays["pixel_values"][i, 0, :n] for i, n in enumerate(num_tiles)])
        return {"items": {key: value for key, value in arrays.items() if key != "pixel_values"},
                "tiles": tiles, "num_tiles": num_tiles, "slots": np.array([0, 1, *neg_rows]),
                "negative_mask": mask, "notes": tuple(notes)}


def _pad_length(array, key, length, pad_id, axis):
    extra = length - array.shape[axis]
    if extra == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, extra)
    if key == "cross_attention_mask":  # an image stays visible to the end of the padded row (HF's rule)
        return np.pad(array, widths, mode="edge")
    return np.pad(array, widths, constant_values=pad_id if key == "input_ids" else 0)


def placeholder_example(processor, num_negatives):
    """The row a rejected example leaves behind: one empty text in every slot, masked out of the loss. It runs
    through the model like any row, so it must be an input the model handles (an all-padding row is not)."""
    arrays = processor([{"text": "", "image": None}])
    tiles = arrays["pixel_values"][0, 0, :0]
    return {"items": {key: value for key, value in arrays.items() if key != "pixel_values"}, "tiles": tiles,
            "num_tiles": np.zeros(1, np.int64), "slots": np.zeros(2 + num_negatives, np.int64),
            "negative_mask": np.zeros(num_negatives, bool), "example_mask": np.bool_(False),
            "source_index": np.int32(-1), "record_index": np.int64(-1)}


class CollateBuckets:
    """Stack examples into one batch padded to the smallest length bucket that holds its longest row, and pack
    their real images as `layout` says (see `mme5_jax.data.images`); a rejected example becomes `placeholder`.

    `row_offset` is the global batch row of this process's first row."""

    def __init__(self, buckets, pad_token_id, max_image_tiles, placeholder, layout=ImageLayout(), row_offset=0):
        self.buckets = buckets
        self.pad_token_id = pad_token_id
        self.max_image_tiles = max_image_tiles
        self.placeholder = placeholder
        self.layout = layout
        self.row_offset = row_offset

    def __call__(self, examples):
        examples = [self.placeholder if "rejected" in ex else ex for ex in examples]
        length = bucket_for(self.buckets, max(int(ex["items"]["attention_mask"].sum(axis=1).max()) for ex in examples))
        fields = {key: [] for key in examples[0]["items"] if key not in IMAGE_KEYS}
        images = []
        for ex in examples:
            for key in fields:
                value = ex["items"][key]
                value = _pad_length(value, key, length, self.pad_token_id, 1) if key in TEXT_KEYS else value
                fields[key].append(value[ex["slots"]])
            starts = np.concatenate([[0], np.cumsum(ex["num_tiles"])])
            images.append([(ex["tiles"][starts[item]:starts[item + 1]], int(ex["items"]["aspect_ratio_ids"][item, 0]))
                           if ex["num_tiles"][item] else None for item in ex["slots"]])
        stacked = {key: np.stack(values) for key, values in fields.items()}
        batch = {"query": {key: value[:, 0] for key, value in stacked.items()},
                 "positive": {key: value[:, 1] for key, value in stacked.items()},
                 "negatives": {key: value[:, 2:] for key, value in stacked.items()},
                 "row_index": self.row_offset + np.arange(len(examples))}
        for key in ROW_KEYS:
            batch[key] = np.stack([ex[key] for ex in examples])
        return pack_batch(batch, images, self.layout, self.placeholder["tiles"].shape[1:], self.max_image_tiles)


class CountRejectsIterDataset(grain.IterDataset):
    """Counts rejected examples and notes after prefetching; see `_CountRejectsIterator`."""

    def __iter__(self):
        return _CountRejectsIterator(self._parent.__iter__())

    def __str__(self):
        return "CountRejectsIterDataset"


class _CountRejectsIterator(grain.DatasetIterator):
    """Counts rejected examples and per-example notes by reason, in its checkpointable state. Rejected
    examples pass on as markers (see `CollateBuckets`), so every process consumes the same number of entries."""

    def __init__(self, parent):
        super().__init__(parent)
        self.rejected = Counter()
        self.notes = Counter()

    def __next__(self):
        element = next(self._parent)
        if "rejected" in element:
            if not self.rejected[element["rejected"]]:
                log.warning("rejected %s (%s): its row is masked out of the loss; further rejections of this kind "
                            "are only counted", element["detail"], element["rejected"])
            self.rejected[element["rejected"]] += 1
        else:
            self.notes.update(element.pop("notes"))
        return element

    def get_state(self):
        return {"parent": self._parent.get_state(), "rejected": dict(self.rejected), "notes": dict(self.notes)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.restore_counts(state)

    def restore_counts(self, counts):
        self.rejected = Counter(counts["rejected"])
        self.notes = Counter(counts["notes"])


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch, from `position` on in the global order (see module docstring):
    local entry s * rows + j is global entry position + s * rows * count + index * rows + j."""

    def __init__(self, parent, position, index, count, rows):
        super().__init__(parent)
        self._position, self._index, self._count, self._rows = position, index, count, rows
        self._length = max(0, len(parent) - position) // (rows * count) * rows

    def __len__(self):
        return self._length

    def _global_index(self, local):
        step, j = divmod(local, self._rows)
        return self._position + (step * self._count + self._index) * self._rows + j

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def __str__(self):
        return f"ProcessRows(position={self._position}, process {self._index} of {self._count}, rows={self._rows})"


def find_counter(iterator):
    """The reject-counting stage inside a pipeline iterator (for reports)."""
    stack = [iterator]
    while stack:
        current = stack.pop()
        if isinstance(current, _CountRejectsIterator):
            return current
        stack.extend(getattr(current, "_parents", ()))
    raise ValueError("no reject-counting stage in this iterator")


def problem_report(iterator):
    """{"rejected": {reason: n}, "notes": {reason: n}} so far, for logs and summaries."""
    counter = find_counter(iterator)
    return {"rejected": dict(sorted(counter.rejected.items())), "notes": dict(sorted(counter.notes.items()))}


def make_dataset(config, record_sets, process_index=0, process_count=1, position=0, layout=ImageLayout()):
    """The pipeline as a `grain.IterDataset` of host batches for one process, starting `position` entries into
    the global order (see module docstring). `layout` gives this process's batch shards and the step's GradCache
    chunks (`image_layout`); its `multiple` comes from `config.image_count_multiple`."""
    if config.bad_input not in POLICIES:
        raise ValueError(f"bad_input must be one of {POLICIES}, got {config.bad_input!r}")
    if config.global_batch_size % process_count:
        raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by "
                         f"process_count={process_count}")
    record_sets = [RecordSet(r) if isinstance(r, (str, os.PathLike)) else r for r in record_sets]
    rows = config.global_batch_size // process_count
    ds = open_mixture(record_sets, config.seed).dataset.repeat(config.num_epochs)
    ds = ProcessRows(ds, position, process_index, process_count, rows)
    ds = ds.map(PrepareExample(config, [r.resolved_image_root() for r in record_sets]))
    # Grain's default read-ahead (16 threads, 500 elements) would hold gigabytes of 448-px tiles per process.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer_size))
    if config.num_workers:
        _use_default_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer_size),
                            worker_init_fn=_WarmWorker(config))
    ds = CountRejectsIterDataset(ds)
    processor = load_processor(config.processor_dir, config.bos, config.max_length,
                               config.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS)
    collate = CollateBuckets(config.buckets(), processor.pad_token_id, processor.max_image_tiles,
                             placeholder_example(processor, config.num_negatives),
                             dataclasses.replace(layout, multiple=config.image_count_multiple), process_index * rows)
    return ds.batch(rows, drop_remainder=True, batch_fn=collate)


@dataclasses.dataclass(frozen=True)
class _WarmWorker:
    """Loads the processor once when a worker starts, before Grain's threads could import concurrently."""

    config: PipelineConfig

    def __call__(self, worker_index, worker_count):
        load_processor(self.config.processor_dir, self.config.bos, self.config.max_length,
                       self.config.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS)


def _use_default_absl_flags():
    """Grain's worker processes read absl flags; programs that do not run `absl.app` never parse them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def image_layout(mesh, global_batch_size, chunk_size=None, contrastive_group=None, rules=None, process_count=None):
    """How this process's rows meet the train step on `mesh`: its share of the batch shards, and the GradCache
    chunks. Rows are balanced over devices unless InfoNCE groups consecutive rows."""
    import jax

    from mme5_jax.sharding import batch_divisor

    process_count = jax.process_count() if process_count is None else process_count
    shards = batch_divisor(mesh, rules)
    if shards % process_count:
        raise ValueError(f"the mesh's {shards} batch shards do not split over {process_count} processes")
    chunks = 1 if chunk_size is None else global_batch_size // chunk_size
    return ImageLayout(shards=shards // process_count, chunks=chunks, balance=contrastive_group is None)


def to_global_batch(host_batch, mesh, pad_token_id, rules=None):
    """Host batches of all processes -> one global batch of `jax.Array`s, rows split as the rules table says.

    Processes may have picked different length buckets and image counts; they agree on the longest, the most
    images per device, and which slot groups hold any image (one tiny all-gather), so every process contributes
    the same shapes. Groups without an image anywhere run text-only."""
    import jax
    from jax.experimental import multihost_utils

    from mme5_jax.sharding import batch_divisor, batch_sharding

    sharding = batch_sharding(mesh, rules)
    shards = batch_divisor(mesh, rules) // jax.process_count()
    groups = [name for name, _ in group_slots(host_batch)]
    images = host_batch.get("images")
    if images is None:
        raise ValueError("the host batch has no packed `images`; make it with make_dataset or "
                         "mme5_jax.data.images.pack_batch")
    if images["row_id"].shape[1] != shards:
        raise ValueError(f"the host batch's images are packed for another mesh: {images['row_id'].shape[1]} batch "
                         f"shards, but this process holds {shards} (make_dataset(..., layout=image_layout(mesh, ...)))")
    shape = [host_batch["query"]["input_ids"].shape[-1], images["row_id"].shape[2]]
    shape += [int("image_index" in host_batch[g] and (host_batch[g]["image_index"] >= 0).any()) for g in groups]
    if jax.process_count() > 1:
        shape = np.max(multihost_utils.process_allgather(np.asarray(shape, np.int32)), axis=0).tolist()
    length, per_cell, has = shape[0], shape[1], dict(zip(groups, shape[2:]))
    if any(has.values()):
        host_batch = dict(host_batch, images=step_images(widen(images, per_cell)))
    host_batch = drop_unused_images(host_batch, has)

    def put(key, array, axis, lead=0):
        if key in TEXT_KEYS:
            array = _pad_length(array, key, length, pad_token_id, axis)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, lead) if lead else sharding, array)

    out = {}
    for group in groups:
        axis = 2 if group == "negatives" else 1
        out[group] = {key: put(key, value, axis) for key, value in host_batch[group].items()}
    for key in (*ROW_KEYS, "row_index"):
        out[key] = put(key, host_batch[key], None)
    if "images" in host_batch:
        out["images"] = {key: put(key, value, None, lead=1) for key, value in host_batch["images"].items()}
    return out
