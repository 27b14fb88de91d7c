"""`--max-cost-usd` is a hard cap, `status` says what remains, and the journal survives torn writes."""
import json

import pytest
from fake_openai_server import FakeConfig, FakeOpenAI, write_images

from data_synth.cli import main as synth_main
from data_synth.config import load_prices
from data_synth.journal import JOURNAL_NAME, Journal, read_journal
from data_synth.ledger import Ledger, Price
from mme5_jax.records import read_records

CAP = 0.30


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory):
    images = write_images(tmp_path_factory.mktemp("pool"), 60, side=8)
    out = tmp_path_factory.mktemp("out")
    config = FakeConfig(fault_rate=0.1, faults=("schema_invalid", "refusal", "length"))
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", "sk-test")
    args = ["run", "--images", str(images), "--out", str(out), "--num-samples", "200", "--concurrency", "8",
            "--backoff-base-s", "0.001", "--no-progress"]
    with FakeOpenAI(config) as server:
        assert synth_main([*args, "--base-url", server.base_url, "--max-cost-usd", str(CAP)]) == 0
        capped = json.loads((out / "summary.json").read_text())
        billed_at_cap = (server.billing.prompt_tokens, server.billing.completion_tokens)
        yield out, capped, billed_at_cap, lambda cap: synth_main([*args, "--base-url", server.base_url,
                                                                  "--max-cost-usd", str(cap)])
    mp.undo()


def test_run_stops_at_the_cap(capped_run):
    _, summary, billed, _ = capped_run
    price = Price.for_model(load_prices(), "gpt-4o-2024-08-06")
    assert summary["stopped"] == "budget"
    assert 0 < summary["records"] < 200
    # float64: ~1e2 summed costs (1e-16 relative each); costs are multiples of 1e-8 USD, so round(, 8) keeps them.
    assert price.cost(*billed) == pytest.approx(summary["cost_usd"])
    assert summary["cost_usd"] <= CAP
    assert summary["remaining"] == 200 - summary["records"] - summary["parked"]


def test_status_reports_what_remains(capped_run, capsys):
    out, summary, _, _ = capped_run
    capsys.readouterr()
    assert synth_main(["status", "--out", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["remaining_budget_usd"] == pytest.approx(CAP - summary["cost_usd"])  # float64, as above: ~1e-15
    assert status["remaining"] == summary["remaining"] > 0
    assert status["stopped"] == "budget"
    assert synth_main(["status", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "remaining" in text and "left" in text


def test_raising_the_cap_resumes_to_completion(capped_run):
    out, capped, _, rerun = capped_run
    assert rerun(100.0) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 200 and summary["stopped"] is None
    assert summary["cost_usd"] > capped["cost_usd"]
    assert len({r["id"] for r in read_records(out)}) == 200


def test_reservation_blocks_a_request_that_could_cross_the_cap():
    ledger = Ledger(cap_usd=1.0, spent_usd=0.5)
    assert ledger.try_reserve(0.3)
    assert not ledger.try_reserve(0.3)  # 0.5 spent + 0.3 in flight + 0.3 > 1.0
    ledger.release(0.3)
    assert ledger.try_reserve(0.5)
    ledger.release(0.5)
    ledger.uncertain_usd = 0.4  # a timed-out request may have been billed: it keeps counting
    assert not ledger.try_reserve(0.3)
    assert ledger.remaining_usd == pytest.approx(0.1)  # 1.0 - 0.5 - 0.4 in float64: off by ~3e-17


def test_torn_last_journal_line_is_cut_and_a_corrupt_line_is_named(tmp_path):
    with Journal(tmp_path) as journal:
        journal.write({"e": "parked", "id": "a", "reasons": ["refusal"]})
    path = tmp_path / JOURNAL_NAME
    with open(path, "ab") as f:
        f.write(b'{"e": "parked", "id": "b", "rea')  # a kill in the middle of a write
    assert set(read_journal(tmp_path).parked) == {"a"}
    with Journal(tmp_path) as journal:
        journal.write({"e": "parked", "id": "c", "reasons": []})
    assert set(read_journal(tmp_path).parked) == {"a", "c"}
    path.write_bytes(b'{"e": "parked"}\n' + path.read_bytes())
    with pytest.raises(ValueError, match="line 1"):
        read_journal(tmp_path)
