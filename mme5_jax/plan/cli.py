"""`mme5 plan CONFIG --topology NAME [key=value ...] [--step train|embed] [--search pairs|chunk] --output plan.json`.

Compiles the real program for a TPU topology on this host (libtpu, no chips) and reports per chip: memory against
HBM, loop-aware FLOPs and bytes, the roofline step time and the MFU it bounds. See docs/tpu.md.
"""
import json
import os
import sys

DESCRIPTION = (
    "Compile the real train step (or, with --step embed, the embedding forward of `mme5 eval`/`mme5 embed`) for a "
    "TPU topology ahead of time, on any host with libtpu (pip install 'mme5-jax[tpu]'); nothing runs and no weights "
    "are loaded. Prints and writes per chip: memory (arguments, outputs, temporaries, code, peak) against the chip's "
    "HBM; FLOPs and HBM bytes counted with every loop's trip count; the roofline step time max(FLOPs / peak, "
    "bytes / HBM bandwidth); the FLOPs model's count and the MFU it bounds. These are the compiler's estimates, "
    "not measurements. CONFIG is a training config (mme5_zero_shot, a YAML path) or a bench config (cpu_small); "
    "its mesh section must cover the topology's chips, e.g. "
    "`mme5 plan mme5_zero_shot include=mesh/v5p-64.yaml model.config=llama-3.2-11b-vision --topology v5p-64`.")


def add_arguments(parser):
    parser.description = DESCRIPTION
    parser.add_argument("config", help="training config (mme5_zero_shot, demo, a YAML path) or bench config "
                                       "(cpu_small, gpu_11b, a YAML path)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. include=mesh/v5p-64.yaml model.config=llama-3.2-11b-vision "
                             "data.global_batch_size=2048 train.chunk_size=64")
    parser.add_argument("--topology", required=True,
                        help="TPU topology: libtpu's GEN:AxB[xC] (v5p:2x4x4, v6e:16x16) or a slice name GEN-N "
                             "(v5p-64: 32 chips, v5p counts TensorCores; v6e-256, v5e-16 count chips)")
    parser.add_argument("--step", choices=("train", "embed"), default="train",
                        help="train: the trainer's step (default); embed: one embedding batch of the base model")
    parser.add_argument("--embed-rows", type=int, default=None,
                        help="rows of the embedding batch (default: eval.batch_size, or batch.pairs of a bench "
                             "config)")
    parser.add_argument("--search", choices=("pairs", "chunk"), default=None,
                        help="pairs: the largest global batch (whole pairs, or rows for --step embed, per batch "
                             "shard) that fits; chunk: the largest GradCache chunk (fewest passes) that fits")
    parser.add_argument("--max-pairs-per-chip", type=int, default=1024,
                        help="upper end of --search pairs, per batch shard (default 1024)")
    parser.add_argument("--hbm-fraction", type=float, default=0.9,
                        help="share of the chip's HBM a plan may use to count as fitting (default 0.9: the runtime "
                             "and fragmentation take the rest)")
    parser.add_argument("--image-shares", default=None, metavar="QUERY,TARGET",
                        help="training configs: the shares of queries and of targets (hard negatives alike) that carry "
                             "an image, which size the packed image batch (default: mmE5's synthetic mix, "
                             "0.857,0.357; 1,1 is the upper bound, an image in every slot)")
    parser.add_argument("--output", default="plan.json", help="where to write the plan (default plan.json)")
    parser.add_argument("--hlo", default=None, metavar="PATH",
                        help="also write the compiled program's HLO text there (what the FLOPs and bytes walk reads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines while compiling")


def plan_once(work, topology, step, hbm_fraction, rows=None, progress=True, command=None, hlo_path=None):
    """Compile one program and return its plan dict."""
    from mme5_jax.plan.aot import compile_for
    from mme5_jax.plan.report import make_plan

    rows = rows or (work.pairs if step == "train" else work.embed_rows)
    result = compile_for(work, topology, step, embed_rows=rows, progress=progress)
    if hlo_path:
        with open(hlo_path, "w", encoding="utf-8") as f:
            f.write(result.compiled.as_text())
    return make_plan(work, topology, result, step, hbm_fraction, rows, command)


def _probe_line(label, plan):
    from mme5_jax.plan.report import format_bytes

    m = plan["memory_per_chip"]
    return (f"{label}: peak {format_bytes(m['peak'])} of budget {format_bytes(m['budget'])} -> "
            f"{'fits' if m['fits'] else 'does not fit'}")


