"""How fast can one training step get on this CPU? The ceiling behind the speed-up against HF + PEFT.

    python tools/cpu_ceiling.py [CONFIG] [key=value ...] [--threads 2] [--steps 5] [--output F]

The step's FLOPs (mme5_jax.bench.flops, hardware count) are split into dense matmuls and attention, and each part
is priced at the best rate measured here for its shapes:
- dense: XLA and torch on the vision tower's and the text decoder's matmul shapes, and a 1024 x 1024 square;
- attention: XLA through our `attention` (what our step runs), and torch's fused CPU SDPA, with the model's mask
  and with none (the fastest CPU attention kernel at hand).
Everything else (norms, activations, softmax outside SDPA, the optimiser) is priced at zero, so both ceilings are
generous: "XLA" uses XLA's matmuls and our attention as XLA compiles it (our step cannot beat it without a faster
attention), "best" the faster kernel of either framework for each part (what native kernels as fast as torch's
would allow). Each is set against HF + PEFT's step, measured here with `--steps` steps. Timings on a shared
machine are noisy: each kernel keeps the best of `--repeats`.
"""
import argparse
import json
import math
import statistics
import sys
import time


def split_flops(step_flops):
    """{"dense", "attention"} FLOPs of one step from a StepFlops breakdown (hardware count: masked attention
    included; GradCache's extra forward and remat's recompute, which mix both, count as dense)."""
    split = {"dense": 0.0, "attention": 0.0}
    for key, value in step_flops.breakdown.items():
        kind = key.split("/")[1]
        total = value["fwd"] + value["bwd"] if isinstance(value, dict) else value
        split["attention" if kind.endswith("attention") else "dense"] += total
    return split


def ceilings(split, rates):
    """Seconds per step with each part at the given FLOP/s; rates {"dense": {name: r}, "attention": {name: r}}.
    -> {"xla": s, "best": s}: XLA's own kernels, and the fastest kernel of any framework for each part."""
    xla = split["dense"] / rates["dense"]["xla"] + split["attention"] / rates["attention"]["xla"]
    best = sum(split[part] / max(rates[part].values()) for part in split)
    return {"xla": xla, "best": best}


def best_seconds(fn, repeats):
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_shapes(config, cfg):
    """(m, k, n) of the step's matmuls: the vision tower's over all query tiles, the decoder's over all tokens."""
    b, v, t = config["batch"], cfg.vision, cfg.text
    shapes = [(1024, 1024, 1024)]
    if b["query_tiles"]:
        rows = b["pairs"] * b["query_tiles"] * v.padded_num_patches
        shapes += [(rows, v.hidden_size, v.hidden_size), (rows, v.hidden_size, v.intermediate_size),
                   (rows, v.intermediate_size, v.hidden_size)]
    rows = b["pairs"] * (b["query_tokens"] + b["target_tokens"])
    shapes += [(rows, t.hidden_size, t.hidden_size), (rows, t.hidden_size, t.intermediate_size),
               (rows, t.intermediate_size, t.hidden_size)]
    return shapes


def dense_rates(shapes, repeats):
    """Best FLOP/s over `shapes` -> ({"xla": r, "torch": r}, per-shape rows)."""
    import jax
    import jax.numpy as jnp
    import torch

    dot = jax.jit(lambda a, w: jnp.dot(a, w, precision=jax.lax.Precision.HIGHEST))
    rows = []
    for m, k, n in shapes:
        a, w = jax.random.normal(jax.random.key(0), (m, k)), jax.random.normal(jax.random.key(1), (k, n))
        ta, tw = torch.randn(m, k), torch.randn(k, n)
        flops = 2.0 * m * k * n
        rows.append({"shape": [m, k, n], "xla": flops / best_seconds(lambda: dot(a, w).block_until_ready(), repeats),
                     "torch": flops / best_seconds(lambda: ta @ tw, repeats)})
    return {side: max(r[side] for r in rows) for side in ("xla", "torch")}, rows


