"""Reading Hugging Face safetensors directories tensor by tensor, never the whole checkpoint.

`HFCheckpoint` addresses every shard's tensors by canonical key (either transformers key layout) through memory
maps; `UnmappedReader` reads the same with plain file reads for converters that walk every tensor once.
"""
import json
import os

import ml_dtypes
import numpy as np

from mme5_jax.config import ModelConfig
from mme5_jax.hf.layout import canonical_key
from mme5_jax.hf.weights import WeightError, check_keys, group_by_param, read_param, weight_map

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """A memory-mapped safetensors file: tensors are views read on demand, with the header checked up front."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise WeightError(f"{path}: truncated safetensors header ({n} bytes declared, file is {size})")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.header = header
        for key, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise WeightError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            end = info["data_offsets"][1]
            if self.data_start + end > size:
                raise WeightError(f"{path}: truncated: tensor {key!r} ends at byte {self.data_start + end}, "
                                  f"file has {size}")
        self._mmap = None

    def keys(self):
        return self.header.keys()

    def shape(self, key) -> tuple:
        return tuple(self.header[key]["shape"])

    def get(self, key) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[key]
        start, end = info["data_offsets"]
        raw = self._mmap[self.data_start + start: self.data_start + end]
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


class HFCheckpoint:
    """All safetensors shards of a Hugging Face directory, addressed by canonical key."""

    def __init__(self, path: str):
        self.path = path
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index_file):
            with open(index_file, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise WeightError(f"{path}: no *.safetensors files")
        missing = [n for n in files if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise WeightError(f"{path}: missing shard(s) listed in model.safetensors.index.json: {missing}")
        self.files = [SafetensorsFile(os.path.join(path, n)) for n in files]
        self.where = {}
        for f in self.files:
            for key in f.keys():
                self.where[canonical_key(key)] = (f, key)

    def keys(self):
        return self.where.keys()

    def shape(self, key) -> tuple:
        f, raw = self.where[key]
        return f.shape(raw)

    def get(self, key) -> np.ndarray:
        f, raw = self.where[key]
        return f.get(raw)


def load_hf_params(path: str, cfg: ModelConfig, dtype, place=None, progress: bool = True) -> dict:
    """Reads an HF Mllama directory into {param path: array}, one parameter at a time.

    `place(path, numpy_array)` moves each parameter to its device (and sharding) as soon as it is assembled, so
    host memory holds at most one stacked parameter.
    """
    from tqdm import tqdm

    ckpt = HFCheckpoint(path)
    table = weight_map(cfg)
    check_keys(table, ckpt.keys())
    groups = group_by_param(table)
    out = {}
    for param_path, items in tqdm(groups.items(), desc="loading weights", unit="param", disable=not progress):
        array = read_param(ckpt, items, dtype)
        out[param_path] = place(param_path, array) if place else array
    return out


def is_hf_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(n.endswith(".safetensors") for n in os.listdir(path))


class UnmappedReader:
    """An `HFCheckpoint` read with plain file reads instead of memory maps.

    Touched pages of a memory map stay resident (and count in RSS) until the map is closed, so a converter that
    walks every tensor through `HFCheckpoint.get` ends up with the whole checkpoint resident. Each `get` here returns
    a fresh array that is freed with its last reference.
    """

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt

    def keys(self):
        return self.ckpt.keys()

    def shape(self, key) -> tuple:
        return self.ckpt.shape(key)

    def dtype(self, key) -> str:
        f, raw = self.ckpt.where[key]
        return f.header[raw]["dtype"]

    def get(self, key) -> np.ndarray:
        f, raw = self.ckpt.where[key]
        info = f.header[raw]
        start, end = info["data_offsets"]
        out = np.empty(end - start, np.uint8)
        with open(f.path, "rb") as handle:
            handle.seek(f.data_start + start)
            if handle.readinto(memoryview(out)) != end - start:
                raise WeightError(f"{f.path}: truncated while reading tensor {raw!r}")
        return out.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
