"""Real images only: a batch's images packed per device and GradCache chunk, so that the vision tower encodes the
images that exist instead of one zero-padded image per slot.

The train step encodes a chunk's images in one vision call and hands each text row the states of its own image.
For that to move no data between devices, the images of the rows one device holds in one chunk (a *cell*) lie on
that device:

    images[c, s, m] = image m of cell (chunk c, shard s); a slot row's `image_index` is m, or -1 (no image)

and the step takes them as [c, s * M + m] over all batch shards of the mesh (`step_images`).

With R rows per process over S local batch shards and C chunks, local row r lies on shard r // (R / S) and in chunk
r % C (the step's strided chunks). M, the images per cell, is the fullest cell's count rounded up to `multiple`,
so batches of similar content reuse one compiled step.

A cell holds few rows (4 examples per chip and chunk in the zero-shot recipe on a v5p-64), so the fullest cell of
rows in their given order holds nearly every slot's image. `balanced_order` reorders a process's rows so that cells
carry even image counts; InfoNCE over the global batch does not depend on row order, and every row keeps its
`row_index` (its position in the global order), which seeds its dropout and orders the logged example ids.
"""
import dataclasses

import numpy as np

IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
# What a slot group carries for its images; a group without any image drops them and runs text-only.
IMAGE_SLOT_KEYS = ("image_index", "cross_attention_mask", "has_image")


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How the step will see a process's rows: `shards` batch shards of this process, `chunks` GradCache chunks
    (1 without GradCache). `balance` reorders rows to even out image counts per cell (not with InfoNCE groups of
    consecutive rows, whose membership depends on the order)."""

    shards: int = 1
    chunks: int = 1
    multiple: int = 1
    balance: bool = True

    def cells(self, rows: int) -> np.ndarray:
        """Cell id (chunk * shards + shard) of every local row."""
        if rows % (self.shards * self.chunks):
            raise ValueError(f"{rows} rows per process do not split into {self.shards} shards x {self.chunks} "
                             f"GradCache chunks")
        r = np.arange(rows)
        return (r % self.chunks) * self.shards + r // (rows // self.shards)

    def per_cell(self, count: int) -> int:
        return -(-count // self.multiple) * self.multiple if count else 0


def balanced_order(counts, layout: ImageLayout) -> np.ndarray:
    """A permutation of the rows (new position -> old row) that spreads their image counts evenly over the cells:
    largest first, each to the emptiest cell with room (ties to the row's own cell, then the lowest), then kept in
    their old order within a cell. Rows of equal counts stay where they are. Deterministic, so a resumed run builds
    the same batches."""
    counts = np.asarray(counts)
    cells = layout.cells(len(counts))
    n_cells = layout.shards * layout.chunks
    if not layout.balance or n_cells == 1 or len(set(counts.tolist())) <= 1:
        return np.arange(len(counts))
    room = np.full(n_cells, len(counts) // n_cells)
    load = np.zeros(n_cells, np.int64)
    assigned = np.empty(len(counts), np.int64)
    for row in np.argsort(-counts, kind="stable"):
        cell = min(np.flatnonzero(room), key=lambda c: (load[c], c != cells[row], c))
        assigned[row] = cell
        load[cell] += counts[row]
        room[cell] -= 1
    order = np.empty(len(counts), np.int64)
    for cell in range(n_cells):
        order[cells == cell] = np.flatnonzero(assigned == cell)
    return order


def pack(images, layout: ImageLayout, tile_shape, max_tiles, row_ids):
    """images[r][slot]: (tiles [n, C, H, W], aspect_ratio_id) or None, rows in the step's order ->
    (packed {pixel_values [chunks, shards, M, T, C, H, W], aspect_ratio_ids, aspect_ratio_mask, row_id
    [chunks, shards, M]}, image_index [R, slots]). M is 0 when no row has an image. `row_ids[r][slot]` seeds the
    image's adapter dropout (its text row's id); padding images are all-zero, as a text-only slot's always were."""
    rows, slots = len(images), len(images[0]) if images else 0
    cells = layout.cells(rows)
    index = np.full((rows, slots), -1, np.int32)
    members = [[] for _ in range(layout.shards * layout.chunks)]
    for r in range(rows):
        for slot in range(slots):
            if images[r][slot] is not None:
                index[r, slot] = len(members[cells[r]])
                members[cells[r]].append((r, slot))
    m = layout.per_cell(max(map(len, members)))
    n = (layout.chunks, layout.shards, m)
    packed = {"pixel_values": np.zeros((*n, max_tiles, *tile_shape), np.float32),
              "aspect_ratio_ids": np.zeros(n, np.int32),
              "aspect_ratio_mask": np.zeros((*n, max_tiles), np.int32),
              "row_id": np.zeros(n, np.int32)}
    for cell, entries in enumerate(members):
        chunk, shard = divmod(cell, layout.shards)
        for i, (r, slot) in enumerate(entries):
            tiles, aspect_ratio_id = images[r][slot]
            at = (chunk, shard, i)
            packed["pixel_values"][at][:len(tiles)] = tiles
            packed["aspect_ratio_ids"][at] = aspect_ratio_id
            packed["aspect_ratio_mask"][at][:len(tiles)] = 1
            packed["row_id"][at] = row_ids[r][slot]
    return packed, index


