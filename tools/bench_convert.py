"""Converter memory and speed on a random mid-size Mllama checkpoint written straight as safetensors (no torch).

Each measured step runs in its own child process, which records its resident set right after its imports (the
baseline) and its high-water mark at the end; the report gives the peak above baseline as a fraction of the
checkpoint size (the target: hf-to-jax within 0.5x of it). Throughput is reported beside a plain `safetensors`
load + save of the same files in the same run, so a busy machine still gives a fair ratio.

    python tools/bench_convert.py --workdir /tmp/bench_convert            # ~2.4 GB float32 checkpoint
    python tools/bench_convert.py --workdir /tmp/bc --layers 5 --hidden 1024   # quick smoke run
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def bench_config(hidden: int, layers: int):
    from mme5_jax.config import ModelConfig, TextConfig, VisionConfig

    vision = VisionConfig(hidden_size=512, num_hidden_layers=8, num_global_layers=2, num_attention_heads=8,
                          intermediate_size=2048, vision_output_dim=512 * 3, image_size=224, patch_size=14,
                          intermediate_layers_indices=(3, 7))
    text = TextConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=4, intermediate_size=int(hidden * 2.75) // 256 * 256,
                      cross_attention_layers=tuple(range(3, layers, 5)), bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    return ModelConfig(vision=vision, text=text, image_token_index=32000).validate()


def write_random_checkpoint(path: str, cfg, shard_bytes: int) -> int:
    """Random float32 tensors for every key of the config, streamed into safetensors shards; returns bytes."""
    from mme5_jax.hf.layout import installed_key
    from mme5_jax.hf.weights import LM_HEAD_KEY, weight_map
    from mme5_jax.hf.writer import SafetensorsShards

    os.makedirs(path)
    rng = np.random.default_rng(0)
    shapes = {k: t.hf_shape for k, t in weight_map(cfg).items()}
    shapes[LM_HEAD_KEY] = (cfg.text.vocab_size, cfg.text.hidden_size)
    shards = SafetensorsShards(path, shard_bytes)
    for key, shape in shapes.items():
        shards.add(installed_key(key, "installed"), rng.random(shape, np.float32) - 0.5)
    shards.close()
    cfg.save_pretrained(path)
    return shards.total_bytes


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(step: str, src: str, dst: str) -> dict:
    """One measured step in this (fresh) process."""
    import orbax.checkpoint  # noqa: F401  imports belong to the baseline, not to the conversion
    import orbax.checkpoint.experimental.v1  # noqa: F401
    from safetensors.numpy import load_file, save_file

    from mme5_jax import convert

    baseline = rss_bytes("VmRSS")
    start = time.perf_counter()
    if step == "hf-to-jax":
        convert.hf_to_jax(src, dst, progress=False)
    elif step == "jax-to-hf":
        convert.jax_to_hf(src, dst, progress=False)
    else:  # the peer: safetensors load + save of every file
        os.makedirs(dst)
        for name in sorted(os.listdir(src)):
            if name.endswith(".safetensors"):
                save_file(load_file(os.path.join(src, name)), os.path.join(dst, name), metadata={"format": "pt"})
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline_rss": baseline, "peak_rss": rss_bytes("VmHWM")}


def run_child(step: str, src: str, dst: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, src, dst], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bit_exact(a_dir: str, b_dir: str) -> bool:
    from mme5_jax.hf.reader import HFCheckpoint

    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    return a.keys() == b.keys() and all(np.array_equal(a.get(k).view(np.uint8), b.get(k).view(np.uint8))
                                        for k in a.keys())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="fresh scratch directory (needs about 3x the checkpoint size)")
    parser.add_argument("--hidden", type=int, default=2048, help="text hidden size (2048)")
    parser.add_argument("--layers", type=int, default=10, help="text layers, cross-attention every 5th (10)")
    parser.add_argument("--shard-size-mb", type=int, default=1000, help="source shard size (1000 MB)")
    parser.add_argument("--output", help="also write the report as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    if not args.workdir:
        parser.error("--workdir is required")
    if os.path.exists(args.workdir):
        raise SystemExit(f"{args.workdir} exists; pass a fresh --workdir")
    os.makedirs(args.workdir)
    hf_dir, ours, back, peer = (os.path.join(args.workdir, n) for n in ("hf", "ours", "back", "peer"))
    cfg = bench_config(args.hidden, args.layers)
    start = time.perf_counter()
    size = write_random_checkpoint(hf_dir, cfg, args.shard_size_mb * 10 ** 6)
    print(f"wrote random checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f}s ({hf_dir})")
    report = {"checkpoint_bytes": size, "config": {"hidden": args.hidden, "layers": args.layers}}
    for step, src, dst in (("safetensors load+save", hf_dir, peer), ("hf-to-jax", hf_dir, ours),
                           ("jax-to-hf", ours, back)):
        result = run_child(step, src, dst)
        above = result["peak_rss"] - result["baseline_rss"]
        result.update(mb_per_s=size / 1e6 / result["seconds"], peak_above_baseline=above,
                      peak_fraction_of_checkpoint=above / size)
        report[step] = result
        if step == "safetensors load+save":
            shutil.rmtree(dst)
        print(f"{step:>22}: {result['mb_per_s']:7.1f} MB/s ({result['seconds']:.1f}s), peak RSS above baseline "
              f"{above / 1e9:.2f} GB = {above / size:.2f}x checkpoint")
    report["round_trip_bit_exact"] = bit_exact(hf_dir, back)
    print(f"HF -> ours -> HF bit-exact: {report['round_trip_bit_exact']}")
    peer_speed = report["safetensors load+save"]["mb_per_s"]
    for step in ("hf-to-jax", "jax-to-hf"):
        report[step]["speed_vs_safetensors"] = report[step]["mb_per_s"] / peer_speed
        print(f"{step} speed / safetensors load+save: {report[step]['speed_vs_safetensors']:.2f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
