"""What a run leaves behind besides its journal: record shards, `summary.json`, and the `status` view."""
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from data_synth.journal import RUN_FILE, read_journal, read_records_at
from mme5_jax.records import SHARD_PATTERN, TFDS_FILES, ShardWriter, shard_paths, tfds_name

SUMMARY_NAME = "summary.json"


def finalize(out_dir, specs, state, records_per_shard):
    """Rewrite the shards from the journal, sorted by id; the old set is replaced only once the new one is whole.

    Records are streamed from the journal one at a time, so memory holds the ids but never the records.
    Ids are unique by construction (keys of `state.done`), so the writer keeps no id set of its own. The
    writer's TFDS metadata moves with the shards, last, and names the dataset after `out_dir`, not the staging.
    """
    out_dir = Path(out_dir)
    planned = {s.id for s in specs}
    staging = out_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    ids = sorted(i for i in state.done if i in planned)
    with ShardWriter(staging, records_per_shard=records_per_shard, check_unique_ids=False,
                     dataset_name=tfds_name(out_dir.resolve().name)) as writer:
        for record in read_records_at(out_dir, state, ids):
            writer.write(record)
    for old in out_dir.iterdir():
        if SHARD_PATTERN.match(old.name) or old.name in TFDS_FILES:
            old.unlink()
    for new in [*shard_paths(staging), *(staging / name for name in TFDS_FILES)]:
        os.replace(new, out_dir / new.name)
    staging.rmdir()


def build_summary(run_info, state, stopped):
    ledger = state.ledger
    planned = run_info["planned"]
    cap = run_info["max_cost_usd"]
    committed = ledger.spent_usd + ledger.uncertain_usd
    parked_reasons = Counter(reasons[-1] for reasons in state.parked.values())
    return {
        "records": len(state.done),
        "planned": planned,
        "parked": len(state.parked),
        "remaining": planned - len(state.done) - len(state.parked),
        "prompt_tokens": ledger.prompt_tokens,
        "completion_tokens": ledger.completion_tokens,
        "billed_responses": ledger.billed_responses,
        "cost_usd": round(ledger.spent_usd, 8),
        "uncertain_cost_usd": round(ledger.uncertain_usd, 8),
        "max_cost_usd": cap,
        "remaining_budget_usd": None if cap is None else round(max(0.0, cap - committed), 8),
        "failures": dict(sorted(ledger.failures.items())),
        "parked_by_last_reason": dict(sorted(parked_reasons.items())),
        "open_batches": sorted(state.open_batches()),
        "stopped": stopped,
        "mode": run_info["mode"],
        "model": run_info["plan"]["model"],
        "prompt_version": run_info["prompt_version"],
    }


def write_summary(out_dir, run_info, state, stopped):
    summary = build_summary(run_info, state, stopped)
    path = Path(out_dir) / SUMMARY_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return summary


def status(out_dir):
    """The state of a run directory, replayed from its journal (works while a run is going on, or after a kill)."""
    out_dir = Path(out_dir)
    run_file = out_dir / RUN_FILE
    if not run_file.exists():
        raise FileNotFoundError(f"{out_dir} is not a synthesis run directory (no {RUN_FILE})")
    run_info = json.loads(run_file.read_text())
    summary_file = out_dir / SUMMARY_NAME
    stopped = json.loads(summary_file.read_text()).get("stopped") if summary_file.exists() else None
    return build_summary(run_info, read_journal(out_dir), stopped)


def format_status(summary):
    lines = [f"records   {summary['records']} / {summary['planned']} planned "
             f"({summary['parked']} parked, {summary['remaining']} remaining)",
             f"tokens    {summary['prompt_tokens']} prompt + {summary['completion_tokens']} completion "
             f"in {summary['billed_responses']} billed responses",
             f"cost      ${summary['cost_usd']:.4f} billed, ${summary['uncertain_cost_usd']:.4f} possibly billed "
             f"(replies lost)" + (
                 f" of ${summary['max_cost_usd']:.4f} cap, ${summary['remaining_budget_usd']:.4f} left"
                 if summary["max_cost_usd"] is not None else " (no cap)")]
    if summary["failures"]:
        lines.append("failures  " + ", ".join(f"{k}={v}" for k, v in summary["failures"].items()))
    if summary["open_batches"]:
        lines.append("batches   open: " + ", ".join(summary["open_batches"]))
    if summary["stopped"]:
        lines.append(f"stopped   {summary['stopped']}")
    return "\n".join(lines)
