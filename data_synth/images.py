"""The image pool: which images exist, which are duplicates, and which are each other's neighbours.

Image-side targets need a positive that resembles the query image and a hard negative that resembles it
less, so every kept image gets a ranked list of nearest neighbours from an embedding index. The index
is pluggable: precomputed `.npy` embeddings, our own `Embedder`, or (with a warning) a cheap colour and
layout descriptor that needs no model.
"""
import base64
import hashlib
import io
import logging
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data_synth.layout import IMAGE_TARGET_TEXT

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def list_images(root):
    """Relative POSIX paths of every image under `root`, sorted (the row order of a `.npy` index)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images: {root} is not a directory")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths


def export_tfds(spec, out_dir):
    """Write the images of a TFDS dataset (``tfds:NAME[:SPLIT]``) as PNG files, once, and return the folder."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError("--images tfds:... needs the tfds extra: pip install 'mme5-jax[tfds]'") from err
    name, _, split = spec[len("tfds:"):].partition(":")
    folder = Path(out_dir) / "images"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dataset = tfds.data_source(name, split=split or "train")
    for i, example in enumerate(dataset):
        if "image" not in example:
            raise KeyError(f"tfds dataset {name!r} example #{i} has no 'image' feature")
        Image.fromarray(np.asarray(example["image"])).save(folder / f"{i:08d}.png")
    done.touch()
    return folder


def builtin_descriptor(path):
    """Colour and layout statistics: an 8x8 RGB thumbnail plus a 4x4x4 colour histogram."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        thumb = np.asarray(rgb.resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel() / 255.0
        small = np.asarray(rgb.resize((32, 32), Image.BILINEAR)) // 64
    bins = small[..., 0].astype(np.int64) * 16 + small[..., 1] * 4 + small[..., 2]
    hist = np.bincount(bins.ravel(), minlength=64).astype(np.float32) / bins.size
    return np.concatenate([thumb, 4.0 * hist])


def _normalise(vectors):
    vectors = vectors - vectors.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def nearest_neighbours(embeddings, k, max_block_entries=2**25):
    """Indices and similarities of the k most cosine-similar other rows, best first.

    Rows are scored in blocks of at most `max_block_entries` similarities, so memory stays bounded for
    pools of any size.
    """
    n = len(embeddings)
    k = min(k, n - 1)
    block = max(1, max_block_entries // n)
    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        scores = embeddings[start:start + block] @ embeddings.T
        rows = np.arange(scores.shape[0])
        scores[rows, start + rows] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.argsort(-scores, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)
        indices[start:start + block] = np.take_along_axis(top, order, axis=1)
        sims[start:start + block] = np.take_along_axis(top_scores, order, axis=1)
    return indices, sims


class ImagePool:
    """Deduplicated images with ranked neighbours; `paths[i]` is relative to `root`."""

    def __init__(self, root, paths, embeddings, num_neighbours, dedup_threshold):
        self.root = Path(root)
        keep = self._distinct(paths, embeddings, dedup_threshold)
        self.duplicates = len(paths) - len(keep)
        if self.duplicates:
            log.info("image pool: dropped %d duplicate images of %d", self.duplicates, len(paths))
        self.paths = [paths[i] for i in keep]
        self.embeddings = _normalise(np.asarray(embeddings, dtype=np.float32)[keep])
        if len(self.paths) < 2:
            raise ValueError(f"--images: only {len(self.paths)} distinct image(s) under {root}; need at least 2")
        self.neighbours, self.similarities = nearest_neighbours(self.embeddings, num_neighbours)

    def _distinct(self, paths, embeddings, threshold):
        """Indices of the images kept: byte-identical files go first, then near-identical embeddings."""
        seen, candidates = set(), []
        for i, rel in enumerate(paths):
            digest = hashlib.sha1((self.root / rel).read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                candidates.append(i)
        if len(candidates) < 2:
            return candidates
        vectors = _normalise(np.asarray(embeddings, dtype=np.float32)[candidates])
        neighbours, sims = nearest_neighbours(vectors, 1)
        dropped = {row for row in range(len(candidates))
                   if sims[row, 0] >= threshold and neighbours[row, 0] < row}
        return [c for row, c in enumerate(candidates) if row not in dropped]

    @classmethod
    def build(cls, root, *, index=None, embedder=None, cache_dir=None, num_neighbours=8, dedup_threshold=0.999):
        """Load the pool under `root` with embeddings from `index` (.npy), `embedder` (a model path) or built-in."""
        paths = list_images(root)
        if index is not None:
            embeddings = np.load(index)
            if embeddings.ndim != 2 or len(embeddings) != len(paths):
                raise ValueError(f"--image-index {index}: expected a [{len(paths)}, D] array (one row per image "
                                 f"under {root}, sorted by relative path), got shape {embeddings.shape}")
        else:
            embeddings = _cached_embeddings(root, paths, embedder, cache_dir)
        return cls(root, paths, embeddings, num_neighbours, dedup_threshold)


def _cached_embeddings(root, paths, embedder, cache_dir):
    kind = f"embedder:{embedder}" if embedder else "builtin"
    key = hashlib.sha256("\n".join([kind, str(Path(root).resolve()), *paths]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"image_index-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    if embedder:
        from mme5_jax import Embedder

        model = Embedder.from_pretrained(embedder)
        embeddings = model.encode([{"text": IMAGE_TARGET_TEXT, "image": str(Path(root) / p)}
                                   for p in paths])
    else:
        log.warning("no image index given (--image-index or --embedder): pairing images by colour/layout "
                    "statistics, which finds look-alikes, not semantic neighbours")
        embeddings = np.stack([builtin_descriptor(Path(root) / p) for p in paths])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, embeddings)
        tmp.replace(cache)
    return embeddings


@lru_cache(maxsize=4096)
def encode_image(path, max_side):
    """JPEG data URL of the image scaled to fit `max_side`, and its (width, height)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    scale = min(1.0, max_side / max(rgb.size))
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), rgb.size


def image_tokens(size, detail):
    """Tokens GPT-4o bills for one image: 85 at low detail, 85 + 170 per 512-px tile at high detail."""
    if detail == "low":
        return 85
    width, height = size
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)