def widen(packed, per_cell: int):
    """Pads every cell of `packed` to `per_cell` images (processes agree on the largest M)."""
    return {key: np.pad(value, [(0, 0), (0, 0), (0, per_cell - value.shape[2])] + [(0, 0)] * (value.ndim - 3))
            for key, value in packed.items()}


def step_images(packed):
    """[chunks, shards, M, ...] -> the step's [chunks, shards * M, ...]."""
    return {key: value.reshape(value.shape[0], -1, *value.shape[3:]) for key, value in packed.items()}


def group_slots(batch):
    """The slot groups of a host batch as (name, slots per row)."""
    groups = [("query", 1), ("positive", 1)]
    if batch.get("negatives") is not None:
        groups.append(("negatives", batch["negatives"]["input_ids"].shape[1]))
    return groups


def pack_batch(batch, images, layout: ImageLayout, tile_shape, max_tiles):
    """A host batch without image arrays plus its images (`images[r][slot]`, slots query, positive, negatives) ->
    the batch the train step takes: rows reordered as `layout.balance` says, `images` packed, every slot group
    given its `image_index` ([B] or [B, k], -1 where the slot has no image) and the batch its `row_index`."""
    groups = group_slots(batch)
    b = batch["query"]["input_ids"].shape[0]
    width = sum(slots for _, slots in groups)
    order = balanced_order([sum(x is not None for x in row) for row in images], layout)
    row_index = np.asarray(batch.get("row_index", np.arange(b)))[order]
    row_ids = row_index[:, None] * width + np.arange(width)[None]
    packed, index = pack([images[i] for i in order], layout, tile_shape, max_tiles, row_ids)
    out = {key: np.asarray(value)[order] for key, value in batch.items()
           if key not in ("query", "positive", "negatives", "row_index")}
    out["row_index"] = row_index.astype(np.int32)
    offset = 0
    for name, slots in groups:
        group = {key: np.asarray(value)[order] for key, value in batch[name].items()}
        ix = index[:, offset:offset + slots]
        group["image_index"] = ix if name == "negatives" else ix[:, 0]
        out[name] = group
        offset += slots
    out["images"] = packed
    return out


def drop_unused_images(batch, with_images=None):
    """Image-free slot groups lose their image keys (they run text-only, skipping the cross-attention layers) and
    a batch without images loses `images`. `with_images` {group: bool} overrides what this batch shows (processes
    decide together)."""
    out = dict(batch)
    for name, _ in group_slots(batch):
        group = dict(batch[name])
        has = (group["image_index"] >= 0).any() if with_images is None else with_images[name]
        if not has:
            for key in IMAGE_SLOT_KEYS:
                group.pop(key, None)
        out[name] = group
    if not any("image_index" in out[name] for name, _ in group_slots(out)):
        out.pop("images", None)
    return out


def pack_rows(batch, layout: ImageLayout):
    """A host batch whose slot groups carry one image array per row (`pixel_values` [B, (k,) 1, T, C, H, W], as the
    processor and the `Embedder` lay them out) -> the packed batch the train step takes (see `pack_batch`)."""
    b = batch["query"]["input_ids"].shape[0]
    groups = group_slots(batch)
    width = sum(slots for _, slots in groups)
    images = [[None] * width for _ in range(b)]
    tile_shape, max_tiles, offset = None, 0, 0
    stripped = dict(batch)
    for name, slots in groups:
        arrays = batch[name]
        if "pixel_values" in arrays:
            pv = arrays["pixel_values"].reshape(b, slots, *arrays["pixel_values"].shape[-5:])[:, :, 0]
            ar = arrays["aspect_ratio_ids"].reshape(b, slots)
            arm = arrays["aspect_ratio_mask"].reshape(b, slots, -1)
            has = arrays["has_image"].reshape(b, slots) if "has_image" in arrays else np.ones((b, slots), bool)
            tile_shape, max_tiles = pv.shape[-3:], max(max_tiles, pv.shape[2])
            for r in range(b):
                for s in range(slots):
                    if has[r, s]:
                        images[r][offset + s] = (pv[r, s, :int(arm[r, s].sum())], int(ar[r, s]))
        stripped[name] = {key: value for key, value in arrays.items() if key not in IMAGE_KEYS}
        offset += slots
    if tile_shape is None:
        return dict(batch)
    batch = drop_unused_images(pack_batch(stripped, images, layout, tile_shape, max_tiles))
    if "images" in batch:
        batch["images"] = step_images(batch["images"])
    return batch
