"""Scaling tables for docs/benchmarks.md: examples/s per device over 1, 2, 4, 8 CPU devices at a fixed per-device
batch, and a global-batch sweep with GradCache (fixed chunk) against plain backprop, with peak memory.

    python tools/bench_scaling.py [CONFIG] [--devices 1,2,4,8] [--per-device 2] [--batches 4,8,16,32] [--chunk 4]
                                  [--output scaling.json] [--chart scaling.png]

Each point is a fresh `mme5 bench` process (JAX needs the device count at start-up). Host devices share this
machine's cores, so per-device throughput on CPU measures the sharded program's overhead, not a pod's scaling.
Memory on CPU is XLA's static estimate of the step (arguments + outputs + temporaries).
"""
import argparse
import json
import os
import sys

from mme5_jax.bench.cli import draw_chart, run_point


def _ints(text):
    return [int(v) for v in text.split(",")]


def device_table(config, devices, per_device):
    rows = []
    for n in devices:
        point = run_point(config, [f"mesh.cpu_devices={n}", f"batch.pairs={per_device * n}"], False)
        rows.append(point)
        print(f"devices={n}:", point.get("error") or f"{point['per_chip']['examples_per_s']:.2f} examples/s/device",
              flush=True)
    lines = ["| devices | global batch | step median s (min-max) | examples/s per device | examples/s total | "
             "MFU | compile s |", "|---|---|---|---|---|---|---|"]
    for n, p in zip(devices, rows):
        if "error" in p:
            lines.append(f"| {n} | {per_device * n} | failed: {p['error']} | | | | |")
            continue
        s = p["step_time_s"]
        lines.append(f"| {n} | {per_device * n} | {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | "
                     f"{p['per_chip']['examples_per_s']:.2f} | {p['per_chip']['examples_per_s'] * n:.2f} | "
                     f"{100 * p['mfu']:.1f}% | {p['compile_s']:.1f} |")
    return rows, "\n".join(lines)


def batch_table(config, batches, chunk):
    rows = []
    for b in batches:
        for mode, extra in (("GradCache", [f"train.chunk_size={chunk}"]), ("backprop", [])):
            point = run_point(config, ["mesh.cpu_devices=1", f"batch.pairs={b}", *extra], False)
            point["mode"] = mode
            rows.append(point)
            print(f"batch={b} {mode}:", point.get("error") or f"{point['memory']['peak_bytes'] / 2**20:.0f} MiB",
                  flush=True)
    lines = ["| global batch | mode | step median s | examples/s | peak memory MiB | temporaries MiB |",
             "|---|---|---|---|---|---|"]
    for p in rows:
        b = p["overrides"][1].split("=")[1]
        if "error" in p:
            lines.append(f"| {b} | {p['mode']} | failed: {p['error']} | | | |")
            continue
        m = p["memory"]
        lines.append(f"| {b} | {p['mode']} (chunk {chunk})" if p["mode"] == "GradCache" else f"| {b} | {p['mode']}")
        lines[-1] += (f" | {p['step_time_s']['median']:.3f} | {p['per_chip']['examples_per_s']:.2f} | "
                      f"{m['peak_bytes'] / 2**20:.0f} | {m.get('temp_bytes', 0) / 2**20:.0f} |")
    return rows, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="cpu_scaling", help="bundled bench config name or YAML path")
    parser.add_argument("--devices", type=_ints, default=[1, 2, 4, 8], help="host device counts")
    parser.add_argument("--per-device", type=int, default=2, help="pairs per device in the device table")
    parser.add_argument("--batches", type=_ints, default=[4, 8, 16, 32], help="global batches of the GradCache sweep")
    parser.add_argument("--chunk", type=int, default=4, help="GradCache chunk size (examples)")
    parser.add_argument("--skip", choices=("devices", "batch"), help="skip one of the two tables")
    parser.add_argument("--output", default="scaling.json")
    parser.add_argument("--chart", help="PNG chart of the global-batch sweep")
    args = parser.parse_args(argv)

    result = {"config": args.config, "load_average": os.getloadavg()}
    if args.skip != "devices":
        result["devices"], table = device_table(args.config, args.devices, args.per_device)
        print("\n" + table + "\n")
    if args.skip != "batch":
        result["batch"], table = batch_table(args.config, args.batches, args.chunk)
        print("\n" + table + "\n")
        if args.chart:
            draw_chart(result["batch"], args.chart)
    result["load_average_end"] = os.getloadavg()
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
