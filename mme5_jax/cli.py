"""The `mme5` command. Each subcommand lives in the module that owns its idea; this file only dispatches.

Modules are imported lazily so that `mme5 --help` and light commands do not pay for JAX start-up.
A command module provides `add_arguments(parser)` and `run(args) -> int | None`.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "embed": ("mme5_jax.embedder", "Encode (text, image) items from a JSONL file into L2-normalised embeddings."),
    "data": ("mme5_jax.data.cli", "Import released mmE5 parquet data into records, or print a record set's stats."),
    "eval": ("mme5_jax.eval.cli", "Score a model on local MMEB-eval or XTD-10 copies; write results.json, a report."),
    "convert": ("mme5_jax.convert", "Convert HF Mllama weights to and from our Orbax checkpoint; inspect either."),
    "demo-data": ("mme5_jax.data.demo", "Write the small, deterministic, multilingual demo dataset and photos."),
    "bench": ("mme5_jax.bench.cli", "Benchmark the train step: examples/s, tokens/s, MFU/HFU per chip, time, memory."),
    "train": ("mme5_jax.train", "Train LoRA/DoRA adapters with InfoNCE from a YAML config (resumes from output_dir)."),
    "plan": ("mme5_jax.plan.cli", "Compile the train step for a TPU topology ahead of time: memory, FLOPs, roofline."),
}


def _build_parser(command=None):
    parser = argparse.ArgumentParser(prog="mme5", description="mmE5 multimodal embeddings in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        _build_parser().error(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    parser = _build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    rc = importlib.import_module(COMMANDS[args.command][0]).run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
