"""`mme5 bench CONFIG [key=value ...] --output bench.json`: train-step throughput, MFU and HFU per chip.

With `--sweep KEY=V1,V2,...` (repeatable; the product of all sweeps is run) each point runs in a fresh process, so
JAX can start with the point's device count (`mesh.cpu_devices`), and bench.json holds every point; `--chart`
draws examples/s per chip and peak memory against the swept values.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile


def add_arguments(parser):
    parser.add_argument("config", help="bundled bench config name (e.g. cpu_small) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. batch.pairs=16 train.chunk_size=4 remat=full")
    parser.add_argument("--output", default="bench.json", help="where to write the results (default bench.json)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="run every value (product over repeated --sweep), one process per point")
    parser.add_argument("--chart", help="PNG chart of a sweep (examples/s per chip and peak memory)")
    parser.add_argument("--xla-flops", action="store_true",
                        help="also count the step's FLOPs with XLA cost_analysis (an extra, unrolled compile)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _sweep_points(sweeps):
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--sweep {item!r}: expected KEY=V1,V2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)]


def run_point(config, overrides, xla_flops):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "point.json")
        cmd = [sys.executable, "-m", "mme5_jax.cli", "bench", config, *overrides, "--output", out, "--no-progress"]
        if xla_flops:
            cmd.append("--xla-flops")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"overrides": overrides, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        with open(out, encoding="utf-8") as f:
            return {"overrides": overrides, **json.load(f)}


def draw_chart(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in points if "error" not in p]
    common = set.intersection(*(set(p["overrides"]) for p in ok)) if ok else set()
    labels = ["\n".join(o for o in p["overrides"] if o not in common) or "base" for p in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(ok) + 4), 4.5))
    ax1.bar(labels, [p["per_chip"]["examples_per_s"] for p in ok], color="tab:blue")
    ax1.set_ylabel("examples / s / chip")
    ax2.bar(labels, [p["memory"]["peak_bytes"] / 2**20 for p in ok], color="tab:orange")
    ax2.set_ylabel("peak memory per device (MiB)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7)
    if common:
        fig.suptitle(" ".join(sorted(common)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(result):
    s, c = result["step_time_s"], result["per_chip"]
    return (f"compile {result['compile_s']:.1f} s | step median {s['median']:.3f} s (min {s['min']:.3f}, "
            f"max {s['max']:.3f}) | {c['examples_per_s']:.2f} examples/s/chip, {c['text_tokens_per_s']:.0f} "
            f"tokens/s/chip, {c['image_tiles_per_s']:.2f} tiles/s/chip | {c['model_tflops_per_s']:.3f} model "
            f"TFLOP/s/chip, MFU {100 * result['mfu']:.1f}%, HFU {100 * result['hfu']:.1f}% "
            f"(peak: {result['peak']['name']}) | peak memory {result['memory']['peak_bytes'] / 2**20:.0f} MiB")


def run(args):
    from mme5_jax.bench.runner import load_config

    load_config(args.config, args.overrides)  # fail fast on a bad key before any process starts
    if args.sweep:
        points = []
        for extra in _sweep_points(args.sweep):
            point = run_point(args.config, [*args.overrides, *extra], args.xla_flops)
            points.append(point)
            print(" ".join(extra), "->", point.get("error") or _summary(point), flush=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "sweep": points}, f, indent=2)
        if args.chart:
            draw_chart(points, args.chart)
        return 0 if all("error" not in p for p in points) else 1

    from mme5_jax.bench.runner import run_bench, xla_step_flops

    config = load_config(args.config, args.overrides)
    result = run_bench(config, progress=not args.no_progress)
    if args.xla_flops:
        xla = xla_step_flops(config)
        result["flops_per_step"]["xla_cost_analysis"] = xla
        result["flops_per_step"]["hardware_over_xla"] = result["flops_per_step"]["hardware"] / xla
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(_summary(result))
    return 0
