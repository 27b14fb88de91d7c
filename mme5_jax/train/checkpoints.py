"""A run's Orbax training checkpoints (`checkpoints/<step>/`) and, for randomly initialised models, its frozen base
(`base/`, written once so that every launch and the export start from the same weights)."""
import dataclasses
import os
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mme5_jax import base_checkpoint
from mme5_jax.hf.weights import LM_HEAD_KEY
from mme5_jax.model.lora import LoRAParam
from mme5_jax.train.build import random_base_model
from mme5_jax.train.config import processor_dir

# Saved keys of the persistent state that were renamed since, by their current name: checkpoints written before
# the rename still restore.
OLD_NAMES = {"nonfinite_steps": "nan_skips"}


class RunCheckpoints:
    """Orbax checkpoints of a run: the trainable part of the TrainState plus every process's Grain iterator state.

    The frozen base weights are not saved here (they come from `model.path`, or `base/` for random-init models).
    """

    def __init__(self, directory, section):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=section.keep, create=True,
                                                 enable_async_checkpointing=section.async_save,
                                                 cleanup_tmp_directories=True))

    @staticmethod
    def persistent(state):
        return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
                "nonfinite_steps": state.nonfinite_steps}

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, iterator):
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.persistent(state)),
                                                        data=grain.checkpoint.CheckpointSave(iterator)))

    def restore(self, step, state, iterator):
        """`state` with its trainable part replaced from checkpoint `step`, laid out like `state` (any mesh)."""
        persistent = self.persistent(state)
        saved = self.manager.item_metadata(step)["state"].keys()
        names = {key: key if key in saved else OLD_NAMES.get(key, key) for key in persistent}
        target = {names[key]: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                           value) for key, value in persistent.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(iterator)))["state"]
        return dataclasses.replace(state, **{key: restored[name] for key, name in names.items()})

    def finish(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_adapters(directory, model, step=None):
    """Load the adapters of checkpoint `step` (default: the latest complete one) into `model`; returns the step.

    Only the `trainable` part of the saved state is read, onto the devices the model's arrays live on.
    """
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, LoRAParam))
    target = {}
    for path, leaf in leaves:  # the saved tree's string keys, e.g. [...]['adapter']['lora_a']['value']
        node = target
        for key in path[:-1]:
            node = node.setdefault(_key_name(key), {})
        node[_key_name(path[-1])] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    item = {"trainable": target}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]["trainable"]
    manager.close()
    values = []
    for path, _ in leaves:
        node = restored
        for key in path:
            node = node[_key_name(key)]
        values.append(node)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, values))
    return step


def _key_name(key):
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def save_random_base(config, output_dir):
    """Write a randomly initialised base model to `output_dir/base` once; every launch (and the export) then
    loads it from there, so a relaunched run starts from exactly the same weights."""
    target = Path(output_dir) / "base"
    if base_checkpoint.is_checkpoint(str(target)):
        return str(target)
    cfg, model = random_base_model(config)
    with base_checkpoint.AtomicDir(str(target)) as tmp:
        writer = base_checkpoint.WeightsWriter(tmp)
        for path, value in nnx.to_flat_state(nnx.state(model)):
            writer.add("params", base_checkpoint.param_key(path), jax.device_get(value.get_value()))
        # No LM head is needed for embeddings; a zero one makes the exported HF model load without missing keys.
        writer.add("extras", LM_HEAD_KEY, np.zeros((cfg.text.vocab_size, cfg.text.hidden_size), np.dtype(
            jax.numpy.dtype(config.model.dtype))))
        entries = writer.close()
        base_checkpoint.write_metadata(tmp, cfg, config.model.dtype, {"random_init": True, "seed": config.seed},
                                       entries)
        if jax.process_index() == 0:
            base_checkpoint.copy_side_files(processor_dir(config), tmp)
    return str(target)
