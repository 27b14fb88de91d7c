"""Export a training run (`mme5 train`'s output_dir) to Hugging Face: a merged model or a PEFT adapter.

`mme5 convert jax-to-hf RUN_DIR OUT_DIR --merge-lora` folds the adapters of the run's latest checkpoint into the
base weights and writes a plain `MllamaForConditionalGeneration` directory; `--peft` writes
`adapter_model.safetensors` + `adapter_config.json` for `peft.PeftModel.from_pretrained` on the HF base model
(LoRA, or DoRA with `use_dora`). The run's config.yaml says where the base weights are: `model.path`, or the
run's own `base/` for randomly initialised demo models (`mme5 convert jax-to-hf RUN_DIR/base` makes that an HF
base model for PEFT).
"""
import json
import os
from pathlib import Path

import numpy as np

EXPORT_MODES = ("merge", "peft")


def is_run_dir(path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir()


def base_dir(config, run_dir) -> str:
    return config.model.path if config.model.path is not None else str(Path(run_dir) / "base")


def load_run_model(run_dir, step=None):
    """(train config, ModelConfig, model with the adapters of checkpoint `step` (default: latest), its step)."""
    import jax
    from flax import nnx

    from mme5_jax.train.build import build_model
    from mme5_jax.train.checkpoints import restore_adapters
    from mme5_jax.train.config import load_config

    config = load_config(str(Path(run_dir) / "config.yaml"))
    cfg, model = build_model(config, base_dir(config, run_dir))
    step = restore_adapters(Path(run_dir) / "checkpoints", model, step)
    jax.block_until_ready(nnx.state(model))
    return config, cfg, model, step


def model_hf_tensors(model, cfg, layout):
    """(HF key, numpy array) for every weight of `model`, in the HF layout `layout`."""
    from flax import nnx

    from mme5_jax.hf.weights import group_by_param, param_to_hf, weight_map

    flat = {path: v for path, v in nnx.to_flat_state(nnx.state(model))}
    for path, items in group_by_param(weight_map(cfg)).items():
        yield from param_to_hf(items, np.asarray(flat[path].get_value()), layout)


def export_run(run_dir, out_dir, mode="merge", step=None, max_shard_bytes=None, layout="installed"):
    """Write the run's adapted model to `out_dir` as a merged HF model or a PEFT adapter directory."""
    from mme5_jax import base_checkpoint
    from mme5_jax.hf.layout import key_layout
    from mme5_jax.hf.writer import DEFAULT_MAX_SHARD_BYTES, base_extras, export_hf
    from mme5_jax.model.lora import MME5_TARGETS, adapter_config_json, merge_adapters, peft_state_dict
    from mme5_jax.train.config import processor_dir

    if mode not in EXPORT_MODES:
        raise ValueError(f"export mode {mode!r} unknown; choose from {EXPORT_MODES}")
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir!r} is not a `mme5 train` output_dir (no config.yaml and checkpoints/); "
                                "--merge-lora and --peft export training runs")
    config, cfg, model, step = load_run_model(run_dir, step)
    base = base_dir(config, run_dir)
    side_files = processor_dir(config)
    if mode == "merge":
        merge_adapters(model)
        layout = key_layout(layout)  # keys and config.json alike: "installed" writes both in the 4.46 layout

        def tensors():
            yield from model_hf_tensors(model, cfg, layout)
            yield from base_extras(base, layout)

        export_hf(out_dir, cfg, tensors(), dtype=config.model.dtype, extra_files_from=side_files,
                  max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, layout=layout)
        return step
    from safetensors.numpy import save_file

    adapters = config.adapter
    custom = adapters.targets != MME5_TARGETS
    with base_checkpoint.AtomicDir(out_dir) as tmp:
        save_file(peft_state_dict(model, adapters), os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        meta = adapter_config_json(adapters, os.path.abspath(base), model=model if custom else None)
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        base_checkpoint.copy_side_files(side_files, tmp)
    return step
