"""Batch API mode: half price, results within 24 h, and no request ever submitted twice.

Requests go out as JSONL files within the API's limits (<= 50K requests, <= 200 MB). The journal records
each uploaded file and each created batch before anything else happens, so after a restart open batches
are polled again rather than resubmitted, and a file uploaded just before a crash is matched to its batch
by listing the server's batches. Results are joined on `custom_id` (the sample id); samples an expired or
failed batch did not return are requeued into the next batch.
"""
import json

import openai

from tqdm import tqdm

from data_synth.client import Outcome, make_client, outcome_from_raw, retry_after_seconds
from data_synth.prompts import response_schema

FINAL_STATUSES = ("completed", "expired", "failed", "cancelled")


class BatchRun:
    def __init__(self, synthesis, todo, state, journal):
        self.syn = synthesis
        self.s = synthesis.s
        self.state = state
        self.ledger = state.ledger
        self.journal = journal
        self.by_id = {spec.id: spec for spec in synthesis.specs}
        self.client = make_client(self.s.base_url, self.s.api_key_env, self.s.request_timeout_s, 4)
        self.open = {}        # batch_id -> [spec ids]
        self.reserved = {}    # batch_id -> worst-case cost held for it
        in_open = {i for ids in state.open_batches().values() for i in ids}
        in_open |= {i for ids in state.unsubmitted_files().values() for i in ids}
        self.pending = [spec for spec in todo if spec.id not in in_open]
        self.stopped = None
        self.progress = tqdm(total=len(todo), desc="synth (batch)", unit="sample", disable=not self.s.progress,
                             dynamic_ncols=True)

    def _write(self, event):
        self.state.apply(event, self.journal.write(event))

    def _hold(self, batch_id, ids, cost=None):
        """Keep the worst-case cost of an open batch reserved until its results are booked."""
        if cost is None:
            cost = sum(self.syn.request(self.by_id[i])[2] for i in ids)
            self.ledger.reserved_usd += cost
        self.reserved[batch_id] = cost
        self.open[batch_id] = list(ids)

    async def _adopt_previous(self):
        """Take over the batches (and uploaded-but-uncreated files) a previous process left open."""
        for batch_id, ids in self.state.open_batches().items():
            self._hold(batch_id, ids)
        for file_id, ids in self.state.unsubmitted_files().items():
            batch_id = await self._create(file_id)
            self._write({"e": "batch", "batch_id": batch_id, "file_id": file_id})
            self._hold(batch_id, ids)

    async def _existing_batch(self, file_id):
        async for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == file_id:
                return batch.id
        return None

    async def _create(self, file_id, maybe_exists=True):
        """Create the batch for an uploaded file, unless the server already has one for it.

        Looking first makes creation idempotent: a create whose reply was lost (or a crash before its id
        was journaled) is found instead of being repeated and paid for twice. Only a file just uploaded
        by this process is known to have no batch yet.
        """
        async def create():
            nonlocal maybe_exists
            if maybe_exists:
                batch_id = await self._existing_batch(file_id)
                if batch_id is not None:
                    return batch_id
            maybe_exists = True  # a create that fails on our side may still have happened on the server
            batch = await self.client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                     completion_window="24h")
            return batch.id

        return await self._api(create)

    async def _api(self, call, *args, **kwargs):
        """A control-plane call (upload, create, poll, download), retried through transient failures."""
        for attempt in range(self.s.max_attempts):
            try:
                return await call(*args, **kwargs)
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as err:
                if attempt + 1 == self.s.max_attempts:
                    raise
                retry_after = retry_after_seconds(err.response.headers) if isinstance(err, openai.APIStatusError) \
                    else None
                await self.syn.sleep(retry_after if retry_after is not None
                                     else min(60.0, self.s.backoff_base_s * 2 ** attempt))

    def _next_chunk(self):
        """Take pending samples for one input file, as many as the file limits and the budget allow."""
        lines, ids, size, cost = [], [], 0, 0.0
        while self.pending and len(ids) < self.s.batch_max_requests:
            spec = self.pending[0]
            body, _, worst_case = self.syn.request(spec)
            line = json.dumps({"custom_id": spec.id, "method": "POST", "url": "/v1/chat/completions",
                               "body": body}, ensure_ascii=False).encode() + b"\n"
            if size + len(line) > self.s.batch_max_bytes and ids:
                break
            if not self.ledger.try_reserve(worst_case):
                if not ids and not self.open:
                    self.stopped = "budget"
                break
            self.pending.pop(0)
            lines.append(line)
            ids.append(spec.id)
            size += len(line)
            cost += worst_case
        return b"".join(lines), ids, cost

    async def _submit(self):
        while self.pending and self.stopped is None:
            data, ids, cost = self._next_chunk()
            if not ids:
                return
            uploaded = await self._api(self.client.files.create, file=("requests.jsonl", data), purpose="batch")
            self._write({"e": "batch_file", "file_id": uploaded.id, "ids": ids})
            batch_id = await self._create(uploaded.id, maybe_exists=False)
            self._write({"e": "batch", "batch_id": batch_id, "file_id": uploaded.id})
            self._hold(batch_id, ids, cost)

    def _result_lines(self, text):
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # its sample gets no result and is requeued
            if isinstance(item, dict) and item.get("custom_id") in self.by_id:
                yield item

    def _outcome(self, spec, item):
        response = item.get("response") or {}
        status = response.get("status_code")
        if status == 200:
            body = response.get("body")
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            return outcome_from_raw(raw, spec, response_schema(spec), self.syn.script(spec), self.s.model)
        error = item.get("error") or (response.get("body") or {}).get("error") or {}
        return Outcome(reason=f"batch_http_{status}" if status else "batch_error",
                       detail=str(error.get("message", ""))[:200])

    def _book(self, batch_id, spec, outcome):
        if (batch_id, spec.id) in self.state.batch_results:
            return  # already journaled before a restart
        cost = self.syn.price.cost(*outcome.usage) if outcome.usage else 0.0
        event = {"e": "attempt", "id": spec.id, "ok": outcome.record is not None, "reason": outcome.reason,
                 "detail": outcome.detail[:300],
                 "strike": outcome.strike, "usage": list(outcome.usage) if outcome.usage else None,
                 "cost": cost, "batch": batch_id}
        if outcome.record is not None:
            event["record"] = outcome.record
        self._write(event)
        if outcome.record is None and self.state.strikes[spec.id] >= self.s.max_attempts:
            self._write({"e": "parked", "id": spec.id, "reasons": self.state.reasons[spec.id]})

    async def _collect(self, batch_id, batch):
        """Journal every result of a finished batch, requeue what it did not return, and close it."""
        ids = self.open.pop(batch_id)
        seen = set()
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._api(self.client.files.content, file_id)
            for item in self._result_lines(content.text):
                spec = self.by_id[item["custom_id"]]
                if spec.id in seen or spec.id not in ids:
                    continue
                seen.add(spec.id)
                self._book(batch_id, spec, self._outcome(spec, item))
        reason = "batch_expired" if batch.status in ("expired", "cancelled") else "batch_failed"
        for sample_id in ids:
            if sample_id not in seen:
                self._book(batch_id, self.by_id[sample_id], Outcome(reason=reason, detail=f"batch {batch.status}"))
        self._write({"e": "batch_closed", "batch_id": batch_id, "status": batch.status})
        self.progress.update(sum(1 for i in ids if i in self.state.done))
        self.progress.set_postfix_str(f"${self.ledger.spent_usd:.2f} open batches={len(self.open)}", refresh=False)
        self.ledger.release(self.reserved.pop(batch_id))
        self.pending += [self.by_id[i] for i in ids
                         if i not in self.state.done and i not in self.state.parked]

    async def run(self):
        try:
            await self._adopt_previous()
            while True:
                await self._submit()
                if not self.open:
                    break
                await self.syn.sleep(self.s.batch_poll_s)
                for batch_id in list(self.open):
                    batch = await self._api(self.client.batches.retrieve, batch_id)
                    if batch.status in FINAL_STATUSES:
                        await self._collect(batch_id, batch)
        finally:
            self.progress.close()
            await self.client.close()
        return self.stopped


async def run_batch(synthesis, todo, state, journal):
    return await BatchRun(synthesis, todo, state, journal).run()
