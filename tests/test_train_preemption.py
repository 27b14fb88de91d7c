"""Preemption: SIGKILL `mme5 train` at random steps (once mid-save), relaunch the same command, and end with a
state bit-identical to an uninterrupted run's."""
import glob
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from train_fixtures import make_inputs, saved_state, subprocess_env, train_command, train_losses, write_config

from mme5_jax.train import load_config, train

pytestmark = pytest.mark.slow  # minutes of subprocess training; run with `pytest -m slow`

STEPS = 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("preemption"))


def _wait_for(predicate, proc, log_path, what, timeout=900):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before {what}: "
                                 f"{open(log_path).read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _complete_steps(output_dir):
    return sorted(int(n) for n in os.listdir(os.path.join(output_dir, "checkpoints")) if n.isdigit()) \
        if os.path.isdir(os.path.join(output_dir, "checkpoints")) else []


def test_killed_runs_resume_bit_identically(inputs):
    reference = write_config(inputs, "reference")
    summary = train(load_config(reference))
    assert summary["step"] == STEPS and summary["start_step"] == 0

    chain = write_config(inputs, "chain")
    output_dir = str(inputs / "chain")
    env = subprocess_env()
    rng = random.Random(1)
    kills = []
    for trial in range(3):
        log_path = inputs / f"launch{trial}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(train_command(chain), env=env, stdout=log, stderr=subprocess.STDOUT)
        if trial == 1:  # mid-save: the moment Orbax's temporary step directory exists
            def saving():
                return glob.glob(os.path.join(output_dir, "checkpoints", "*tmp*"))
            _wait_for(saving, proc, log_path, "a checkpoint save")
        else:
            target = rng.randint(max(_complete_steps(output_dir), default=0) + 1, STEPS - 1)
            _wait_for(lambda: max(train_losses(output_dir), default=0) >= target, proc, log_path, f"step {target}")
        proc.send_signal(signal.SIGKILL)
        log.close()
        proc.wait()
        kills.append((max(train_losses(output_dir), default=0), _complete_steps(output_dir)))
        for step in _complete_steps(output_dir):  # everything that looks complete restores
            assert saved_state(os.path.join(output_dir, "checkpoints", str(step)))
    result = subprocess.run(train_command(chain), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at step 8" in result.stdout
    # The killed launches compiled the same train step into output_dir/compile_cache: the relaunch reads it back.
    assert "compilation cache: an executable was read back instead of compiled" in result.stderr

    ours = saved_state(os.path.join(output_dir, "checkpoints", str(STEPS)))
    expected = saved_state(os.path.join(str(inputs / "reference"), "checkpoints", str(STEPS)))
    assert ours.keys() == expected.keys() and any("lora_b" in k for k in ours)
    for key in expected:
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=f"{key} differs (kills at {kills})")
    # The relaunched runs logged the same losses as the uninterrupted one, step for step.
    assert train_losses(output_dir) == train_losses(str(inputs / "reference"))


def test_sigterm_checkpoints_the_step_in_flight_and_the_relaunch_continues(inputs):
    """A preemption notice: the run saves the step in flight, exits with its own code, and the relaunch ends where
    an uninterrupted run ends, bit for bit."""
    from mme5_jax.train import PREEMPTED_EXIT_CODE

    changes = {"train": {"steps": 16}, "checkpoint": {"every_steps": 100}}
    reference = write_config(inputs, "term-reference", changes)
    train(load_config(reference))
    chain = write_config(inputs, "term", changes)
    output_dir = str(inputs / "term")
    log_path = inputs / "term.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_command(chain), env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        _wait_for(lambda: max(train_losses(output_dir), default=0) >= 1, proc, log_path, "step 1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=600) == PREEMPTED_EXIT_CODE, open(log_path).read()[-3000:]
    (saved,) = _complete_steps(output_dir)
    assert 1 < saved < 16 and "preempted: stopped at step" in open(log_path).read()
    assert max(train_losses(output_dir)) == saved  # the step in flight finished, was logged and saved
    result = subprocess.run(train_command(chain), env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = saved_state(os.path.join(output_dir, "checkpoints", "16"))
    expected = saved_state(os.path.join(str(inputs / "term-reference"), "checkpoints", "16"))
    for key in expected:
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=f"{key} differs (SIGTERM at step {saved})")
    assert train_losses(output_dir) == train_losses(str(inputs / "term-reference"))
