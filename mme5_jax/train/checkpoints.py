"""A run's Orbax training checkpoints (`checkpoints/<step>/`) and, for randomly initialised models, its frozen base
(`base/`, written once so that every launch and the export start from the same weights).

A checkpoint holds the trainable part of the TrainState and the run's data position: how many entries of the
global order the steps so far consumed, for the global batch size they consumed them at, with the rejection
counts of all processes summed. Both are independent of the mesh and of the number of processes, so a run saved
as P processes x D devices resumes as P' x D'.

Checkpoints written before the data position was global hold one Grain iterator state per process instead; they
still restore (`_position_from_iterator_states`).
"""
import dataclasses
import json
import logging
import os
from collections import Counter
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

log = logging.getLogger(__name__)

# Saved keys of the persistent state that were renamed since, by their current name: checkpoints written before
# the rename still restore.
OLD_NAMES = {"nonfinite_steps": "nan_skips"}


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: `position` entries of the global order consumed, `global_batch_size` a
    step; `rejected` and `notes` are the pipeline's counts by reason, summed over processes."""

    position: int
    global_batch_size: int
    rejected: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)


class RunCheckpoints:
    """Orbax checkpoints of a run: the trainable part of the TrainState plus the `DataPosition`.

    The frozen base weights are not saved here (they come from `model.path`, or `base/` for random-init models).
    """

    def __init__(self, directory, section):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data_position": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=section.keep, create=True,
                                                 enable_async_checkpointing=section.async_save,
                                                 cleanup_tmp_directories=True))

    @staticmethod
    def persistent(state):
        return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
                "nonfinite_steps": state.nonfinite_steps}

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, data_position):
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.persistent(state)),
            data_position=ocp.args.JsonSave(dataclasses.asdict(data_position))))

    def data_position(self, step, global_batch_size):
        """The `DataPosition` checkpoint `step` saved; for a checkpoint of the older per-process format, derived
        from its iterator states, taking `global_batch_size` (which that format did not record) as the run's."""
        if (Path(self.directory) / str(step) / "data_position").is_dir():
            saved = self.manager.restore(step, args=ocp.args.Composite(data_position=ocp.args.JsonRestore()))
            return DataPosition(**saved["data_position"])
        return _position_from_iterator_states(Path(self.directory) / str(step) / "data", step, global_batch_size)

    def restore(self, step, state):
        """`state` with its trainable part replaced from checkpoint `step`, laid out like `state` (any mesh)."""
        persistent = self.persistent(state)
        saved = self.manager.item_metadata(step)["state"].keys()
        names = {key: key if key in saved else OLD_NAMES.get(key, key) for key in persistent}
        target = {names[key]: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                           value) for key, value in persistent.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
        return dataclasses.replace(state, **{key: restored[name] for key, name in names.items()})

    def finish(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _position_from_iterator_states(directory, step, batch):
    """The data position of a checkpoint that holds one Grain iterator state per process (the older format).

    Process i of P read entries i, i + P, i + 2P, ... of the global order, one per accepted example and one per
    rejected one, so it consumed step * G / P + rejected_i of them; the position is where the first unread entry
    is. Entries some process read beyond it are read again after the resume; their number is logged.
    """
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"{directory}: no data position and no per-process iterator states")
    count = int(files[0].stem.rsplit("-of-", 1)[1])
    states = [json.loads((directory / f"process_{i}-of-{count}.json").read_text()) for i in range(count)]
    counts = [_find_counts(state, directory) for state in states]
    consumed = [step * batch // count + sum(c["rejected"].values()) for c in counts]
    position = min(i + count * n for i, n in enumerate(consumed))
    again = sum(consumed) - position
    if again:
        log.warning("%s: resuming from per-process iterator states; %d entries read before the checkpoint are read "
                    "again", directory.parent, again)
    total = {key: dict(sum((Counter(c[key]) for c in counts), Counter())) for key in ("rejected", "notes")}
    return DataPosition(position, batch, **total)


def _find_counts(state, directory):
    """The reject-counting stage's counts inside one process's nested iterator state."""
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "rejected" in node and "notes" in node:
                return {"rejected": node["rejected"], "notes": node["notes"]}
            stack.extend(node.values())
    raise ValueError(f"{directory}: an iterator state without rejection counts")


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
