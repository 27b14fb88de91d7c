"""`mme5-synth`: synthesise mmE5-style training records with GPT-4o or any OpenAI-compatible server.

    mme5-synth run --images DIR --out DIR --num-samples N [--mode online|batch] [--max-cost-usd X] ...
    mme5-synth status --out DIR

Rerunning the same `run` command continues an interrupted run: finished samples are never requested
again. The API key is read from $OPENAI_API_KEY (or --api-key-env) and never written anywhere.
"""
import argparse
import json
import logging
import sys

from data_synth.config import IMAGE_DETAILS, MODES, load_defaults


def _add_run_arguments(p):
    defaults = load_defaults()
    p.add_argument("--images", required=True,
                   help="image pool: a directory (searched recursively) or tfds:NAME[:SPLIT] (needs the tfds extra)")
    p.add_argument("--out", required=True, help="run directory: journal, shards, summary.json")
    p.add_argument("--num-samples", type=int, required=True, help="how many samples to plan")
    p.add_argument("--model", help=f"model name sent to the server (default {defaults['model']}); priced from "
                                   f"prices.yaml in --config-dir")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1 for vLLM")
    p.add_argument("--api-key-env", help=f"environment variable holding the key (default {defaults['api_key_env']})")
    p.add_argument("--concurrency", type=int, help=f"requests in flight (default {defaults['concurrency']})")
    p.add_argument("--requests-per-minute", type=int, help="request rate limit")
    p.add_argument("--tokens-per-minute", type=int, help="token rate limit (prompt bound + max completion)")
    p.add_argument("--max-cost-usd", type=float, help="hard cap on total spend in this --out, in USD")
    p.add_argument("--seed", type=int, help=f"plan seed (default {defaults['seed']})")
    p.add_argument("--languages", help="comma-separated language codes to restrict to (default: all 93)")
    p.add_argument("--mode", choices=MODES, help="online requests or the Batch API (half price)")
    p.add_argument("--image-index", help="precomputed embeddings .npy, one row per image in sorted path order")
    p.add_argument("--embedder", help="mme5 model path; embeds the pool with our Embedder instead of --image-index")
    p.add_argument("--image-detail", choices=IMAGE_DETAILS, help="image detail sent to the model")
    p.add_argument("--image-max-side", type=int, help="longest side images are scaled to before sending")
    p.add_argument("--max-attempts", type=int, help="strikes before a sample is parked")
    p.add_argument("--request-timeout-s", type=float, help="per-request timeout")
    p.add_argument("--max-completion-tokens", type=int, help="reply token limit per request")
    p.add_argument("--backoff-base-s", type=float, help="first retry delay when the server gives no Retry-After")
    p.add_argument("--batch-poll-s", type=float, help="seconds between batch status polls")
    p.add_argument("--batch-max-requests", type=int, help="requests per batch input file (API limit 50000)")
    p.add_argument("--retry-parked", action="store_true", default=None, help="give parked samples another try")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan's composition and cost estimate, send nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--config-dir", help="directory with defaults.yaml, languages.yaml, prices.yaml (default: the "
                                        "bundled mme5_jax/configs/synth)")


def build_parser():
    parser = argparse.ArgumentParser(prog="mme5-synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_arguments(sub.add_parser("run", help="plan and synthesise samples (resumes an interrupted run)"))
    status = sub.add_parser("status", help="what a run directory holds: records, parked, cost, budget left")
    status.add_argument("--out", required=True, help="run directory")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if args.command == "status":
        from data_synth.output import format_status, status

        summary = status(args.out)
        print(json.dumps(summary, indent=2) if args.json else format_status(summary))
        return 0
    from data_synth.run import Synthesis, resolve_settings

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    synthesis = Synthesis(resolve_settings(**overrides))
    if args.dry_run:
        print(json.dumps(synthesis.dry_run(), indent=2, ensure_ascii=False))
        return 0
    summary = synthesis.run()
    print(json.dumps({k: summary[k] for k in ("records", "planned", "parked", "remaining", "cost_usd",
                                              "stopped")}))
    return 1 if summary["stopped"] and summary["stopped"].startswith("fatal") else 0


if __name__ == "__main__":
    sys.exit(main())
