"""Pod behaviour on one machine: a run moves between 2 JAX processes x 4 CPU devices (gloo), 1 x 8 and 2 x 2 as
it would between pod slices, and continues as one uninterrupted run; a checkpoint restores onto a different mesh."""
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import yaml

from train_fixtures import make_inputs, saved_state, subprocess_env, train_command, train_losses, write_config

from mme5_jax.train import load_config, read_metrics, train

pytestmark = pytest.mark.slow  # about 4 minutes of 1- and 2-process training; run with `pytest -m slow`


LEG = 3  # steps per leg of the elastic run
STEPS = 3 * LEG
# A constant learning rate without warm-up makes a run of LEG steps the first LEG steps of a longer one, so the
# legs of the elastic run can end by their step counts. Rows keep their place in the global batch on every
# topology, so dropout (0.1 in the test config) masks the same units everywhere.
CHANGES = {"train": {"steps": STEPS, "schedule": "constant", "warmup_ratio": 0.0},
           "checkpoint": {"every_steps": LEG}, "log": {"example_ids": True}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("multihost"))


@pytest.fixture(scope="module")
def single(inputs):
    summary = train(load_config(write_config(inputs, "single", CHANGES)))
    assert summary["step"] == STEPS
    return inputs / "single"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(config, steps, devices, signal_after=None, expect=0):
    """Train as 2 processes x `devices` CPU devices; with `signal_after`, SIGTERM process 1 alone once step
    `signal_after` is logged."""
    address = f"127.0.0.1:{_free_port()}"
    output_dir = yaml.safe_load(open(config))["output_dir"]
    logs = [open(f"{output_dir}.process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(train_command(config, f"train.steps={steps}", f"mesh.data={2 * devices}",
                                            f"mesh.cpu_devices={devices}", f"distributed.coordinator_address={address}",
                                            "distributed.num_processes=2", f"distributed.process_id={i}"),
                              env=subprocess_env(cpu_devices=devices), stdout=log, stderr=subprocess.STDOUT)
             for i, log in enumerate(logs)]
    try:
        if signal_after is not None:
            deadline = time.monotonic() + 600
            while max(train_losses(output_dir), default=0) < signal_after:
                assert procs[1].poll() is None and time.monotonic() < deadline, "no step logged before SIGTERM"
                time.sleep(0.01)
            procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [expect, expect], "\n".join(out[-3000:] for out in outputs)
    return outputs


def _examples(output_dir):
    """Each step's example ids in global batch order, the last launch's where a step ran twice."""
    return {r["step"]: list(zip(r["source_index"], r["record_index"])) for r in read_metrics(output_dir)
            if r["kind"] == "examples"}


def _adapters(output_dir):
    state = saved_state(str(output_dir / "checkpoints" / str(STEPS)))
    return {key: value for key, value in state.items() if key.startswith("['trainable']")}


def test_resume_onto_other_topologies_continues_the_uninterrupted_run(inputs, single):
    """2 processes x 4 devices for LEG steps, then 1 x 8 for LEG steps, then 2 x 2 for LEG steps: the same
    examples in the same order as one uninterrupted 1 x 8 run, the same losses and the same final adapters."""
    config = write_config(inputs, "elastic", CHANGES)
    _two_processes(config, LEG, 4)
    assert (inputs / "elastic" / "checkpoints" / str(LEG) / "data_position").is_dir()
    summary = train(load_config(config, [f"train.steps={2 * LEG}"]))
    assert summary["start_step"] == LEG and summary["step"] == 2 * LEG
    _two_processes(config, STEPS, 2)

    examples, reference = _examples(inputs / "elastic"), _examples(single)
    assert sorted(examples) == sorted(reference) == list(range(1, STEPS + 1))
    assert [examples[s] for s in sorted(examples)] == [reference[s] for s in sorted(reference)]
    consumed = [example for s in sorted(examples) for example in examples[s]]
    assert len(set(consumed)) == STEPS * 16  # one pass is 256 records: nothing repeated, and no row rejected

    losses, single_losses = train_losses(str(inputs / "elastic")), train_losses(str(single))
    # Reduction order only: each loss within 1e-5 of float64 (test_train_step) -> 2e-5; updates move ~lr x 3e-5.
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [single_losses[s] for s in sorted(single_losses)],
                               rtol=2e-5)
    ours, theirs = _adapters(inputs / "elastic"), _adapters(single)
    assert ours.keys() == theirs.keys()
    for key in ours:
        # Adam normalises the gradient: a relative error d in it moves an update by <= 2 x lr x d. With d <= 3e-5
        # (reduction order, as above) and lr 3e-3 that is 1.8e-7 a step, 1.6e-6 over 9 steps; 1e-5 leaves 6x for
        # the parameters' differences feeding back into later gradients (measured: 8.3e-7 at most).
        np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-5, err_msg=key)


def test_sigterm_to_one_process_stops_both_at_one_checkpoint(inputs, single):
    """A preemption notice reaching one process of two: JAX's preemption service makes both save the same step
    and exit with the preemption code; the relaunch ends where the uninterrupted run does."""
    from mme5_jax.train import PREEMPTED_EXIT_CODE

    config = write_config(inputs, "sigterm", CHANGES)
    _two_processes(config, STEPS, 4, signal_after=1, expect=PREEMPTED_EXIT_CODE)
    checkpoints = inputs / "sigterm" / "checkpoints"
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and saved[-1] < STEPS and (checkpoints / str(saved[-1]) / "data_position").is_dir()
    assert max(train_losses(str(inputs / "sigterm"))) == saved[-1]  # the step in flight finished and was saved
    _two_processes(config, STEPS, 4)
    assert _examples(inputs / "sigterm") == _examples(single)
    ours, theirs = _adapters(inputs / "sigterm"), _adapters(single)
    for key in ours:  # 2 x 4 against 1 x 8: the bound of the elastic test
        np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-5, err_msg=key)


def test_restore_onto_a_different_mesh(inputs, single):
    """Resume step LEG of the data=8 run on a data=4 x fsdp=2 mesh: the remaining steps match."""
    output_dir = inputs / "remeshed"
    shutil.copytree(single / "checkpoints" / str(LEG), output_dir / "checkpoints" / str(LEG))
    summary = train(load_config(write_config(inputs, "remeshed", dict(CHANGES, mesh={"data": 4, "fsdp": 2}))))
    assert summary["start_step"] == LEG and summary["step"] == STEPS
    resumed, reference = train_losses(str(output_dir)), train_losses(str(single))
    assert sorted(resumed) == list(range(LEG + 1, STEPS + 1))
    # A new mesh reorders reductions only: 2e-5, as in the elastic test.
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [reference[s] for s in sorted(resumed)],
                               rtol=2e-5)
