"""SIGKILL at random points, then the same command again: the records equal an uninterrupted run's."""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai_server import FakeConfig, FakeOpenAI, write_images

from data_synth.cli import main as synth_main
from data_synth.journal import JOURNAL_NAME, read_journal
from mme5_jax.records import read_records

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-resume-test"
NUM_SAMPLES = 240
TRIALS = 3
FAULTS = ("rate_limit", "server_error", "disconnect", "malformed", "schema_invalid", "refusal", "length")


def _arguments(images, out, base_url):
    return ["run", "--images", str(images), "--out", str(out), "--num-samples", str(NUM_SAMPLES),
            "--base-url", base_url, "--concurrency", "4", "--seed", "5", "--backoff-base-s", "0.01", "--no-progress"]


def _journal_lines(out):
    path = Path(out) / JOURNAL_NAME
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _server():
    return FakeOpenAI(FakeConfig(api_key=API_KEY, latency_s=0.02, fault_rate=0.15, faults=FAULTS,
                                 retry_after_s=0.02)).start()


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Start the trials' runs side by side (one fake server each), SIGKILL each at its own random point."""
    images = write_images(tmp_path_factory.mktemp("pool"), 60, side=8)
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    trials = []
    for trial in range(TRIALS):
        server, out = _server(), tmp_path_factory.mktemp(f"trial{trial}")
        command = [sys.executable, "-m", "data_synth.cli", *_arguments(images, out, server.base_url)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        trials.append({"server": server, "out": out, "process": process,
                       "kill_after": random.Random(trial).randint(5, NUM_SAMPLES // 3)})
    deadline = time.time() + 180
    while any(t["process"].returncode is None for t in trials) and time.time() < deadline:
        for t in trials:
            if t["process"].returncode is None and (_journal_lines(t["out"]) >= t["kill_after"]
                                                    or t["process"].poll() is not None):
                t["process"].kill()  # SIGKILL
                t["process"].wait()
                t["done_before_kill"] = set(read_journal(t["out"]).done)
                t["requests_before_rerun"] = len(t["server"].requests)
        time.sleep(0.002)
    yield images, trials
    for t in trials:
        t["server"].stop()


@pytest.fixture(scope="module")
def reference(killed_runs, tmp_path_factory):
    """The records of an uninterrupted run of the same command."""
    images, _ = killed_runs
    out = tmp_path_factory.mktemp("reference")
    server = _server()
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", API_KEY)
    try:
        assert synth_main(_arguments(images, out, server.base_url)) == 0
    finally:
        mp.undo()
        server.stop()
    return list(read_records(out))


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_then_rerun_gives_the_uninterrupted_records(trial, killed_runs, reference, monkeypatch):
    images, trials = killed_runs
    t = trials[trial]
    assert t["process"].returncode == -9, "the run finished before it could be killed"
    assert 0 < len(t["done_before_kill"]) < NUM_SAMPLES
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)

    assert synth_main(_arguments(images, t["out"], t["server"].base_url)) == 0  # the same command again

    rerun_requests = {sample_id for sample_id, _, _ in t["server"].requests[t["requests_before_rerun"]:]}
    assert rerun_requests, "the rerun had samples left to request"
    assert not rerun_requests & t["done_before_kill"], "a sample finished before the kill was requested again"
    records = list(read_records(t["out"]))
    assert len(reference) == NUM_SAMPLES
    assert len({r["id"] for r in records}) == len(records) == NUM_SAMPLES
    assert records == reference
    journal = [json.loads(line) for line in (t["out"] / JOURNAL_NAME).read_text().splitlines()]
    successes = [e["id"] for e in journal if e["e"] == "attempt" and e["ok"]]
    assert len(successes) == len(set(successes)) == NUM_SAMPLES, "each completed sample is written once"
