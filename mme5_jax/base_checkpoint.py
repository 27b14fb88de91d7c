"""Our base-checkpoint format: frozen Mllama weights in Orbax, plus what it takes to use them on their own.
Training checkpoints (adapters, optimizer state) are the trainer's, not this format.

A checkpoint directory holds
- `weights/`: an Orbax PyTree checkpoint `{"params": {dotted param path: array}, "extras": {hf key: array}}`.
  `extras` keeps HF tensors the model does not use (`lm_head.weight`) so HF -> ours -> HF is bit-exact.
- `mme5_checkpoint.json`: format version, model config (HF layout), source, dtype and every tensor's shape/dtype.
- `config.json` and copies of the tokenizer / processor files, so `ModelConfig.from_pretrained`,
  `MllamaInputProcessor.from_pretrained` and `Embedder.from_pretrained` take the directory as it is.

Weights are written in batches through Orbax's partial save, so a converter never holds the whole model, and
written into a temporary sibling directory that is renamed into place only when complete. Restoring passes
abstract arrays that carry the target shardings, so each process reads only the shards it owns on any mesh.
"""
import json
import os
import shutil

import jax
import numpy as np
from flax import nnx

from mme5_jax.config import ModelConfig
from mme5_jax.hf.weights import WeightError
from mme5_jax.model import DTYPES
from mme5_jax.processing import portable_processor_files
from mme5_jax.runtime import sync as _sync

FORMAT = "mme5-base-checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "mme5_checkpoint.json"
WEIGHTS_DIR = "weights"
PYTREE_DIR = "state"  # where Orbax's partial save puts the PyTree inside WEIGHTS_DIR
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "preprocessor_config.json", "processor_config.json", "generation_config.json",
              "chat_template.json", "chat_template.jinja")
WEIGHT_DTYPES = {name: np.dtype(getattr(jax.numpy, name)) for name in DTYPES}


def param_key(path: tuple) -> str:
    return ".".join(map(str, path))


def as_dtype(dtype) -> np.dtype:
    """float32 or bfloat16, given by name or as a dtype; anything else is an error."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in WEIGHT_DTYPES:
        raise WeightError(f"unsupported weight dtype {name!r}; choose from {sorted(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[name]


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def side_files(src_dir: str) -> list[str]:
    """Tokenizer / processor / generation files of a model directory (copied so directories stand alone)."""
    return sorted(n for n in os.listdir(src_dir)
                  if n in SIDE_FILES or (n.startswith("chat_template") and os.path.isfile(os.path.join(src_dir, n))))


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the side files; the processor configs land in the layout transformers 4.46 and 5.x both load."""
    names = side_files(src_dir)
    for name in names:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    rewritten = portable_processor_files(src_dir)
    for name, content in rewritten.items():
        with open(os.path.join(dst_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return sorted(set(names) | set(rewritten))


# --- writing ------------------------------------------------------------------------------------------------------
class AtomicDir:
    """A temporary sibling of `out_dir`, renamed onto it on success and removed on any error.

    The name is deterministic, so every process of a multi-host job agrees on it; process 0 alone creates,
    renames and removes it.
    """

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        parent, name = os.path.split(self.out_dir)
        self.path = os.path.join(parent, f".{name}.incomplete")
        self.primary = jax.process_index() == 0

    def __enter__(self) -> str:
        if os.path.exists(self.out_dir):
            raise FileExistsError(f"output directory {self.out_dir!r} already exists; remove it or pick another")
        if self.primary:
            if os.path.exists(self.path):  # left by an interrupted run
                shutil.rmtree(self.path)
            os.makedirs(self.path)
        _sync("mme5-atomic-dir-created")
        return self.path

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            _sync("mme5-atomic-dir-written")
            if self.primary:
                os.rename(self.path, self.out_dir)
            _sync("mme5-atomic-dir-renamed")  # no process reads OUT_DIR before it exists
        elif self.primary:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


class WeightsWriter:
    """Streams parameters into the Orbax PyTree of a checkpoint being written.

    Arrays are buffered until `flush_bytes` accumulate, then saved with one partial save and dropped, so host memory
    stays bounded by about twice the buffer (Orbax stages a copy) plus the parameter being assembled. Values may be
    numpy arrays (written by process 0) or sharded `jax.Array`s (each process writes the shards it owns).
    Compression is off: trained weights barely compress, and zstd makes writing about three times slower.
    """

    def __init__(self, ckpt_dir: str, flush_bytes: int = 128 << 20):
        from orbax.checkpoint.experimental import v1

        self.weights_dir = os.path.join(ckpt_dir, WEIGHTS_DIR)
        self.flush_bytes = flush_bytes
        self.context = v1.Context()
        self.context.array.saving.use_compression = False
        self.entries = {}   # "params"/"extras" -> {key: {"shape", "dtype"}}
        self._pending, self._pending_bytes = {}, 0

    def add(self, group: str, key: str, array):
        if key in self.entries.get(group, {}):
            raise WeightError(f"{group} tensor {key!r} written twice")
        self.entries.setdefault(group, {})[key] = {"shape": list(array.shape), "dtype": np.dtype(array.dtype).name}
        self._pending.setdefault(group, {})[key] = array
        self._pending_bytes += array.size * np.dtype(array.dtype).itemsize
        if self._pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self):
        if self._pending:
            from orbax.checkpoint.experimental.v1 import partial

            with self.context:
                partial.save(self.weights_dir, self._pending)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict:
        from orbax.checkpoint.experimental.v1 import partial

        self.flush()
        with self.context:
            partial.finalize(self.weights_dir)
        return self.entries


def write_metadata(ckpt_dir: str, cfg: ModelConfig, dtype: str, source: dict, entries: dict):
    """`mme5_checkpoint.json` and `config.json` (process 0 only; other processes share the filesystem)."""
    if jax.process_index() != 0:
        return
    config = cfg.to_hf_dict("installed")
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, dtype=dtype, source=source, config=config,
                params=entries.get("params", {}), extras=entries.get("extras", {}))
    with open(os.path.join(ckpt_dir, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(ckpt_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(config, dtype=dtype), f, indent=2)


# --- reading ------------------------------------------------------------------------------------------------------
def read_metadata(path: str) -> dict:
    meta_file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_file):
        raise WeightError(f"{path!r} is neither a Hugging Face directory (*.safetensors) nor an mme5 checkpoint "
                          f"(no {METADATA_FILE})")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise WeightError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                          f"this code reads {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def abstract_params(cfg: ModelConfig, dtype="float32", mesh=None) -> dict:
    """{param path: ShapeDtypeStruct}, carrying the mesh sharding each parameter's logical axes ask for."""
    from mme5_jax.model.mllama import abstract_model

    dtype = as_dtype(dtype)
    state = nnx.state(abstract_model(cfg, dtype.name))
    flat = dict(nnx.to_flat_state(state))
    shardings = {}
    if mesh is not None:
        from mme5_jax.sharding import state_shardings

        shardings = dict(nnx.to_flat_state(state_shardings(state, mesh)))
    return {path: jax.ShapeDtypeStruct(v.shape, dtype, sharding=shardings.get(path))
            for path, v in flat.items()}


def check_params(path: str, meta: dict, expected: dict):
    """The stored parameter list must match the model config exactly (names and shapes)."""
    stored = meta["params"]
    wanted = {param_key(p): list(s.shape) for p, s in expected.items()}
    missing = sorted(set(wanted) - set(stored))
    unknown = sorted(set(stored) - set(wanted))
    wrong = [f"{k} has shape {tuple(stored[k]['shape'])}, the config expects {tuple(wanted[k])}"
             for k in sorted(set(wanted) & set(stored)) if stored[k]["shape"] != wanted[k]]
    problems = ([f"missing parameters: {', '.join(missing[:8])}"] if missing else []) + \
               ([f"unexpected parameters: {', '.join(unknown[:8])}"] if unknown else []) + wrong[:8]
    if problems:
        raise WeightError(f"{path}: checkpoint does not match the model config: " + "; ".join(problems))


def _restore(path: str, item: dict, restore_args: dict) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(  # Orbax refuses relative paths
        os.path.abspath(os.path.join(path, WEIGHTS_DIR, PYTREE_DIR)),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))


