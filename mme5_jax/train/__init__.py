"""`mme5 train CONFIG.yaml [key=value ...]`: LoRA/DoRA InfoNCE training from a YAML config, resumable.

A run lives in `output_dir`:

    config.yaml            the resolved config (what `mme5 convert jax-to-hf` reads to rebuild the model)
    base/                  the frozen base weights when the model is randomly initialised (tiny demo models)
    checkpoints/<step>/    Orbax: adapters + optimiser state + step + nonfinite_steps, and the data position
                           (entries of the global order consumed); async, last `checkpoint.keep` kept
    metrics.jsonl          one JSON line per logged step / evaluation
    tensorboard/           the same scalars for TensorBoard
    curves.png             loss and held-out recall@1 over steps

Relaunching the same command resumes from the latest complete checkpoint: Orbax writes each step into a
temporary directory and renames it only when every item of every process is written, so a run killed
mid-save resumes from the checkpoint before. SIGTERM (a TPU maintenance event's or SLURM's notice) checkpoints
the step in flight and exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: try again), so a job script can relaunch.
Neither the adapters nor the data position depend on the mesh or the number of processes, so the relaunch may run
on another slice (P x D processes x devices as P' x D') with the same global batch: the stream continues with no
example skipped or repeated.

Modules: `config` (the schema; no JAX), `startup` (JAX start-up, demo inputs), `build` (mesh, model, data),
`checkpoints`, `heldout` (evaluation through `mme5_jax.eval`), `metrics`, and `loop` (`train`). The names below
are importable from here; each module is imported on first use, so that reading a config does not start JAX.
"""
import importlib
import logging
import sys
from pathlib import Path

from mme5_jax.train.config import TrainConfig, TrainConfigError, load_config, processor_dir

PREEMPTED_EXIT_CODE = 75
_LAZY = {
    "train": "loop", "NonFiniteLossError": "loop",
    "build_model": "build", "random_base_model": "build", "pipeline_config": "build",
    "train_record_sets": "build", "plan_steps": "build",
    "RunCheckpoints": "checkpoints", "DataPosition": "checkpoints", "restore_adapters": "checkpoints",
    "save_random_base": "checkpoints",
    "read_metrics": "metrics",
}
__all__ = ["TrainConfig", "TrainConfigError", "load_config", "processor_dir", "add_arguments", "run"] + list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def add_arguments(parser):
    parser.description = ("Train LoRA/DoRA adapters with InfoNCE from a YAML config; relaunching the same command "
                          "resumes from the latest checkpoint in output_dir. On SIGTERM the run checkpoints the step "
                          f"in flight and exits with code {PREEMPTED_EXIT_CODE}.")
    parser.add_argument("config", metavar="CONFIG.yaml",
                        help="training config: a YAML path, or a bundled config's name (demo, mme5_zero_shot, "
                             "mme5_supervised)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, values parsed as YAML, e.g. train.steps=100 model.dtype=bfloat16")


def run(args):
    # Imported here, not at the top: the loop imports JAX, and `mme5 train --help` should not wait for it.
    from mme5_jax.train.loop import NonFiniteLossError, train

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mme5_jax").setLevel(logging.INFO)
    try:
        config = load_config(args.config, args.overrides)
        summary = train(config)
    except (TrainConfigError, NonFiniteLossError) as err:
        print(f"mme5 train: error: {err}", file=sys.stderr)
        return 2
    if summary.get("preempted"):
        print(f"preempted: stopped at step {summary['step']} with a checkpoint; run the same command to resume")
        return PREEMPTED_EXIT_CODE
    print(f"finished at step {summary['step']}; checkpoints in {Path(config.output_dir) / 'checkpoints'}")
    return 0
