"""The synthesis client against a real HTTP fake server: every failure class, once each, as the scheduler sees it."""
import asyncio
import email.utils
import json
import time

import httpx2
import pytest
from fake_openai_server import ALL_FAULTS, BILLED_FAULTS, FakeConfig, FakeOpenAI, write_images

from data_synth.cli import main as synth_main
from data_synth.client import make_client, retry_after_seconds, send
from data_synth.run import Synthesis, resolve_settings

EXPECTED_REASON = {
    "rate_limit": "rate_limited", "server_error": "server_error", "timeout": "timeout",
    "disconnect": "connection", "malformed": "malformed_body", "no_choices": "malformed_body",
    "schema_invalid": "schema_invalid", "content_not_json": "schema_invalid", "refusal": "refusal",
    "length": "length", "positive_equals_negative": None,  # quality_* depends on the modality
}


@pytest.fixture(scope="module")
def synthesis(tmp_path_factory):
    root = write_images(tmp_path_factory.mktemp("pool"), 30)
    settings = resolve_settings(images=str(root), out=str(tmp_path_factory.mktemp("out")), num_samples=20,
                                progress=False)
    return Synthesis(settings)


def _send_once(server, synthesis, spec, timeout_s=1.0):
    async def go():
        client = make_client(server.base_url, "OPENAI_API_KEY", timeout_s, 4)
        try:
            body, _, _ = synthesis.request(spec)
            return await send(client, spec, body, synthesis.script(spec), attempt=0)
        finally:
            await client.close()

    return asyncio.run(go())


@pytest.mark.parametrize("fault", ALL_FAULTS)
def test_each_fault_is_classified_once_and_booked_if_billed(fault, synthesis, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    spec = next(s for s in synthesis.specs if s.target_side == "T")
    config = FakeConfig(fault_rate=1.0, faults=(fault,), retry_after_s=150, timeout_sleep_s=1.5)
    with FakeOpenAI(config) as server:
        outcome = _send_once(server, synthesis, spec)
        assert len(server.requests) == 1, "the SDK must not retry on its own"
    assert outcome.record is None
    expected = EXPECTED_REASON[fault] or "quality_positive_equals_negative"
    assert outcome.reason == expected
    if fault in BILLED_FAULTS:
        assert outcome.usage == (server.billing.prompt_tokens, server.billing.completion_tokens)
    else:
        assert outcome.usage is None and server.billing.responses == 0
    if fault == "rate_limit":
        assert outcome.retry_after == 150  # the SDK gives up above 120 s; we wait
        assert not outcome.strike


def test_success_yields_a_record_and_its_usage(synthesis, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAI() as server:
        for spec in synthesis.specs[:10]:
            outcome = _send_once(server, synthesis, spec)
            assert outcome.reason is None, outcome.detail
            assert outcome.record["id"] == spec.id and outcome.record["modality"] == spec.modality
        assert server.billing.responses == 10


def test_wrong_key_is_fatal(synthesis, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with FakeOpenAI() as server:
        outcome = _send_once(server, synthesis, synthesis.specs[0])
    assert outcome.reason == "auth" and outcome.fatal


def test_wrong_key_stops_the_run_with_an_error(synthesis, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with FakeOpenAI() as server:
        code = synth_main(["run", "--images", str(synthesis.image_root), "--out", str(tmp_path), "--num-samples",
                           "20", "--base-url", server.base_url, "--concurrency", "2", "--no-progress"])
        assert len(server.requests) == 0  # rejected at the door, before any request reached the model
    assert code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"].startswith("fatal: auth") and summary["records"] == 0


def test_retry_after_forms():
    assert retry_after_seconds(httpx2.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after_seconds(httpx2.Headers({"retry-after": "600"})) == 600
    date = email.utils.formatdate(time.time() + 300, usegmt=True)
    assert 290 < retry_after_seconds(httpx2.Headers({"retry-after": date})) <= 300
    assert retry_after_seconds(httpx2.Headers({})) is None


def test_missing_key_is_a_clear_error(synthesis, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        make_client(None, "OPENAI_API_KEY", 1.0, 1)


def test_sample_failing_n_times_is_parked_with_its_reasons_then_retried(synthesis, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    args = ["run", "--images", str(synthesis.image_root), "--out", str(tmp_path), "--num-samples", "6",
            "--concurrency", "3", "--max-attempts", "3", "--backoff-base-s", "0.001", "--no-progress"]
    with FakeOpenAI(FakeConfig(fault_rate=1.0, faults=("refusal", "schema_invalid"))) as server:
        assert synth_main([*args, "--base-url", server.base_url]) == 0
        assert len(server.requests) == 6 * 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parked"] == 6 and summary["records"] == 0 and summary["remaining"] == 0
    parked = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()
              if json.loads(line)["e"] == "parked"]
    assert all(len(p["reasons"]) == 3 and set(p["reasons"]) <= {"refusal", "schema_invalid"} for p in parked)
    with FakeOpenAI() as server:
        assert synth_main([*args, "--base-url", server.base_url]) == 0
        assert server.requests == [], "parked samples stay parked unless asked"
        assert synth_main([*args, "--base-url", server.base_url, "--retry-parked"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["records"] == 6 and summary["parked"] == 0
    assert synth_main(["status", "--out", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["records"] == 6 and status["parked"] == 0 and status["remaining"] == 0