def restore_sharded(path: str, cfg: ModelConfig, dtype, mesh) -> dict:
    """{param path: jax.Array} restored straight onto `mesh` (each process reads only its own shards)."""
    import orbax.checkpoint as ocp

    meta = read_metadata(path)
    abstract = abstract_params(cfg, dtype, mesh)
    check_params(path, meta, abstract)
    item = {"params": {param_key(p): s for p, s in abstract.items()}}
    restored = _restore(path, item, ocp.checkpoint_utils.construct_restore_args(item))["params"]
    return {p: restored[param_key(p)] for p in abstract}


def iter_stored(path: str, keys, group: str = "params", dtype=None, batch_bytes: int = 256 << 20):
    """Yields (key, numpy array) for `keys` of a stored group, restoring about `batch_bytes` at a time."""
    import orbax.checkpoint as ocp

    meta = read_metadata(path)
    entries = meta[group]
    batch, size = [], 0
    for i, key in enumerate(keys):
        if key not in entries:
            raise WeightError(f"{path}: no {group} tensor {key!r}")
        info = entries[key]
        batch.append(key)
        size += int(np.prod(info["shape"])) * (as_dtype(dtype) if dtype else np_dtype(info["dtype"])).itemsize
        if size >= batch_bytes or i == len(keys) - 1:
            item = {group: {k: 0 for k in batch}}
            restore_args = {group: {k: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype) for k in batch}}
            arrays = _restore(path, item, restore_args)[group]
            for k in batch:
                yield k, arrays.pop(k)
            batch, size = [], 0


def np_dtype(name: str) -> np.dtype:
    """A stored dtype name as a numpy dtype (bfloat16 needs ml_dtypes)."""
    return WEIGHT_DTYPES.get(name) or np.dtype(name)


def load_base_params(path: str, cfg: ModelConfig, dtype, place=None, mesh=None, progress: bool = False) -> dict:
    """{param path: array} from a checkpoint directory, cast to `dtype`.

    With `mesh`, Orbax restores every parameter directly with its sharding. Otherwise parameters are restored to
    host in bounded batches and handed to `place(path, numpy_array)` one by one, as `load_hf_params` does.
    """
    if mesh is not None:
        return restore_sharded(path, cfg, dtype, mesh)
    from tqdm import tqdm

    meta = read_metadata(path)
    abstract = abstract_params(cfg, dtype)
    check_params(path, meta, abstract)
    by_key = {param_key(p): p for p in abstract}
    out = {}
    stream = iter_stored(path, list(by_key), dtype=as_dtype(dtype))
    for key, array in tqdm(stream, total=len(by_key), desc="loading weights", unit="param", disable=not progress):
        out[by_key[key]] = place(by_key[key], array) if place else array
    return out
