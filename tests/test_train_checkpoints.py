"""Training checkpoints restore the state and the data position they saved, also when written in the older format:
under older key names (`nan_skips`, now `nonfinite_steps`), with one Grain iterator state per process."""
import json

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mme5_jax.train.checkpoints import DataPosition, RunCheckpoints
from mme5_jax.train.config import CheckpointSection
from mme5_jax.train_step import TrainState


def _state(value):
    return TrainState(step=jnp.int32(value), trainable={"w": jnp.full((4,), value, jnp.float32)},
                      opt_state={"m": jnp.full((4,), 2 * value, jnp.float32)}, frozen={"b": jnp.ones(2)},
                      nonfinite_steps=jnp.int32(value + 1))


class _OldIteratorState:
    """Stands in for the older trainer's pipeline iterator: its state nests the reject counts as that one did."""

    def __init__(self, next_index, rejected):
        self.state = {"parent": {"parent": {"next_index": next_index}, "rejected": rejected,
                                 "notes": {"truncated_text": 1}}}

    def get_state(self):
        return self.state


def _grain_iterator():
    return iter(grain.MapDataset.range(4).to_iter_dataset())


def _restore(directory, step, batch=8):
    checkpoints = RunCheckpoints(directory, CheckpointSection())
    state = checkpoints.restore(step, _state(0))
    position = checkpoints.data_position(step, batch)
    checkpoints.finish()
    return state, position


def _check(state, value):
    assert int(state.step) == value and int(state.nonfinite_steps) == value + 1
    np.testing.assert_array_equal(state.trainable["w"], np.full(4, value, np.float32))
    np.testing.assert_array_equal(state.opt_state["m"], np.full(4, 2 * value, np.float32))
    np.testing.assert_array_equal(state.frozen["b"], np.ones(2))  # not saved: the caller's own


def test_round_trip(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, CheckpointSection(async_save=False))
    saved = DataPosition(position=24, global_batch_size=8, rejected={"missing_image": 2}, notes={"no_negatives": 1})
    checkpoints.save(3, _state(3), saved)
    checkpoints.finish()
    state, position = _restore(tmp_path, 3, batch=16)  # the batch size given is for older checkpoints only
    _check(state, 3)
    assert position == saved


def _save_old_format(directory, step, iterator_states):
    """A checkpoint as the trainer wrote it before the data position was global and the rename: `nan_skips`, and
    one Grain iterator state file per process (written here for process i of n, as Grain names them)."""
    old = _state(step)
    manager = ocp.CheckpointManager(str(directory), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": old.step, "trainable": old.trainable, "opt_state": old.opt_state,
                                     "nan_skips": old.nonfinite_steps}),
        data=grain.checkpoint.CheckpointSave(_grain_iterator())))
    manager.wait_until_finished()
    manager.close()
    data_dir = directory / str(step) / "data"
    for path in data_dir.glob("process_*.json"):
        path.unlink()
    for i, iterator in enumerate(iterator_states):
        (data_dir / f"process_{i}-of-{len(iterator_states)}.json").write_text(json.dumps(iterator.get_state()))


def test_an_old_single_process_checkpoint_restores_where_it_stopped(tmp_path):
    """5 steps of 8, 3 entries rejected on the way: the process read 43 entries, the resume starts at the 44th."""
    _save_old_format(tmp_path, 5, [_OldIteratorState(43, {"missing_image": 2, "corrupt_image": 1})])
    state, position = _restore(tmp_path, 5)
    _check(state, 5)
    assert position == DataPosition(43, 8, {"missing_image": 2, "corrupt_image": 1}, {"truncated_text": 1})


def test_an_old_two_process_checkpoint_resumes_without_a_gap(tmp_path, caplog):
    """Process i read entries i, i + 2, ...: 20 + 1 (process 0, entries 0..40) and 20 + 3 (process 1, entries
    1..45). Entries 0..41 are all read, 42 is not: the resume starts there, and 43 and 45 are read again."""
    _save_old_format(tmp_path, 5, [_OldIteratorState(21, {"missing_image": 1}),
                                   _OldIteratorState(23, {"missing_image": 3})])
    state, position = _restore(tmp_path, 5)
    _check(state, 5)
    assert position == DataPosition(42, 8, {"missing_image": 4}, {"truncated_text": 2})
    assert "2 entries read before the checkpoint are read again" in caplog.text


def test_a_checkpoint_without_any_data_position_is_named(tmp_path):
    _save_old_format(tmp_path, 2, [_OldIteratorState(16, {})])
    for path in (tmp_path / "2" / "data").glob("*.json"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no data position and no per-process iterator states"):
        _restore(tmp_path, 2)