def search(work, topology, kind, step="train", hbm_fraction=0.9, max_per_shard=1024, progress=True, command=None):
    """-> (plan of the best candidate or None, probes [{candidate, fits, peak}] in candidate order)."""
    from mme5_jax.plan.aot import PlanError
    from mme5_jax.plan.search import bisect, chunk_candidates, pair_candidates

    m = work.mesh
    shards = (m["data"] if m["data"] != -1 else topology.chips // (m["fsdp"] * m["tensor"])) * m["fsdp"]
    if kind == "chunk":
        if step != "train":
            raise PlanError("--search chunk applies to --step train")
        candidates = chunk_candidates(work, shards)

        def variant(c):
            return work.with_chunk(c), None
    else:
        candidates = pair_candidates(work if step == "train" else work.with_chunk(None), shards, max_per_shard)

        def variant(p):
            return (work.with_pairs(p), None) if step == "train" else (work, p)

    plans = {}

    def fits(candidate):
        w, rows = variant(candidate)
        plan = plan_once(w, topology, step, hbm_fraction, rows, progress, command)
        plans[candidate] = plan
        print(_probe_line(f"{kind}={candidate}", plan), flush=True)
        return plan["memory_per_chip"]["fits"], plan

    best, probes = bisect(candidates, fits)
    record = [{"candidate": candidates[i], "fits": ok, "peak": plan["memory_per_chip"]["peak"]}
              for i, (ok, plan) in sorted(probes.items())]
    return (plans[candidates[best]] if best >= 0 else None), record


def cpu_runtime_env():
    """Keep JAX's runtime on the CPU and let several processes load libtpu at once (libtpu otherwise takes a lock
    file); tell libtpu it is on one host, so that it does not query a TPU VM's metadata and log errors about the
    worker list. Only effective before JAX is imported."""
    for key, value in (("JAX_PLATFORMS", "cpu"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(key, value)


def run(args):
    cpu_runtime_env()  # first: importing the modules below starts JAX
    from mme5_jax.plan.topology import TopologyError, parse_topology, require_libtpu

    try:
        topology = parse_topology(args.topology)
        require_libtpu()
    except (TopologyError, RuntimeError) as err:
        print(f"mme5 plan: error: {err}", file=sys.stderr)
        return 2
    if not 0 < args.hbm_fraction <= 1:
        print(f"mme5 plan: error: --hbm-fraction {args.hbm_fraction} must be in (0, 1]", file=sys.stderr)
        return 2

    from mme5_jax import config as model_config
    from mme5_jax.plan.aot import PlanError
    from mme5_jax.plan.report import format_table
    from mme5_jax.plan.workload import load_workload
    from mme5_jax.yaml_config import ConfigError

    command = ["mme5", "plan", *sys.argv[2:]] if sys.argv[1:2] == ["plan"] else None
    try:
        work = load_workload(args.config, args.overrides)
        if args.image_shares is not None:
            work = work.with_image_shares(parse_shares(args.image_shares))
        if args.search:
            plan, probes = search(work, topology, args.search, args.step, args.hbm_fraction,
                                  args.max_pairs_per_chip, not args.no_progress, command)
            if plan is None:
                print(f"mme5 plan: nothing fits: the smallest {args.search} probed needs more than the budget",
                      file=sys.stderr)
                _write(args.output, {"search": args.search, "probes": probes, "best": None})
                return 1
            plan = {**plan, "search": {"kind": args.search, "probes": probes}}
        else:
            plan = plan_once(work, topology, args.step, args.hbm_fraction, args.embed_rows, not args.no_progress,
                             command, args.hlo)
    except (ConfigError, model_config.ConfigError, PlanError) as err:
        print(f"mme5 plan: error: {err}", file=sys.stderr)
        return 2
    plan["config"] = work.config
    _write(args.output, plan)
    print(format_table(plan))
    print(f"wrote {args.output}")
    return 0


def parse_shares(text):
    from mme5_jax.plan.aot import PlanError

    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 2 or not all(0 <= x <= 1 for x in shares):
        raise PlanError(f"--image-shares {text!r}: give two shares in [0, 1], e.g. 0.857,0.357")
    return shares


def _write(path, plan):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=2, default=str)
