"""A fake OpenAI-compatible HTTP server for the synthesis tests and benchmark.

It speaks enough of the chat-completions, files and batches APIs for the real `openai` client, answers
structured-output requests with schema-valid replies that are a pure function of the request (so a
resumed run can be compared with an uninterrupted one), and injects every failure the client must
survive. It keeps the totals of the usage it billed and a log of which sample each request was for.

Run standalone (for `tools/bench_synth.py`): python tests/fake_openai_server.py --latency-ms 10
"""
import argparse
import email.parser
import email.policy
import hashlib
import itertools
import json
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_synth.config import load_languages  # noqa: E402

ALL_FAULTS = ("rate_limit", "server_error", "timeout", "disconnect", "malformed", "no_choices",
              "schema_invalid", "content_not_json", "refusal", "length", "positive_equals_negative")
# Faults whose body carries usage: a real server bills them, so the client must book them.
BILLED_FAULTS = {"no_choices", "schema_invalid", "content_not_json", "refusal", "length",
                 "positive_equals_negative"}
# A few letters of each script, to write replies the client's language check accepts.
SCRIPT_SAMPLES = {
    "Latn": "abcdefghijklmnopqrstuvwxyz",
    "Cyrl": "абвгдежзиклмнопрстуфхцчшэюя",
    "Arab": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "Hebr": "אבגדהוזחטיכלמנסעפצקרשת",
    "Grek": "αβγδεζηθικλμνξοπρστυφχψω",
    "Deva": "अआइईउएकखगघचछजझटठडढतथदधनपफबभमयरलवशसह",
    "Beng": "অআইউএকখগঘচছজঝটঠডঢতথদধনপফবভমযরলশসহ",
    "Gujr": "અઆઇઉએકખગઘચછજઝટઠડઢતથદધનપફબભમયરલવશસહ",
    "Guru": "ਅਆਇਈਉਏਕਖਗਘਚਛਜਝਟਠਡਢਤਥਦਧਨਪਫਬਭਮਯਰਲਵਸਹ",
    "Orya": "ଅଆଇଉଏକଖଗଘଚଛଜଝଟଠଡଢତଥଦଧନପଫବଭମଯରଲଶସହ",
    "Taml": "அஆஇஈஉஊஎஏகஙசஞடணதநபமயரலவழளறன",
    "Telu": "అఆఇఈఉఊఎఏకఖగఘచఛజఝటఠడఢతథదధనపఫబభమయరలవశసహ",
    "Knda": "ಅಆಇಈಉಊಎಏಕಖಗಘಚಛಜಝಟಠಡಢತಥದಧನಪಫಬಭಮಯರಲವಶಸಹ",
    "Mlym": "അആഇഈഉഊഎഏകഖഗഘചഛജഝടഠഡഢതഥദധനപഫബഭമയരലവശസഹ",
    "Sinh": "අආඇඈඉඊඋඌඑඒකඛගඝචඡජඣටඨඩඪතථදධනපඵබභමයරලවශෂසහ",
    "Thai": "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮ",
    "Laoo": "ກຂຄງຈຊຍດຕຖທນບປຜຝພຟມຢຣລວສຫອຮ",
    "Mymr": "ကခဂဃငစဆဇဈညဋဌဍဎဏတထဒဓနပဖဗဘမယရလဝသဟဠအ",
    "Khmr": "កខគឃងចឆជឈញដឋឌឍណតថទធនបផពភមយរលវសហឡអ",
    "Geor": "აბგდევზთიკლმნოპჟრსტუფქღყშჩცძწჭხჯჰ",
    "Armn": "աբգդեզէըթժիլխծկհձղճմյնշոչպջռսվտրցւփքօֆ",
    "Ethi": "ሀለሐመሠረሰሸቀበተቸኀነኘአከኸወዐዘዠየደጀገጠጨጰጸፀፈፐ",
    "Hang": "가나다라마바사아자차카타파하고노도로모보소오조초코토포호",
    "Hani": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
    "Jpan": "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん日本語",
}
LANGUAGE_CODE = re.compile(r"\(language code: ([A-Za-z_-]+)\)")


@dataclass
class FakeConfig:
    api_key: str = "sk-test"
    latency_s: float = 0.0
    fault_rate: float = 0.0
    faults: tuple = ALL_FAULTS
    seed: int = 0
    retry_after_s: float = 0.05     # < 1 is sent as retry-after-ms, otherwise as Retry-After seconds
    timeout_sleep_s: float = 1.0    # a "timeout" holds the request this long, then drops it unanswered
    expire_batches: int = 0         # the first N batches expire with only half of their results
    batch_error_rate: float = 0.0   # share of batch lines answered with a 500 in the error file
    batch_polls_to_finish: int = 1


