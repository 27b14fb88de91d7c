"""One chat-completions request and the classification of everything that can come back.

The SDK's own retries are off (`max_retries=0`): it would resend without an idempotency key, paying twice
without our seeing the first reply, and it gives up on a `Retry-After` over 120 s. Instead each request is
sent once and its outcome (success, failure class, billed usage, requested delay) goes back to the
scheduler, which journals it and decides about retrying. Bodies are read raw, so the usage of replies
that fail parsing or validation is still booked.
"""
import email.utils
import json
import os
import time
from dataclasses import dataclass

import httpx2
import openai

from data_synth.quality import Rejected, record_from_body, usage_of

SAMPLE_HEADER = "X-Mme5-Sample-Id"
# Failure classes that are not the sample's fault; they never count towards parking it.
NO_STRIKE = frozenset({"rate_limited", "batch_expired"})
# Failures where the request may have been processed and billed although no reply reached us.
UNCERTAIN = frozenset({"timeout", "connection"})


@dataclass
class Outcome:
    """What one request produced. `record` is set on success, `reason` on failure."""
    record: dict | None = None
    reason: str | None = None
    detail: str = ""
    usage: tuple | None = None
    retry_after: float | None = None
    fatal: bool = False

    @property
    def strike(self):
        return self.reason not in NO_STRIKE


def api_key_from_env(name, base_url):
    """The API key from environment variable `name`; a custom --base-url may run without one."""
    key = os.environ.get(name)
    if key:
        return key
    if base_url:
        return "unused"
    raise RuntimeError(f"environment variable {name} is not set; export your API key there (it is never "
                       f"written anywhere), or pass --base-url for a server that needs none")


def make_client(base_url, api_key_env, timeout_s, concurrency):
    limits = httpx2.Limits(max_connections=max(concurrency, 8), max_keepalive_connections=max(concurrency, 8))
    return openai.AsyncOpenAI(api_key=api_key_from_env(api_key_env, base_url), base_url=base_url,
                              max_retries=0, timeout=timeout_s,
                              http_client=openai.DefaultAsyncHttpxClient(limits=limits))


def retry_after_seconds(headers):
    """The server's requested delay from `retry-after-ms` or `Retry-After` (seconds or HTTP date), uncapped."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def classify_status_error(err):
    """Outcome of an HTTP error status; the body of an error response is not billed."""
    status = err.status_code
    detail = f"HTTP {status}"
    if status == 429:
        return Outcome(reason="rate_limited", detail=detail, retry_after=retry_after_seconds(err.response.headers))
    if status in (401, 403):
        return Outcome(reason="auth", detail=f"{detail}: check the API key and --base-url", fatal=True)
    if status >= 500 or status in (408, 409):
        return Outcome(reason=f"http_{status}" if status < 500 else "server_error", detail=detail,
                       retry_after=retry_after_seconds(err.response.headers))
    return Outcome(reason=f"http_{status}", detail=f"{detail}: {str(err.body)[:200]}")


def outcome_from_raw(raw, spec, schema, script, model):
    """Outcome of the raw bytes of a 200 response; a body that is not JSON carries no usage we can read."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return Outcome(reason="malformed_body", detail=f"body is not JSON ({err})")
    return outcome_from_body(body, spec, schema, script, model)


def outcome_from_body(body, spec, schema, script, model):
    """Outcome of a parsed 200 body: usage is read first so that a rejected reply is still booked."""
    usage = usage_of(body)
    try:
        return Outcome(record=record_from_body(spec, body, schema, script, model), usage=usage)
    except Rejected as rejected:
        return Outcome(reason=rejected.reason, detail=rejected.detail, usage=usage)


async def send(client, spec, body, script, attempt):
    """Send one request for `spec` and classify the result; never raises for API-level failures."""
    outcome = await _send(client, spec, body, script, attempt)
    if client.api_key and client.api_key in outcome.detail:
        outcome.detail = outcome.detail.replace(client.api_key, "[api key]")  # details go into the journal
    return outcome


async def _send(client, spec, body, script, attempt):
    options = {"headers": {SAMPLE_HEADER: f"{spec.id}/{attempt}"}}
    try:
        # The body is already a plain JSON dict, so it goes through the client's generic `post` (same
        # transport, auth and error mapping as `chat.completions.create`) without the typed-params walk,
        # which costs more CPU than everything else here; the raw httpx response keeps the usage readable.
        response = await client.post("/chat/completions", cast_to=httpx2.Response, body=body, options=options)
        content = response.content
    except openai.APITimeoutError:
        return Outcome(reason="timeout", detail="request timed out")
    except openai.APIConnectionError as err:
        return Outcome(reason="connection", detail=str(err.__cause__ or err)[:200])
    except openai.APIStatusError as err:
        return classify_status_error(err)
    return outcome_from_raw(content, spec, body["response_format"]["json_schema"], script, body["model"])
