"""Client-side throughput of `mme5-synth` against the fake OpenAI server (tests/fake_openai_server.py).

The server runs in its own process with a fixed latency, so what is measured is our processing:
request building, the scheduler, reply validation, journaling and record writing. The peer in the same
run is the bare `openai` client sending the same bodies at the same concurrency and doing nothing else;
the ratio says how much of the client's capacity the synthesis machinery keeps. The two alternate for
`--rounds` rounds and the best of each is reported, since other work on a shared machine comes and goes.

    python tools/bench_synth.py --samples 2000 --rounds 3 --concurrency 64 --latency-ms 10
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import numpy as np
from PIL import Image

from data_synth.client import make_client
from data_synth.run import Synthesis, resolve_settings

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder, count, side):
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")


async def bare_client(synthesis, base_url, concurrency):
    """The peer: the same request bodies through the bare client, no scheduling, checks or journal."""
    client = make_client(base_url, "OPENAI_API_KEY", 60, concurrency)
    bodies = [synthesis.request(spec)[0] for spec in synthesis.specs]
    queue = list(reversed(bodies))

    async def worker():
        while queue:
            response = await client.post("/chat/completions", cast_to=httpx2.Response, body=queue.pop())
            json.loads(response.content)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--image-side", type=int, default=64)
    args = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = "sk-bench"
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), "--latency-ms",
                               str(args.latency_ms), "--api-key", "sk-bench"], stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            images = Path(tmp) / "images"
            images.mkdir()
            make_images(images, args.images, args.image_side)
            synth_rates, bare_rates = [], []
            for round_ in range(args.rounds):  # alternate the two, best of each: other load on the machine varies
                settings = resolve_settings(images=str(images), out=str(Path(tmp) / f"out{round_}"),
                                            num_samples=args.samples, base_url=base_url,
                                            concurrency=args.concurrency, progress=False,
                                            requests_per_minute=10**9, tokens_per_minute=10**12)
                synthesis = Synthesis(settings)
                start = time.perf_counter()
                summary = synthesis.run()
                synth_rates.append(args.samples / (time.perf_counter() - start))
                assert summary["records"] == args.samples, summary
                bare_rates.append(args.samples / asyncio.run(bare_client(synthesis, base_url, args.concurrency)))
    finally:
        server.terminate()
        server.wait()
    result = {"samples": args.samples, "rounds": args.rounds, "concurrency": args.concurrency,
              "latency_ms": args.latency_ms, "cpu_cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              "synth_samples_per_s": round(max(synth_rates), 1),
              "bare_client_requests_per_s": round(max(bare_rates), 1),
              "ratio_synth_vs_bare_client": round(max(synth_rates) / max(bare_rates), 3),
              "all_synth_rates": [round(r, 1) for r in synth_rates],
              "all_bare_rates": [round(r, 1) for r in bare_rates]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