@dataclass
class Billing:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    responses: int = 0


def _uniform(*parts):
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


class FakeOpenAI:
    """The server state, shared by all handler threads."""

    def __init__(self, config=None):
        self.config = config or FakeConfig()
        self.scripts = {code: lang["script"] for code, lang in load_languages().items()}
        self.lock = threading.RLock()
        self.billing = Billing()
        self.requests = []          # (sample id, attempt, fault or None) per chat request
        self.files = {}
        self.batches = {}
        self.batch_polls = {}
        self.ids = itertools.count()
        self.httpd = None

    # -- replies -------------------------------------------------------------------------------
    def _text(self, seed, field_name, script, words=6):
        rng = random.Random(f"{seed}:{field_name}")
        alphabet = SCRIPT_SAMPLES[script]
        return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8))) for _ in range(words))

    def _fill(self, schema, seed, path, script):
        if schema["type"] == "object":
            return {k: self._fill(v, seed, f"{path}.{k}", script) for k, v in schema["properties"].items()}
        leaf = path.rsplit(".", 1)[-1]
        in_language = leaf in ("query", "positive", "negative") and path.startswith("$.revised")
        return self._text(seed, path, script if in_language else "Latn")

    def completion(self, request, fault=None):
        """A chat.completion body for `request` (a pure function of it, except for `fault`)."""
        texts = [p.get("text", "") if isinstance(p, dict) else "" for m in request["messages"]
                 for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])]
        images = sum(1 for m in request["messages"] if isinstance(m["content"], list)
                     for p in m["content"] if p.get("type") == "image_url")
        match = LANGUAGE_CODE.search(" ".join(texts))
        script = self.scripts.get(match.group(1), "Latn") if match else "Latn"
        seed = hashlib.sha256(json.dumps(request["messages"], sort_keys=True).encode()).hexdigest()
        schema = request["response_format"]["json_schema"]["schema"]
        reply = self._fill(schema, seed, "$", script)
        finish_reason, refusal = "stop", None
        if fault == "schema_invalid":
            reply["revised"].pop("instruction")
        if fault == "positive_equals_negative" and "negative" in reply["revised"]:
            reply["revised"]["negative"] = reply["revised"]["positive"]
        if fault == "positive_equals_negative" and "negative" not in reply["revised"]:
            reply["revised"]["instruction"] = ""
        content = json.dumps(reply, ensure_ascii=False)
        if fault == "content_not_json":
            content = content[: len(content) // 2]
        if fault == "length":
            content, finish_reason = content[: len(content) // 3], "length"
        if fault == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        prompt_tokens = sum(len(t.encode()) for t in texts) // 4 + 85 * images
        completion_tokens = len((content or refusal).encode()) // 4 + 1
        body = {"id": f"chatcmpl-{next(self.ids)}", "object": "chat.completion", "created": int(time.time()),
                "model": request["model"],
                "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None,
                             "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
        if fault == "no_choices":
            body.pop("choices")
        return body

    def bill(self, body):
        usage = body.get("usage")
        if usage:
            with self.lock:
                self.billing.prompt_tokens += usage["prompt_tokens"]
                self.billing.completion_tokens += usage["completion_tokens"]
                self.billing.responses += 1

    def pick_fault(self, key):
        c = self.config
        if c.fault_rate <= 0 or _uniform(c.seed, "fault?", key) >= c.fault_rate:
            return None
        return c.faults[int(_uniform(c.seed, "which", key) * len(c.faults))]

    # -- batches -------------------------------------------------------------------------------
    def run_batch(self, batch):
        """Answer every line of a batch's input file now; the results are revealed when it finishes."""
        lines = self.files[batch["input_file_id"]]["data"].decode().splitlines()
        ordinal = int(batch["id"].split("_")[1])
        expire = ordinal < self.config.expire_batches
        outputs, errors = [], []
        for i, line in enumerate(lines):
            item = json.loads(line)
            if expire and i % 2:
                continue
            key = (batch["id"], item["custom_id"])
            if _uniform(self.config.seed, "batch-error", *key) < self.config.batch_error_rate:
                errors.append({"id": f"req_{next(self.ids)}", "custom_id": item["custom_id"],
                               "response": {"status_code": 500, "request_id": "x",
                                            "body": {"error": {"message": "server error", "type": "server_error"}}},
                               "error": None})
                continue
            body = self.completion(item["body"])
            self.bill(body)
            outputs.append({"id": f"req_{next(self.ids)}", "custom_id": item["custom_id"],
                            "response": {"status_code": 200, "request_id": "x", "body": body}, "error": None})
        random.Random(batch["id"]).shuffle(outputs)
        batch["_final"] = "expired" if expire else "completed"
        batch["_outputs"] = outputs
        batch["_errors"] = errors

    def _store_file(self, data, filename, purpose):
        file_id = f"file-{next(self.ids)}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed", "data": data}
        return file_id

    def poll_batch(self, batch_id):
        batch = self.batches[batch_id]
        with self.lock:
            self.batch_polls[batch_id] = self.batch_polls.get(batch_id, 0) + 1
            if batch["status"] in ("validating", "in_progress") and \
                    self.batch_polls[batch_id] > self.config.batch_polls_to_finish:
                batch["status"] = batch["_final"]
                if batch["_outputs"]:
                    batch["output_file_id"] = self._store_file(
                        "".join(json.dumps(o) + "\n" for o in batch["_outputs"]).encode(), "out.jsonl", "batch_output")
                if batch["_errors"]:
                    batch["error_file_id"] = self._store_file(
                        "".join(json.dumps(o) + "\n" for o in batch["_errors"]).encode(), "err.jsonl", "batch_output")
            elif batch["status"] == "validating":
                batch["status"] = "in_progress"
        return batch

    # -- serving -------------------------------------------------------------------------------
    def start(self, port=0):
        self.httpd = _Server(("127.0.0.1", port), _handler_for(self))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024   # the default backlog of 5 resets connections under 64 concurrent clients


def _public(obj):
    return {k: v for k, v in obj.items() if not k.startswith("_") and k != "data"}


def _handler_for(server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status, payload, headers=()):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _drop(self):
            self.close_connection = True

        def _body(self):
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _authorised(self):
            if self.headers.get("Authorization") != f"Bearer {server.config.api_key}":
                self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                return False
            return True

        def do_POST(self):
            raw = self._body()
            if not self._authorised():
                return
            if self.path == "/v1/chat/completions":
                return self._chat(json.loads(raw))
            if self.path == "/v1/files":
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
                data = parts["file"].get_payload(decode=True)
                purpose = parts["purpose"].get_payload(decode=True).decode()
                with server.lock:
                    file_id = server._store_file(data, parts["file"].get_filename(), purpose)
                return self._send(200, _public(server.files[file_id]))
            if self.path == "/v1/batches":
                request = json.loads(raw)
                with server.lock:
                    batch_id = f"batch_{len(server.batches)}"
                    batch = {"id": batch_id, "object": "batch", "endpoint": request["endpoint"],
                             "input_file_id": request["input_file_id"],
                             "completion_window": request["completion_window"], "status": "validating",
                             "created_at": int(time.time()), "output_file_id": None, "error_file_id": None}
                    server.batches[batch_id] = batch
                    server.run_batch(batch)
                return self._send(200, _public(batch))
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_GET(self):
            if not self._authorised():
                return
            match = re.fullmatch(r"/v1/files/([^/]+)/content", self.path)
            if match:
                return self._send(200, server.files[match.group(1)]["data"])
            match = re.fullmatch(r"/v1/batches/([^/?]+)", self.path)
            if match:
                return self._send(200, _public(server.poll_batch(match.group(1))))
            if self.path.startswith("/v1/batches"):
                data = [_public(b) for b in server.batches.values()]
                return self._send(200, {"object": "list", "data": data, "has_more": False,
                                        "first_id": data[0]["id"] if data else None,
                                        "last_id": data[-1]["id"] if data else None})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def _chat(self, request):
            sample = self.headers.get("X-Mme5-Sample-Id", "?/0")
            sample_id, _, attempt = sample.partition("/")
            fault = server.pick_fault(sample)
            with server.lock:
                server.requests.append((sample_id, int(attempt or 0), fault))
            if server.config.latency_s:
                time.sleep(server.config.latency_s)
            c = server.config
            if fault == "rate_limit":
                header = ("retry-after-ms", str(int(c.retry_after_s * 1000))) if c.retry_after_s < 1 \
                    else ("Retry-After", str(int(c.retry_after_s)))
                return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}}, [header])
            if fault == "server_error":
                return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
            if fault == "timeout":
                time.sleep(c.timeout_sleep_s)
                return self._drop()
            if fault == "disconnect":
                return self._drop()
            if fault == "malformed":
                return self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": ')
            body = server.completion(request, fault)
            server.bill(body)
            self._send(200, body)

    return Handler


def write_images(folder, count, side=16, seed=0):
    """`count` distinct random images: the image pool the fake world's samples are about."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--api-key", default="sk-test")
    args = parser.parse_args()
    server = FakeOpenAI(FakeConfig(api_key=args.api_key, latency_s=args.latency_ms / 1000,
                                   fault_rate=args.fault_rate)).start(args.port)
    print(server.base_url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

