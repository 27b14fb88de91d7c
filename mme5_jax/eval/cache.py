"""On-disk embedding cache keyed by (model fingerprint, item), so that a rerun encodes only new items.

The model fingerprint hashes the content of every file in the model directory (weights, config, tokenizer,
image processor) with the encoding settings, so any change to what determines an embedding starts a new cache.
File digests are memoised by (path, size, mtime), so a 20 GB checkpoint is read once, not on every run.
An item's key is its text and its image file's path, size and mtime.

Vectors are stored in append-only shards (`<id>.vecs.npy` then `<id>.keys.npy`, each renamed into place), one
per encoded chunk: an interrupted run keeps everything up to its last chunk, and concurrent runs never collide.
"""
import hashlib
import json
import os
import uuid

import numpy as np
from tqdm import tqdm

# Bump when the way an embedding is computed from the same files changes (processing, pooling).
CACHE_FORMAT = 2
_DIGEST_MEMO = "file_digests.json"


def default_cache_dir() -> str:
    root = os.environ.get("MME5_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mme5_jax"))
    return os.path.join(root, "eval_embeddings")


def _atomic_write_json(path: str, value) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def model_fingerprint(model_path: str, settings: dict, cache_dir: str, progress: bool = True) -> str:
    """A digest of every file under `model_path` (by content) and of `settings` (dtype, BOS mode, max length)."""
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model directory {model_path} does not exist")
    files = sorted(os.path.relpath(os.path.join(d, f), model_path)
                   for d, _, names in os.walk(model_path) for f in names)
    os.makedirs(cache_dir, exist_ok=True)
    memo_path = os.path.join(cache_dir, _DIGEST_MEMO)
    try:
        with open(memo_path, encoding="utf-8") as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    stamps = {}
    for rel in files:
        path = os.path.abspath(os.path.join(model_path, rel))
        st = os.stat(path)
        stamps[rel] = (path, f"{path}|{st.st_size}|{st.st_mtime_ns}", st.st_size)
    todo = [rel for rel, (_, stamp, _) in stamps.items() if stamp not in memo]
    total = sum(stamps[rel][2] for rel in todo)
    show = progress and total >= 2**30
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing model", disable=not show) as bar:
        for rel in todo:
            path, stamp, size = stamps[rel]
            with open(path, "rb") as f:
                memo[stamp] = hashlib.file_digest(f, "blake2b").hexdigest()
            bar.update(size)
    if todo:
        _atomic_write_json(memo_path, memo)
    description = {"format": CACHE_FORMAT, "settings": settings,
                   "files": [[rel, memo[stamps[rel][1]]] for rel in files]}
    return hashlib.blake2b(json.dumps(description, sort_keys=True).encode(), digest_size=16).hexdigest()


def item_key(item) -> str:
    """Key of a (text, image path | None) item; the image is identified by its path, size and mtime."""
    text, image = item
    if image is None:
        stamp = None
    elif isinstance(image, str):
        st = os.stat(image)
        stamp = [os.path.abspath(image), st.st_size, st.st_mtime_ns]
    else:
        raise TypeError(f"cached items need an image path, got {type(image).__name__}")
    return hashlib.blake2b(json.dumps([text, stamp]).encode(), digest_size=16).hexdigest()


class EmbeddingCache:
    """The embeddings of one model fingerprint (`get`, `put`) and the items its encoder refused (`rejected`)."""

    def __init__(self, cache_dir: str, fingerprint: str):
        self.dir = os.path.join(cache_dir, fingerprint)
        os.makedirs(self.dir, exist_ok=True)
        self._shards, self._where, self._rejected = [], {}, {}
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".keys.npy"):
                self._load(name[: -len(".keys.npy")])
            elif name.endswith(".rejected.json"):
                with open(os.path.join(self.dir, name), encoding="utf-8") as f:
                    self._rejected.update(json.load(f))

    def _load(self, shard: str) -> None:
        keys = np.load(os.path.join(self.dir, shard + ".keys.npy"))
        vectors = np.load(os.path.join(self.dir, shard + ".vecs.npy"), mmap_mode="r")
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"cache shard {shard} in {self.dir} is inconsistent: {len(keys)} keys, vectors "
                             f"{vectors.shape}; delete it to re-encode those items")
        index = len(self._shards)
        self._shards.append(vectors)
        self._where.update((str(k), (index, row)) for row, k in enumerate(keys))

    def __len__(self) -> int:
        return len(self._where)

    def get(self, keys) -> tuple[np.ndarray, np.ndarray | None]:
        found = np.array([k in self._where for k in keys], bool)
        if not found.any():
            return found, None
        dim = self._shards[0].shape[1]
        vectors = np.zeros((len(keys), dim), np.float32)
        for i in np.flatnonzero(found):
            shard, row = self._where[keys[i]]
            vectors[i] = self._shards[shard][row]
        return found, vectors

    def rejected(self, keys) -> dict[int, str]:
        """{position: reason} of the keys whose items the encoder refused before (e.g. an undecodable image)."""
        return {i: self._rejected[k] for i, k in enumerate(keys) if k in self._rejected}

    def reject(self, reasons: dict[str, str]) -> None:
        """Remembers refused items, so that a rerun neither retries them nor loads the model for them."""
        if reasons:
            _atomic_write_json(os.path.join(self.dir, f"{uuid.uuid4().hex}.rejected.json"), reasons)
            self._rejected.update(reasons)

    def put(self, keys, vectors: np.ndarray) -> None:
        if not len(keys):
            return
        vectors = np.asarray(vectors, np.float32)
        if self._shards and vectors.shape[1] != self._shards[0].shape[1]:
            raise ValueError(f"embedding dimension {vectors.shape[1]} differs from the cache's "
                             f"{self._shards[0].shape[1]} in {self.dir}")
        shard = uuid.uuid4().hex
        for suffix, array in ((".vecs.npy", vectors), (".keys.npy", np.array(keys, dtype="U32"))):
            path = os.path.join(self.dir, shard + suffix)
            with open(path + ".tmp", "wb") as f:
                np.save(f, array)
            os.replace(path + ".tmp", path)
        self._load(shard)
