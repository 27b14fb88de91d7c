"""Training checkpoints restore the state and the data position they saved, also when written under older key
names (`nan_skips`, now `nonfinite_steps`)."""
import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mme5_jax.train.checkpoints import RunCheckpoints
from mme5_jax.train.config import CheckpointSection
from mme5_jax.train_step import TrainState


def _state(value):
    return TrainState(step=jnp.int32(value), trainable={"w": jnp.full((4,), value, jnp.float32)},
                      opt_state={"m": jnp.full((4,), 2 * value, jnp.float32)}, frozen={"b": jnp.ones(2)},
                      nonfinite_steps=jnp.int32(value + 1))


def _iterator(consumed):
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    for _ in range(consumed):
        next(iterator)
    return iterator


def _restore(directory, step):
    checkpoints = RunCheckpoints(directory, CheckpointSection())
    iterator = _iterator(0)
    state = checkpoints.restore(step, _state(0), iterator)
    checkpoints.finish()
    return state, next(iterator)


def _check(state, value):
    assert int(state.step) == value and int(state.nonfinite_steps) == value + 1
    np.testing.assert_array_equal(state.trainable["w"], np.full(4, value, np.float32))
    np.testing.assert_array_equal(state.opt_state["m"], np.full(4, 2 * value, np.float32))
    np.testing.assert_array_equal(state.frozen["b"], np.ones(2))  # not saved: the caller's own


def test_round_trip(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, CheckpointSection(async_save=False))
    checkpoints.save(3, _state(3), _iterator(2))
    checkpoints.finish()
    state, next_element = _restore(tmp_path, 3)
    _check(state, 3)
    assert next_element == 2


def test_a_checkpoint_with_the_old_nan_skips_key_restores(tmp_path):
    """Written as the trainer wrote checkpoints before the rename."""
    old = _state(5)
    manager = ocp.CheckpointManager(str(tmp_path), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(5, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": old.step, "trainable": old.trainable, "opt_state": old.opt_state,
                                     "nan_skips": old.nonfinite_steps}),
        data=grain.checkpoint.CheckpointSave(_iterator(4))))
    manager.wait_until_finished()
    manager.close()
    state, next_element = _restore(tmp_path, 5)
    _check(state, 5)
    assert next_element == 4