def attention_rates(config, cfg, repeats):
    """FLOP/s of the step's main attention (the vision tower's over all tiles of an image, else the decoder's causal
    self-attention): ours through XLA, torch's SDPA with the model's mask and with none."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from mme5_jax.model.layers import NEG_INF, attention
    from mme5_jax.model.masks import CausalMask, PaddingPairMask

    b = config["batch"]
    if b["query_tiles"]:
        vision = cfg.vision
        heads, length = vision.num_attention_heads, b["query_tiles"] * vision.padded_num_patches
        head_dim = vision.hidden_size // heads
        invalid = np.tile(np.arange(length) % vision.padded_num_patches >= vision.num_patches, (b["pairs"], 1))
        mask = PaddingPairMask(jnp.asarray(invalid))
        bias = np.where(np.asarray(mask.allowed(jnp.arange(length))), 0.0, NEG_INF).astype(np.float32)
        sdpa_mask = {"attn_mask": torch.from_numpy(bias)}
    else:
        t = cfg.text
        heads, length, head_dim = t.num_attention_heads, b["query_tokens"], t.hidden_size // t.num_attention_heads
        mask = CausalMask(jnp.ones((b["pairs"], length), bool))
        sdpa_mask = {"is_causal": True}
    shape = (b["pairs"], length, heads, head_dim)
    flops = 4.0 * b["pairs"] * heads * length * length * head_dim
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
    ours = jax.jit(lambda q, k, v: attention(q, k, v, mask))
    tq, tk, tv = (torch.randn(shape).transpose(1, 2).contiguous() for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"xla": flops / best_seconds(lambda: ours(q, k, v).block_until_ready(), repeats),
            "torch_sdpa_masked": flops / best_seconds(lambda: sdpa(tq, tk, tv, **sdpa_mask), repeats),
            "torch_sdpa_unmasked": flops / best_seconds(lambda: sdpa(tq, tk, tv), repeats)}, list(shape)


def hf_step_seconds(config, cfg, threads, steps):
    """Median of `steps` HF + PEFT steps after one warmup step (tools/bench_vs_torch.py's torch side)."""
    from bench_vs_torch import timed, torch_step_fn

    from mme5_jax.bench.runner import synthetic_rows

    step, _ = torch_step_fn(config, cfg, synthetic_rows(config, cfg, config["seed"]), threads)
    step()
    return statistics.median(timed(step)[0] for _ in range(steps))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="cpu_small", help="bundled bench config name or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. batch.pairs=4")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (XLA uses the host cores)")
    parser.add_argument("--steps", type=int, default=5, help="HF + PEFT steps timed (median reported)")
    parser.add_argument("--repeats", type=int, default=20, help="timings per kernel (the best is kept)")
    parser.add_argument("--output", help="write the measurements here as JSON")
    args = parser.parse_args(argv)

    import torch

    from mme5_jax.bench.runner import config_step_flops, load_config, model_config, select_devices

    torch.set_num_threads(args.threads)
    config = load_config(args.config, ["mesh.cpu_devices=1", *args.overrides])
    select_devices(config)
    cfg = model_config(config)
    split = split_flops(config_step_flops(config, cfg))
    dense, dense_rows = dense_rates(matmul_shapes(config, cfg), args.repeats)
    attention, attention_shape = attention_rates(config, cfg, args.repeats)
    rates = {"dense": dense, "attention": attention}
    bounds = ceilings(split, rates)
    hf = hf_step_seconds(config, cfg, args.threads, args.steps)

    def gflop(x):
        return f"{x / 1e9:.1f}"
    print(f"step FLOPs (hardware): {gflop(split['dense'])} G dense, {gflop(split['attention'])} G attention")
    for row in dense_rows:
        print(f"  matmul {'x'.join(map(str, row['shape'])):>16}: XLA {gflop(row['xla']):>6}, "
              f"torch {gflop(row['torch']):>6} GFLOP/s")
    print(f"  attention {attention_shape} (B, L, H, D): " +
          ", ".join(f"{name} {gflop(r)}" for name, r in attention.items()) + " GFLOP/s")
    print(f"HF + PEFT step: {hf:.3f} s (median of {args.steps})")
    for name, seconds in bounds.items():
        print(f"ceiling with {'XLA' if name == 'xla' else 'the best'} kernels, all other work free: "
              f"{seconds:.3f} s/step -> at most {hf / seconds:.2f}x over HF + PEFT")
    result = {"config": args.config, "overrides": args.overrides, "threads": args.threads, "flops": split,
              "rates": rates, "matmuls": dense_rows, "attention_shape": attention_shape, "hf_step_s": hf,
              "ceiling_s": bounds, "max_speedup": {name: hf / s for name, s in bounds.items()}}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
