"""`mme5 convert`: Hugging Face Mllama safetensors <-> our Orbax base checkpoint, and `inspect` for either.

Both directions stream: hf-to-jax reads one parameter's tensors with plain file reads, writes it through Orbax
partial saves and frees it; jax-to-hf restores a few parameters at a time and appends tensors to size-capped
safetensors shards (`mme5_jax.hf.writer`). Every output is written into a temporary sibling directory and renamed
into place at the end, so a failed or interrupted run leaves nothing at OUT_DIR.
"""
import os

import jax
import numpy as np
from tqdm import tqdm

from mme5_jax import base_checkpoint
from mme5_jax.config import ModelConfig
from mme5_jax.hf.layout import LAYOUTS, source_key_layout
from mme5_jax.hf.reader import SAFETENSORS_DTYPES, HFCheckpoint, UnmappedReader
from mme5_jax.hf.weights import LM_HEAD_KEY, WeightError, check_keys, group_by_param, read_param, weight_map
from mme5_jax.hf.writer import DEFAULT_MAX_SHARD_BYTES, base_hf_tensors, export_hf
from mme5_jax.model import DTYPES

FLOAT_SOURCE_DTYPES = ("F64", "F32", "BF16", "F16")


# --- hf-to-jax ----------------------------------------------------------------------------------------------------
def hf_to_jax(hf_dir: str, out_dir: str, dtype: str = "auto", progress: bool = True,
              flush_bytes: int = 128 << 20) -> str:
    """Converts an HF Mllama directory into our checkpoint at `out_dir`; returns `out_dir`.

    `dtype="auto"` keeps bf16 checkpoints in bf16 and stores anything else as float32 (lossless either way).
    """
    cfg = ModelConfig.from_pretrained(hf_dir)
    reader = UnmappedReader(HFCheckpoint(hf_dir))
    table = weight_map(cfg)
    check_keys(table, reader.keys())
    source_dtypes = _check_source(reader, table, cfg)
    dtype = ("bfloat16" if source_dtypes == {"BF16"} else "float32") if dtype == "auto" else dtype
    np_dtype = base_checkpoint.as_dtype(dtype)
    groups = group_by_param(table)
    place = _multihost_placer(cfg, dtype)
    total = sum(int(np.prod(reader.shape(k))) for k in reader.keys()) * np_dtype.itemsize
    with base_checkpoint.AtomicDir(out_dir) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-jax",
                                                         disable=not progress) as bar:
        writer = base_checkpoint.WeightsWriter(tmp, flush_bytes)
        for path, items in groups.items():
            array = read_param(reader, items, np_dtype)
            bar.update(array.nbytes)
            writer.add("params", base_checkpoint.param_key(path), place(path, array))
            del array
        if LM_HEAD_KEY in reader.keys():
            array = reader.get(LM_HEAD_KEY).astype(np_dtype)
            bar.update(array.nbytes)
            writer.add("extras", LM_HEAD_KEY, array)
        entries = writer.close()
        source = dict(kind="huggingface", path=os.path.abspath(hf_dir), dtypes=sorted(source_dtypes),
                      key_layout=source_key_layout(raw for _, raw in reader.ckpt.where.values()))
        base_checkpoint.write_metadata(tmp, cfg, dtype, source, entries)
        if jax.process_index() == 0:
            base_checkpoint.copy_side_files(hf_dir, tmp)
    return out_dir


def _check_source(reader, table: dict, cfg: ModelConfig) -> set:
    """Checks every tensor's dtype and shape from the headers before anything is written; returns the dtypes."""
    problems, dtypes = [], set()
    for key in sorted(reader.keys()):
        dtype = reader.dtype(key)
        if dtype not in FLOAT_SOURCE_DTYPES:
            problems.append(f"tensor {key!r} has dtype {dtype}, expected one of {', '.join(FLOAT_SOURCE_DTYPES)}")
        dtypes.add(dtype)
        expected = table[key].hf_shape if key in table else (cfg.text.vocab_size, cfg.text.hidden_size)
        if reader.shape(key) != expected:
            problems.append(f"tensor {key!r} has shape {reader.shape(key)}, the config expects {expected}")
    if problems:
        raise WeightError(f"{reader.ckpt.path}: " + "; ".join(problems[:8])
                          + (f" ... ({len(problems)} problems in all)" if len(problems) > 8 else ""))
    return dtypes


def _multihost_placer(cfg: ModelConfig, dtype: str):
    """On several processes, parameters become FSDP-sharded global arrays so each process writes its own shards."""
    if jax.process_count() == 1:
        return lambda path, array: array
    from mme5_jax.sharding import make_mesh

    abstract = base_checkpoint.abstract_params(cfg, dtype, make_mesh(data=1, fsdp=jax.device_count()))
    return lambda path, array: jax.make_array_from_callback(array.shape, abstract[path].sharding,
                                                            lambda index: array[index])


# --- jax-to-hf ----------------------------------------------------------------------------------------------------
def jax_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              layout: str = "installed", progress: bool = True) -> str:
    """Writes our base checkpoint as an HF directory that `MllamaForConditionalGeneration` loads."""
    meta = base_checkpoint.read_metadata(ckpt_dir)
    cfg = ModelConfig.from_hf_dict(meta["config"])
    total = sum(int(np.prod(e["shape"])) * base_checkpoint.as_dtype(e["dtype"]).itemsize
                for group in ("params", "extras") for e in meta[group].values())
    return export_hf(out_dir, cfg, base_hf_tensors(ckpt_dir, cfg, layout), dtype=meta["dtype"],
                     extra_files_from=ckpt_dir, max_shard_bytes=max_shard_bytes, layout=layout,
                     progress_bytes=total if progress else None)


