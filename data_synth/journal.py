"""The run's append-only journal: the single source of truth for what was paid for and produced.

One JSON line per event, flushed as soon as it happens, so a SIGKILL loses at most the line being
written (a torn last line is cut off on reopen). Replaying the journal rebuilds everything else:
finished samples, failure counts, parked samples, the cost ledger and open batches. Records stay in the
journal: the replayed state keeps only where each one's line starts, so memory does not grow with the
size of the records, and the output is streamed from the file (`read_records_at`).

Events:
  attempt       one request outcome: {id, ok, reason, detail, strike, usage: [prompt, completion] | null, cost,
                uncertain (worst-case cost of a reply that never arrived), record (when ok), batch}
  parked        a sample given up after too many strikes: {id, reasons}
  unparked      a parked sample given another round of attempts (--retry-parked): {id}
  batch_file    a batch input file uploaded: {file_id, ids}
  batch         a batch created from it: {batch_id, file_id}
  batch_closed  a batch whose results have all been journaled: {batch_id, status}
"""
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_synth.ledger import Ledger

JOURNAL_NAME = "journal.jsonl"
RUN_FILE = "run.json"   # the plan a run directory holds; written by a run, read by `status`


@dataclass
class JournalState:
    done: dict = field(default_factory=dict)   # sample id -> byte offset of its successful attempt's line
    strikes: Counter = field(default_factory=Counter)
    reasons: dict = field(default_factory=dict)
    parked: dict = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)
    batch_files: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)
    closed_batches: set = field(default_factory=set)
    batch_results: set = field(default_factory=set)

    def apply(self, event, offset):
        """Replay one event; `offset` is where its line starts in the journal (what finished samples keep)."""
        kind = event["e"]
        if kind == "attempt":
            if event["batch"]:
                self.batch_results.add((event["batch"], event["id"]))
            if event["usage"] is not None:
                self.ledger.add(tuple(event["usage"]), event["cost"])
            self.ledger.uncertain_usd += event.get("uncertain", 0.0)
            if event["ok"]:
                self.done.setdefault(event["id"], offset)
            else:
                self.ledger.count_failure(event["reason"])
                self.reasons.setdefault(event["id"], []).append(event["reason"])
                self.strikes[event["id"]] += bool(event["strike"])
        elif kind == "parked":
            self.parked[event["id"]] = event["reasons"]
        elif kind == "unparked":
            self.parked.pop(event["id"], None)
            self.strikes[event["id"]] = 0
        elif kind == "batch_file":
            self.batch_files[event["file_id"]] = event["ids"]
        elif kind == "batch":
            self.batches[event["batch_id"]] = event["file_id"]
        elif kind == "batch_closed":
            self.closed_batches.add(event["batch_id"])
        else:
            raise ValueError(f"unknown journal event {kind!r}")

    def open_batches(self):
        """{batch_id: [spec ids]} of batches created but not yet fully journaled."""
        return {b: self.batch_files[f] for b, f in self.batches.items() if b not in self.closed_batches}

    def unsubmitted_files(self):
        """{file_id: [spec ids]} uploaded but with no journaled batch (a crash between upload and create)."""
        used = set(self.batches.values())
        return {f: ids for f, ids in self.batch_files.items() if f not in used}


def read_journal(out_dir):
    """Replay the journal of `out_dir` line by line (empty state if there is none).

    A last line without its newline is a write torn by a kill (or one still being written): it is skipped.
    """
    state = JournalState()
    path = Path(out_dir) / JOURNAL_NAME
    if not path.exists():
        return state
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            try:
                state.apply(json.loads(line), offset)
            except (json.JSONDecodeError, KeyError, ValueError) as err:
                raise ValueError(f"{path} line {number} is corrupt ({err}); it was not written by a clean append") \
                    from None
            offset += len(line)
    return state


def read_records_at(out_dir, state, ids):
    """Yield the record of each finished sample in `ids`, in that order, one line read at a time."""
    path = Path(out_dir) / JOURNAL_NAME
    with open(path, "rb") as f:
        for sample_id in ids:
            offset = state.done[sample_id]
            f.seek(offset)
            try:
                event = json.loads(f.readline())
            except json.JSONDecodeError:
                event = {}
            if event.get("id") != sample_id or "record" not in event:
                raise ValueError(f"{path} byte {offset} holds no record of sample {sample_id!r}; the journal "
                                 f"changed after it was replayed")
            yield event["record"]


def _complete_length(f, end):
    """Bytes of `f` (`end` long) up to and including its last newline, read backwards from the end."""
    position = end
    while position > 0:
        start = max(0, position - 65536)
        f.seek(start)
        chunk = f.read(position - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


class Journal:
    """Appends events to `out_dir/journal.jsonl`; opening it cuts a torn last line left by a kill."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / JOURNAL_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            self._size = _complete_length(f, end)
            if self._size < end:
                f.truncate(self._size)
        self._file = open(self.path, "ab")

    def write(self, event):
        """Append `event` and return the byte offset its line starts at (for `JournalState.apply`)."""
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        self._file.write(line)
        self._file.flush()
        offset = self._size
        self._size += len(line)
        return offset

    def close(self):
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
