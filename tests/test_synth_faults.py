"""A 1000-sample online run through 20% injected faults of every kind ."""
import asyncio
import json
from pathlib import Path

import pytest
from fake_openai_server import ALL_FAULTS, FakeConfig, FakeOpenAI, write_images

from data_synth.cli import main as synth_main
from data_synth.ledger import Price
from data_synth.config import load_prices
from mme5_jax.records import read_records, validate_record

API_KEY = "sk-fault-test-7f3a9c1e5b"


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """Run once, through the real client and the fake server; every test below inspects the result."""
    from data_synth.run import Synthesis, resolve_settings

    root = write_images(tmp_path_factory.mktemp("pool"), 200, side=8)
    out = tmp_path_factory.mktemp("out")
    delays = []

    async def fast_sleep(seconds):
        delays.append(seconds)
        await asyncio.sleep(0)

    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", API_KEY)
    config = FakeConfig(api_key=API_KEY, fault_rate=0.2, faults=ALL_FAULTS, retry_after_s=150, timeout_sleep_s=3.5)
    try:
        with FakeOpenAI(config) as server:
            settings = resolve_settings(images=str(root), out=str(out), num_samples=1000, base_url=server.base_url,
                                        concurrency=48, request_timeout_s=3.0, max_attempts=10, progress=False)
            summary = Synthesis(settings, sleep=fast_sleep).run()
    finally:
        mp.undo()
    return out, summary, server, delays


def test_exactly_1000_valid_unique_records(fault_run):
    out, summary, _, _ = fault_run
    records = list(read_records(out))
    assert len(records) == 1000 == summary["records"]
    assert len({r["id"] for r in records}) == 1000
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    for record in records:
        validate_record(record)
        assert record["qry_text"].strip()
        if "T" in record["modality"].split("->")[1]:
            assert record["pos_text"] != record["neg_text"][0]
    assert summary["parked"] == 0 and summary["remaining"] == 0


def test_every_fault_type_happened_and_was_survived(fault_run):
    _, summary, server, delays = fault_run
    injected = {fault for _, _, fault in server.requests if fault}
    assert injected == set(ALL_FAULTS)
    for reason in ("rate_limited", "server_error", "timeout", "connection", "malformed_body", "schema_invalid",
                   "refusal", "length", "quality_positive_equals_negative"):
        assert summary["failures"].get(reason, 0) > 0, reason
    assert 150 in delays, "a Retry-After over 120 s must be honoured, not given up on"


def test_ledger_equals_the_servers_billed_usage(fault_run):
    out, summary, server, _ = fault_run
    assert summary["prompt_tokens"] == server.billing.prompt_tokens
    assert summary["completion_tokens"] == server.billing.completion_tokens
    assert summary["billed_responses"] == server.billing.responses > 1000
    price = Price.for_model(load_prices(), "gpt-4o-2024-08-06")
    expected = price.cost(server.billing.prompt_tokens, server.billing.completion_tokens)
    # float64: > 1e3 summed costs (1e-16 relative each, of ~$4) then round(, 8) (<= 5e-9): 1e-6 USD is ample.
    assert summary["cost_usd"] == pytest.approx(expected, abs=1e-6)
    assert json.loads((out / "summary.json").read_text())["cost_usd"] == summary["cost_usd"]


def test_no_sample_was_paid_for_after_it_was_done(fault_run):
    _, _, server, _ = fault_run
    done_at = {}
    for index, (sample_id, attempt, fault) in enumerate(server.requests):
        assert sample_id not in done_at, f"{sample_id} requested again after a successful reply"
        if fault is None:
            done_at[sample_id] = index
    assert len(done_at) == 1000


def test_api_key_is_written_nowhere(fault_run):
    out, _, _, _ = fault_run
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert any(p.name == "journal.jsonl" for p in files)
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


def test_status_reports_the_finished_run(fault_run, capsys):
    out, summary, _, _ = fault_run
    assert synth_main(["status", "--out", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["records"] == 1000 and status["remaining"] == 0
    assert status["prompt_tokens"] == summary["prompt_tokens"]