# --- inspect ------------------------------------------------------------------------------------------------------
def tensor_listing(path: str) -> tuple[str, dict]:
    """(format description, {key: (shape, dtype name)}) of an HF directory or one of our checkpoints."""
    if base_checkpoint.is_checkpoint(path):
        meta = base_checkpoint.read_metadata(path)
        listing = {f"{group}/{k}": (tuple(e["shape"]), e["dtype"])
                   for group in ("params", "extras") for k, e in meta[group].items()}
        return f"mme5 checkpoint ({meta['dtype']}, from {meta['source'].get('path')})", listing
    ckpt = HFCheckpoint(path)
    listing = {raw: (f.shape(raw), np.dtype(SAFETENSORS_DTYPES[f.header[raw]["dtype"]]).name)
               for f, raw in ckpt.where.values()}
    return f"Hugging Face safetensors ({len(ckpt.files)} file(s))", listing


def format_tree(listing: dict) -> str:
    """Keys as an indented tree; chains of single-child nodes are joined with dots to keep it short."""
    tree = {}
    for key in sorted(listing, key=_natural):
        node = tree
        for part in key.replace("/", ".").split("."):
            node = node.setdefault(part, {})
        node[None] = listing[key]
    lines = []

    def walk(node, indent, prefix=""):
        for name, child in node.items():
            if name is None:
                continue
            label = prefix + name
            while None not in child and len(child) == 1:
                (next_name, child), = child.items()
                label += "." + next_name
            if None in child:
                shape, dtype = child[None]
                lines.append(f"{'  ' * indent}{label}  {list(shape)}  {dtype}")
            if len(child) > (None in child):
                if None not in child:
                    lines.append(f"{'  ' * indent}{label}")
                walk(child, indent + 1)

    walk(tree, 0)
    return "\n".join(lines)


def _natural(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.replace("/", ".").split(".")]


# --- `mme5 convert` -----------------------------------------------------------------------------------------------
def _byte_size(text: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ValueError(f"not a byte size: {text!r} (examples: 5GB, 500MB, 1048576)")


def add_arguments(parser):
    sub = parser.add_subparsers(dest="convert_command", metavar="{hf-to-jax,jax-to-hf,inspect}", required=True)
    p = sub.add_parser("hf-to-jax", help="Hugging Face Mllama directory -> our Orbax base checkpoint",
                       description="Converts HF safetensors (transformers 4.4x or 5.x key layout) tensor by tensor "
                                   "into our self-contained Orbax checkpoint. Atomic: OUT_DIR appears only when "
                                   "complete.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="stored weight dtype (default auto: bf16 sources stay bf16, others become float32)")
    p = sub.add_parser("jax-to-hf", help="our base checkpoint -> Hugging Face Mllama directory",
                       description="Writes safetensors shards + index, config.json, generation_config.json and the "
                                   "tokenizer/processor files, loadable by MllamaForConditionalGeneration and "
                                   "AutoProcessor. Atomic: OUT_DIR appears only when complete.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--max-shard-size", default="5GB", type=_byte_size, help="largest shard (default 5GB)")
    p.add_argument("--layout", default="installed", choices=LAYOUTS,
                   help="tensor key and config.json layout (default: what the installed transformers writes: its "
                        "config layout, and the 4.46 keys that 4.4x and 5.x both write)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merge-lora", action="store_true",
                      help="CKPT_DIR is a `mme5 train` output_dir: fold its latest adapters into the base weights "
                           "(the default for a training run)")
    mode.add_argument("--peft", action="store_true",
                      help="CKPT_DIR is a `mme5 train` output_dir: write its latest adapters as a PEFT adapter "
                           "(adapter_model.safetensors + adapter_config.json; LoRA, or DoRA with use_dora)")
    p = sub.add_parser("inspect", help="print the tensor tree (keys, shapes, dtypes) of either format")
    p.add_argument("path", metavar="PATH")


def run(args):
    if args.convert_command == "hf-to-jax":
        hf_to_jax(args.hf_dir, args.out_dir, dtype=args.dtype)
        print(f"wrote {args.out_dir}")
    elif args.convert_command == "jax-to-hf":
        from mme5_jax import export

        if args.merge_lora or args.peft or export.is_run_dir(args.ckpt_dir):
            step = export.export_run(args.ckpt_dir, args.out_dir, mode="peft" if args.peft else "merge",
                                     max_shard_bytes=args.max_shard_size, layout=args.layout)
            print(f"exported the adapters of step {step}")
        else:
            jax_to_hf(args.ckpt_dir, args.out_dir, max_shard_bytes=args.max_shard_size, layout=args.layout)
        print(f"wrote {args.out_dir}")
    else:
        description, listing = tensor_listing(args.path)
        total = sum(int(np.prod(s)) * base_checkpoint.np_dtype(d).itemsize for s, d in listing.values())
        print(format_tree(listing))
        print(f"{args.path}: {description}; {len(listing)} tensors, {total / 1e9:.3f} GB")
