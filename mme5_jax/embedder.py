"""`Embedder`: raw (text, image) items -> mmE5 embeddings, identical to HF `MllamaProcessor` + model + pooling.

Items are grouped by modality and padded into static (batch, length) buckets, so a new batch reuses a compiled
function instead of recompiling. Text-only groups skip the vision tower and cross-attention layers altogether,
exactly as Hugging Face does for a batch without images.

With a mesh, every process of a multi-process job encodes the same items: each places its own shards of every
batch and gets all the embeddings back, so the processes make the same calls in the same order (the trainer's
held-out evaluation relies on it).
"""
import contextlib
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from mme5_jax.base_checkpoint import load_base_params
from mme5_jax.config import ModelConfig
from mme5_jax.hf.reader import is_hf_checkpoint, load_hf_params
from mme5_jax.model import DTYPES
from mme5_jax.model.mllama import abstract_model, model_from_params, resolve_dtype
from mme5_jax.processing import (BOS_MODES, BadItemError, MllamaInputProcessor, bucket_for, length_buckets,
                                 model_string)
from mme5_jax.sharding import batch_divisor, batch_sharding, state_shardings

IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask", "has_image")


def load_params(path: str, cfg: ModelConfig, dtype, place=None, progress=True, mesh=None) -> dict:
    """Base weights from a Hugging Face directory or one of our converted checkpoints.

    With `mesh`, a converted checkpoint is restored by Orbax straight onto its shardings (no host copy)."""
    if is_hf_checkpoint(path):
        return load_hf_params(path, cfg, dtype, place=place, progress=progress)
    return load_base_params(path, cfg, dtype, place=place, mesh=mesh, progress=progress)


class Embedder:
    def __init__(self, model, processor: MllamaInputProcessor, *, batch_size: int = 8, mesh=None):
        self.model = model
        self.processor = processor
        self.mesh = mesh
        self.buckets = length_buckets(processor.max_length)
        divisor = batch_divisor(mesh) if mesh is not None else 1
        self.batch_size = -(-batch_size // divisor) * divisor
        self.dim = model.cfg.text.hidden_size
        self._graphdef, self._state = nnx.split(model)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", *, bos: str = "processor", max_length: int = 256,
                        batch_size: int = 8, mesh=None, progress: bool = False) -> "Embedder":
        """Loads a Hugging Face Mllama directory or our converted checkpoint directory.

        `bos` selects the BOS layout (see `MllamaInputProcessor`): "processor" follows the installed
        transformers, "single" reproduces the transformers-4.45 era tokenisation.
        """
        cfg = ModelConfig.from_pretrained(path)
        np_dtype = np.dtype(resolve_dtype(dtype))
        if mesh is not None:
            shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(abstract_model(cfg, dtype)), mesh)))
            def place(p, a):
                return jax.device_put(a, shardings[p])
        else:
            def place(p, a):
                return jnp.asarray(a)
        params = load_params(path, cfg, np_dtype, place=place, progress=progress, mesh=mesh)
        model = model_from_params(cfg, params, dtype)
        processor = MllamaInputProcessor.from_pretrained(path, bos=bos, max_length=max_length)
        return cls(model, processor, batch_size=batch_size, mesh=mesh)

    def encode(self, items, batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        """[N, D] float32 L2-normalised embeddings of `{"text": str, "image": None | PIL image | path}` items."""
        items = list(items)
        if not items:
            return np.zeros((0, self.dim), np.float32)
        batch_size = batch_size or self.batch_size
        groups = self._plan(items)
        out = np.zeros((len(items), self.dim), np.float32)
        chunks = [(key, idx[i:i + batch_size]) for key, idx in groups.items() for i in range(0, len(idx), batch_size)]
        show = progress if progress is not None else len(items) > 4 * batch_size
        for (has_image, length), index in tqdm(chunks, desc="encoding", unit="batch", disable=not show):
            rows = list(index) + [index[-1]] * (batch_size - len(index))
            try:
                arrays = self.processor([items[i] for i in rows], pad_to=length)
            except BadItemError as err:
                raise BadItemError(rows[err.index], str(err).split(": ", 1)[1]) from err
            if not has_image:
                arrays = {k: v for k, v in arrays.items() if k not in IMAGE_KEYS}
            with self._mesh_context():
                out[index] = _to_host(_embed(self._graphdef, self._state, self._put(arrays)))[: len(index)]
        return out

    def _plan(self, items) -> dict:
        """Item indices grouped by (has image, length bucket), each group in input order."""
        strings = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise BadItemError(i, f"expected a dict with a str 'text' and an optional 'image', got "
                                      f"{type(item).__name__}")
            strings.append(item["text"])
        has_image = [item.get("image") is not None for item in items]
        lengths = [len(ids) for ids in self.processor.tokenize([model_string(s, h)
                                                                for s, h in zip(strings, has_image)])]
        groups = {}
        for i, (h, n) in enumerate(zip(has_image, lengths)):
            groups.setdefault((h, bucket_for(self.buckets, n)), []).append(i)
        return {k: np.array(v) for k, v in sorted(groups.items())}

    def _mesh_context(self):
        """The mesh, in context while tracing, so that attention keeps each device's rows on it."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _put(self, arrays: dict) -> dict:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        sharding = batch_sharding(self.mesh)
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                for k, v in arrays.items()}


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, batch):
    """Compiled once per graph and input shapes, shared by every `Embedder` of the same model structure (the
    trainer builds one per evaluation)."""
    return nnx.merge(graphdef, state).embed(batch)


def _to_host(embeddings) -> np.ndarray:
    """All rows on every process, gathered from the other processes' devices where they are not addressable."""
    if embeddings.is_fully_addressable:
        return np.asarray(embeddings)
    return multihost_utils.process_allgather(embeddings, tiled=True)


# --- `mme5 embed` -------------------------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--model", required=True, help="Hugging Face Mllama directory or converted checkpoint")
    parser.add_argument("--input", required=True, help='JSONL, one {"text": ..., "image": path-or-null} per line')
    parser.add_argument("--output", required=True, help="where to write the [N, D] float32 .npy")
    parser.add_argument("--image-root", default=None,
                        help="base for relative image paths (default: the input's folder)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bos", default="processor", choices=BOS_MODES,
                        help="BOS layout: follow the installed processor, or the single-BOS transformers-4.45 layout")


def read_items(path: str, image_root: str | None) -> list[dict]:
    root = image_root or os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {err}") from err
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise ValueError(f"{path}:{line_no}: expected an object with a string 'text'")
            image = item.get("image")
            if image is not None and not isinstance(image, str):
                raise ValueError(f"{path}:{line_no}: 'image' must be a path or null")
            items.append({"text": item["text"], "image": os.path.join(root, image) if image else None})
    return items


def run(args):
    items = read_items(args.input, args.image_root)
    embedder = Embedder.from_pretrained(args.model, args.dtype, bos=args.bos, max_length=args.max_length,
                                        batch_size=args.batch_size, progress=True)
    vectors = embedder.encode(items, progress=True)
    tmp = args.output + ".tmp.npy"
    np.save(tmp, vectors)
    os.replace(tmp, args.output)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.output}")
