"""Pod behaviour on one machine: 2 JAX processes x 4 CPU devices (gloo) train like 1 process x 8 devices, and a
checkpoint restores onto a different mesh."""
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest

from train_fixtures import make_inputs, subprocess_env, train_command, train_losses, write_config

from mme5_jax.train import load_config, train

pytestmark = pytest.mark.slow  # about 3 minutes of 2-process training; run with `pytest -m slow`


STEPS = 10
# Dropout keys follow a row's position in the global batch, which differs between 1 and 2 processes (each
# process contributes its slice of the stream), so dropout is off; the loss is invariant to row order.
CHANGES = {"adapter": {"dropout": 0.0}, "train": {"steps": STEPS}, "checkpoint": {"every_steps": 5}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("multihost"))


@pytest.fixture(scope="module")
def single(inputs):
    summary = train(load_config(write_config(inputs, "single", CHANGES)))
    assert summary["step"] == STEPS
    return train_losses(str(inputs / "single"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_losses_of_one(inputs, single):
    config = write_config(inputs, "two", CHANGES)
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(train_command(config, f"distributed.coordinator_address={address}",
                                            "distributed.num_processes=2", f"distributed.process_id={i}",
                                            "mesh.cpu_devices=4"),
                              env=subprocess_env(cpu_devices=4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    two = train_losses(str(inputs / "two"))
    assert sorted(two) == list(range(1, STEPS + 1))
    # Reduction order only: each loss within 1e-5 of float64 (test_train_step) -> 2e-5; updates move ~lr x 3e-5.
    np.testing.assert_allclose([two[s] for s in sorted(two)], [single[s] for s in sorted(single)], rtol=2e-5)
    # Each process saved its own Grain iterator state next to the shared adapter state.
    data_dir = inputs / "two" / "checkpoints" / str(STEPS) / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))


def test_restore_onto_a_different_mesh(inputs, single):
    """Resume step 5 of the data=8 run on a data=4 x fsdp=2 mesh: the remaining steps match."""
    output_dir = inputs / "remeshed"
    shutil.copytree(inputs / "single" / "checkpoints" / "5", output_dir / "checkpoints" / "5")
    summary = train(load_config(write_config(inputs, "remeshed", dict(CHANGES, mesh={"data": 4, "fsdp": 2}))))
    assert summary["start_step"] == 5 and summary["step"] == STEPS
    resumed = train_losses(str(output_dir))
    assert sorted(resumed) == list(range(6, STEPS + 1))
    # A new mesh reorders reductions only: 2e-5, as in test_two_processes_give_the_losses_of_one.
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [single[s] for s in range(6, STEPS + 1)],
                               rtol=2e-5)
