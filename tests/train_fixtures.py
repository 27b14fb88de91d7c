"""Shared set-up for the trainer tests: a small demo dataset, a processor dir, config files, checkpoint reading."""
import os
import sys

import numpy as np
import yaml

from assets import make_processor_dir

TEST_CONFIG = {
    "seed": 0,
    "model": {"config": "tiny"},
    "adapter": {"kind": "dora", "rank": 4, "alpha": 8.0, "dropout": 0.1},
    "data": {"global_batch_size": 16, "max_length": 64, "length_buckets": [64]},
    "train": {"steps": 8, "lr": 3.0e-3, "schedule": "cosine", "temperature": 0.05},
    "mesh": {"data": 8, "cpu_devices": 8},
    "checkpoint": {"every_steps": 2, "keep": 10},
    "eval": {"every_steps": -1},
    "log": {"progress": False},
}


def make_inputs(root):
    """A 256-record demo train split, a 64-record held-out split and a 28-px Mllama processor under `root`."""
    from mme5_jax.data.demo import build_demo_dataset

    build_demo_dataset(root / "demo", num_train=256, num_heldout=64, photos=False)
    make_processor_dir(str(root / "processor"), image_size=28, max_image_tiles=4)
    return root


def _merge(base, top):
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(root, name, changes=None):
    """configs under `root`: the test config with `changes`, output in root/name."""
    tree = _merge(TEST_CONFIG, {"output_dir": str(root / name), "model": {"processor_dir": str(root / "processor")},
                                "data": {"demo_dir": str(root / "demo")}})
    tree = _merge(tree, changes or {})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def subprocess_env(cpu_devices=8):
    """The test process's environment for a child `mme5 train`.

    No persistent compilation cache: JAX writes its entries in place, so a SIGKILL can leave a truncated one
    that aborts the next process."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def train_command(config_path, *overrides):
    return [sys.executable, "-m", "mme5_jax.cli", "train", config_path, *overrides]


def saved_state(checkpoint_dir):
    """{key path: numpy array} of a saved trainer state (adapters, optimiser state, counters)."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    path = os.path.join(checkpoint_dir, "state")
    # As numpy arrays: the devices that saved them may be another topology's.
    metadata = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def train_losses(output_dir):
    from mme5_jax.train import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if r["kind"] == "train"}
