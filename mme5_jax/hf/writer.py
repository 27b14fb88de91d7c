"""Writing Hugging Face Mllama directories from a stream of tensors.

`export_hf(out_dir, cfg, tensors, ...)` takes any iterator of (HF key, numpy array) and appends them to size-capped
safetensors shards, so neither `mme5 convert jax-to-hf` (tensors of a base checkpoint, `base_hf_tensors`) nor the
merged-LoRA export of a training run (tensors of the live model) ever holds the whole model on the host.
"""
import json
import os

import numpy as np
from tqdm import tqdm

from mme5_jax import base_checkpoint
from mme5_jax.config import ModelConfig
from mme5_jax.hf.layout import installed_key
from mme5_jax.hf.reader import SAFETENSORS_DTYPES, HFCheckpoint, is_hf_checkpoint
from mme5_jax.hf.weights import LM_HEAD_KEY, WeightError, group_by_param, param_to_hf, weight_map

DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9
SAFETENSORS_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def export_hf(out_dir: str, cfg: ModelConfig, tensors, *, dtype: str, extra_files_from: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, layout: str = "installed",
              progress_bytes: int | None = None) -> str:
    """An HF model directory from (HF key, numpy array) pairs: shards + index, config, generation config and the
    tokenizer / processor files of `extra_files_from`. Atomic, like every converter output.

    `layout` is the config.json layout ("installed", "5" or "4.46"); the keys are written as given.
    """
    with base_checkpoint.AtomicDir(out_dir) as tmp, tqdm(total=progress_bytes or 0, unit="B", unit_scale=True,
                                                         desc="jax-to-hf", disable=progress_bytes is None) as bar:
        shards = SafetensorsShards(tmp, max_shard_bytes)
        for key, array in tensors:
            shards.add(key, array)
            bar.update(array.nbytes)
        shards.close()
        config = cfg.to_hf_dict(layout)
        config["torch_dtype" if "rope_scaling" in config["text_config"] else "dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        copied = base_checkpoint.copy_side_files(extra_files_from, tmp) if extra_files_from else []
        if "generation_config.json" not in copied:
            t = cfg.text
            eos = list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id
            with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(dict(bos_token_id=t.bos_token_id, eos_token_id=eos, pad_token_id=t.pad_token_id), f,
                          indent=2)
    return out_dir


def base_hf_tensors(ckpt_dir: str, cfg: ModelConfig, layout: str = "installed"):
    """(HF key in `layout`, numpy array) for every tensor of a base checkpoint, a few parameters at a time."""
    groups = {base_checkpoint.param_key(path): items for path, items in group_by_param(weight_map(cfg)).items()}
    for key, array in base_checkpoint.iter_stored(ckpt_dir, list(groups)):
        yield from param_to_hf(groups[key], array, layout)
    yield from base_extras(ckpt_dir, layout)


def base_extras(base: str, layout: str):
    """HF tensors the embedding model does not hold (the LM head), passed through from base weights in either
    format, so an exported model loads with no missing keys."""
    if is_hf_checkpoint(base):
        ckpt = HFCheckpoint(base)
        if LM_HEAD_KEY in ckpt.keys():
            yield installed_key(LM_HEAD_KEY, layout), np.asarray(ckpt.get(LM_HEAD_KEY))
        return
    extras = list(base_checkpoint.read_metadata(base)["extras"])
    for key, array in base_checkpoint.iter_stored(base, extras, group="extras"):
        yield installed_key(key, layout), array


class SafetensorsShards:
    """Appends tensors to `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes` each.

    A shard's header must precede its data and list every tensor, so data goes to a scratch file first and is
    copied behind the header when the shard closes; shards are renamed once their total count is known. A tensor
    larger than the limit gets a shard of its own, as in transformers.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.weight_map, self.total_bytes, self.shard_files = {}, 0, []
        self._header, self._data, self._offset = {}, None, 0

    def add(self, key: str, array: np.ndarray):
        if key in self.weight_map or key in self._header:
            raise WeightError(f"tensor {key!r} written twice")
        dtype = np.dtype(array.dtype)
        if dtype not in SAFETENSORS_NAMES:
            raise WeightError(f"tensor {key!r} has dtype {dtype.name}, which safetensors cannot store")
        if self._header and self._offset + array.nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._data is None:
            self._data = open(os.path.join(self.out_dir, ".shard.data"), "w+b")
        self._data.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._header[key] = dict(dtype=SAFETENSORS_NAMES[dtype], shape=list(array.shape),
                                 data_offsets=[self._offset, self._offset + array.nbytes])
        self._offset += array.nbytes

    def _close_shard(self):
        name = f".shard-{len(self.shard_files) + 1:05d}.safetensors"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(os.path.join(self.out_dir, name), "wb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            out.flush()
            self._data.flush()
            copied = 0
            while copied < self._offset:  # in-kernel copy: the data never passes through Python
                copied += os.sendfile(out.fileno(), self._data.fileno(), copied, self._offset - copied)
        self._data.close()
        os.remove(self._data.name)
        self.shard_files.append((name, list(self._header)))
        self.total_bytes += self._offset
        self._header, self._data, self._offset = {}, None, 0

    def close(self):
        if self._header:
            self._close_shard()
        if not self.shard_files:
            raise WeightError("no tensors to write")
        count = len(self.shard_files)
        for i, (scratch, keys) in enumerate(self.shard_files, 1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.rename(os.path.join(self.out_dir, scratch), os.path.join(self.out_dir, final))
            self.weight_map.update({k: final for k in keys})
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}, f, indent=2)
