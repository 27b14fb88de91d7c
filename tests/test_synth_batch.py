"""Batch API mode end to end on the fake server: expiry, partial errors, restart without resubmission."""
import asyncio
import json

import pytest
from fake_openai_server import FakeConfig, FakeOpenAI, write_images

from data_synth.config import load_prices
from data_synth.journal import JOURNAL_NAME, read_journal
from data_synth.ledger import Price
from data_synth.run import Synthesis, resolve_settings
from mme5_jax.records import read_records

NUM_SAMPLES = 100


class Crash(Exception):
    """Stands in for a kill while the run waits for its batches."""


async def no_wait(seconds):
    await asyncio.sleep(0)


async def crash_on_wait(seconds):
    raise Crash()


@pytest.fixture
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pool"), 40, side=8)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def _settings(images, out, server, **extra):
    return resolve_settings(images=str(images), out=str(out), num_samples=NUM_SAMPLES, base_url=server.base_url,
                            mode="batch", batch_max_requests=30, progress=False, **extra)


def _submitted_ids(server):
    """Sample ids per batch, from the input files the server received."""
    return {b["id"]: [json.loads(line)["custom_id"] for line in server.files[b["input_file_id"]]["data"].splitlines()]
            for b in server.batches.values()}


def test_batch_mode_end_to_end_with_expiry_and_partial_errors(images, tmp_path):
    config = FakeConfig(expire_batches=1, batch_error_rate=0.1, batch_polls_to_finish=2)
    with FakeOpenAI(config) as server:
        summary = Synthesis(_settings(images, tmp_path, server), sleep=no_wait).run()
    records = list(read_records(tmp_path))
    assert len(records) == NUM_SAMPLES == len({r["id"] for r in records}) == summary["records"]
    assert server.batches["batch_0"]["status"] == "expired"
    assert summary["failures"]["batch_expired"] > 0 and summary["failures"]["batch_http_500"] > 0
    submitted = _submitted_ids(server)
    assert max(len(ids) for ids in submitted.values()) <= 30
    first_wave = [i for b in ("batch_0", "batch_1", "batch_2", "batch_3") for i in submitted[b]]
    assert sorted(first_wave) == sorted(r["id"] for r in records), "each sample goes out once in the first wave"
    assert summary["prompt_tokens"] == server.billing.prompt_tokens
    assert summary["completion_tokens"] == server.billing.completion_tokens
    half_price = Price.for_model(load_prices(), "gpt-4o-2024-08-06", batch=True)
    # float64: ~1e2 summed costs (1e-16 relative each) against one product: pytest.approx's rel=1e-6 is ample.
    assert summary["cost_usd"] == pytest.approx(half_price.cost(server.billing.prompt_tokens,
                                                                server.billing.completion_tokens))
    assert summary["open_batches"] == []


def test_restart_resumes_polling_instead_of_resubmitting(images, tmp_path):
    with FakeOpenAI(FakeConfig(batch_polls_to_finish=1)) as server:
        with pytest.raises(Crash):
            Synthesis(_settings(images, tmp_path, server), sleep=crash_on_wait).run()
        open_batches = read_journal(tmp_path).open_batches()
        assert len(open_batches) == 4 and len(server.batches) == 4
        summary = Synthesis(_settings(images, tmp_path, server), sleep=no_wait).run()
        assert len(server.batches) == 4, "a restart must poll the open batches, not submit new ones"
    assert summary["records"] == NUM_SAMPLES and summary["open_batches"] == []


def test_file_uploaded_before_a_crash_is_matched_to_its_batch(images, tmp_path):
    with FakeOpenAI(FakeConfig(batch_polls_to_finish=1)) as server:
        with pytest.raises(Crash):
            Synthesis(_settings(images, tmp_path, server), sleep=crash_on_wait).run()
        journal = tmp_path / JOURNAL_NAME
        lines = journal.read_text().splitlines()
        # As if the process died right after creating each batch, before journaling its id.
        journal.write_text("".join(line + "\n" for line in lines if json.loads(line)["e"] != "batch"))
        assert len(read_journal(tmp_path).unsubmitted_files()) == 4
        summary = Synthesis(_settings(images, tmp_path, server), sleep=no_wait).run()
        assert len(server.batches) == 4
    assert summary["records"] == NUM_SAMPLES


def test_batch_budget_cap_holds(images, tmp_path):
    with FakeOpenAI() as server:
        summary = Synthesis(_settings(images, tmp_path, server, max_cost_usd=0.05), sleep=no_wait).run()
    assert summary["stopped"] == "budget"
    assert 0 < summary["records"] < NUM_SAMPLES
    assert summary["cost_usd"] <= 0.05
