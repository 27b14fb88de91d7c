"""Our train step against Hugging Face transformers + PEFT in PyTorch, alternating in one process; prints the ratio.

    python tools/bench_vs_torch.py [CONFIG] [key=value ...] [--steps 5] [--warmup 2] [--threads 2] [--output F]
    python tools/bench_vs_torch.py gpu_11b --torch-only --device cuda --gradient-checkpointing   (GPU script)
    python tools/bench_vs_torch.py --table ours.json torch.json                                 (its table)

Both sides run the same recipe on the same synthetic inputs and sizes (default: the bundled `bench/cpu_small.yaml`):
queries with one image, text-only targets, LoRA on the language model, InfoNCE over the batch, AdamW with global
norm clipping. The torch side is the natural HF implementation: the inner `MllamaModel` (no lm_head), queries
and targets encoded in two calls at their own lengths, SDPA attention, and PEFT's LoRA layers.

Steps alternate (torch, ours, torch, ours, ...), so machine load hits both alike; each side's time is the median
of `--steps` steps after `--warmup` untimed ones. Our compile time is reported separately.
"""
import argparse
import json
import os
import statistics
import sys
import time


def peft_targets(config, cfg):
    """PEFT's exact module names for the modules our adapter targets select (so both sides adapt the same set)."""
    from flax import nnx

    from mme5_jax.bench.runner import adapter_config
    from mme5_jax.model import lora
    from mme5_jax.model.mllama import MllamaModel

    def adapted():
        model = MllamaModel(cfg, rngs=nnx.Rngs(0))
        lora.add_adapters(model, adapter_config(config), nnx.Rngs(0))
        return model

    return lora.peft_target_modules(nnx.eval_shape(adapted))


def torch_step_fn(config, cfg, host_batch, threads, device="cpu", gradient_checkpointing=False):
    """-> (step(), number of trainable params): one HF + PEFT InfoNCE step with AdamW on the given batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(config["seed"])
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config["dtype"]]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    with torch.device(device):
        hf = MllamaForConditionalGeneration(MllamaConfig(**cfg.to_hf_dict("installed")))
    torch.set_default_dtype(default_dtype)
    a = config["adapter"]
    peft_cfg = LoraConfig(r=a["rank"], lora_alpha=a["alpha"], lora_dropout=a["dropout"], init_lora_weights="gaussian",
                          use_dora=a["kind"] == "dora", target_modules=peft_targets(config, cfg))
    model = get_peft_model(hf, peft_cfg)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    encoder = model.base_model.model.model  # MllamaModel with PEFT layers in place; no lm_head
    params = [p for p in model.parameters() if p.requires_grad]
    t = config["train"]
    optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"], betas=(0.9, 0.999), eps=1e-8)

    def tensors(slot):
        keys = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                "cross_attention_mask")
        return {key: (torch.from_numpy(value).to(torch_dtype) if key == "pixel_values"
                      else torch.from_numpy(value).long()).to(device)
                for key, value in host_batch[slot].items() if key in keys}

    query, target = tensors("query"), tensors("positive")

    def embed(inputs):
        hidden = encoder(**inputs).last_hidden_state
        last = inputs["attention_mask"].sum(1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        return torch.nn.functional.normalize(pooled, dim=-1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        q, p = embed(query), embed(target)
        logits = q @ p.T / t["temperature"]
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(q.shape[0], device=logits.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        return loss.item()  # waits for the device

    return step, sum(p.numel() for p in params)


def jax_step_fn(config):
    """-> (step(), compile seconds, number of trainable params) for our train step."""
    import jax

    from mme5_jax.bench.runner import build

    cfg, mesh, step, state, batch = build(config)
    rng = jax.random.PRNGKey(config["seed"])
    start = time.perf_counter()
    step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state, "i": 0}
    trainable = sum(x.size for x in jax.tree.leaves(state.trainable))

    def run():
        holder["i"] += 1
        holder["state"], metrics = step(holder["state"], batch, jax.random.fold_in(rng, holder["i"]))
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])

    return cfg, run, compile_s, trainable


def timed(fn):
    """-> (wall seconds, process CPU seconds, loss). CPU time (all threads) is the load-robust figure on a shared
    machine: waiting for a core costs wall time, not CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def torch_only(args, config):
    """The torch side alone on `--device` (GPU runs: each side in its own process, so memory is not shared)."""
    import torch

    from mme5_jax.bench.peaks import table_peak
    from mme5_jax.bench.runner import config_step_flops, model_config, synthetic_rows

    cfg = model_config(config)
    step, params = torch_step_fn(config, cfg, synthetic_rows(config, cfg, config["seed"]), args.threads,
                                 args.device, args.gradient_checkpointing)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak_memory = torch.cuda.max_memory_allocated if args.device == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        try:
            seconds, _, loss = timed(step)
        except torch.OutOfMemoryError as e:
            result = {"side": "torch", "device": name, "trainable_params": params, "peak_memory_bytes": peak_memory(),
                      "error": f"out of memory in step {i + 1}: {str(e).splitlines()[0]}"}
            print(json.dumps(result, indent=2))
            return result
        if loss != loss:
            raise SystemExit("torch step produced a NaN loss")
        if i >= args.warmup:
            times.append(seconds)
    b = config["batch"]
    flops = config_step_flops(config, cfg)
    median = statistics.median(times)
    peak = table_peak(name)
    result = {"side": "torch", "device": name, "trainable_params": params,
              "step_time_s": {"median": median, "min": min(times), "max": max(times), "all": times},
              "examples_per_s": b["pairs"] / median, "model_tflops_per_s": flops.model / median / 1e12,
              "mfu": flops.model / median / peak[1] if peak else None,
              "peak_memory_bytes": peak_memory()}
    print(json.dumps(result, indent=2))
    return result


def gpu_table(ours, torch):
    """The GPU script's table from `mme5 bench`'s and `torch_only`'s JSON (either may be None: that side failed)."""
    def gib(b):
        return f"{b / 2**30:.1f}" if b is not None else "-"
    def pct(v):
        return f"{100 * v:.1f}%" if v is not None else "-"
    device = ours["device"]["kind"] if ours else (torch or {}).get("device", "?")
    model = (ours or {}).get("flops_per_step", {}).get("model")
    lines = [f"11B architecture, bf16, {device}; model FLOPs/step "
             f"{f'{model / 1e12:.2f} TFLOP' if model else 'unknown'}",
             f"{'':12}{'median s':>9}{'min s':>8}{'max s':>8}{'ex/s':>7}{'TFLOP/s':>9}{'MFU':>7}{'HFU':>7}"
             f"{'mem GiB':>9}{'compile s':>10}"]
    if ours:
        s, c = ours["step_time_s"], ours["per_chip"]
        lines.append(f"{'ours (JAX)':12}{s['median']:9.3f}{s['min']:8.3f}{s['max']:8.3f}{c['examples_per_s']:7.2f}"
                     f"{c['model_tflops_per_s']:9.1f}{pct(ours['mfu']):>7}{pct(ours['hfu']):>7}"
                     f"{gib(ours['memory']['peak_bytes']):>9}{ours['compile_s']:10.1f}")
    if torch and "error" in torch:
        lines.append(f"{'HF + PEFT':12}{torch['error']} (peak {gib(torch['peak_memory_bytes'])} GiB)")
    elif torch:
        s = torch["step_time_s"]
        lines.append(f"{'HF + PEFT':12}{s['median']:9.3f}{s['min']:8.3f}{s['max']:8.3f}{torch['examples_per_s']:7.2f}"
                     f"{torch['model_tflops_per_s']:9.1f}{pct(torch['mfu']):>7}{'-':>7}"
                     f"{gib(torch['peak_memory_bytes']):>9}{'-':>10}")
        if ours:
            lines.append(f"speed-up of ours over HF + PEFT: "
                         f"{torch['step_time_s']['median'] / ours['step_time_s']['median']:.2f}x")
    return "\n".join(lines)


def alternate(args, config):
    """Both sides in this process, steps alternating; -> the result dict with the speed-up."""
    from tqdm import tqdm

    from mme5_jax.bench.runner import synthetic_rows

    cfg, jax_step, compile_s, jax_params = jax_step_fn(config)
    host_batch = synthetic_rows(config, cfg, config["seed"])
    torch_step, torch_params = torch_step_fn(config, cfg, host_batch, args.threads)
    if jax_params != torch_params:
        raise SystemExit(f"trainable parameter counts differ: ours {jax_params}, torch {torch_params}")
    sides = {"torch": torch_step, "jax": jax_step}
    for _ in tqdm(range(args.warmup), desc="warmup"):
        for fn in sides.values():
            fn()
    times = {name: [] for name in sides}
    cpu_times = {name: [] for name in sides}
    for _ in tqdm(range(args.steps), desc="alternating steps"):
        for name, fn in sides.items():
            seconds, cpu_seconds, loss = timed(fn)
            if loss != loss:
                raise SystemExit(f"{name} step produced a NaN loss")
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpu_times.items()}
    result = {"config": args.config, "overrides": args.overrides, "trainable_params": jax_params,
              "jax_compile_s": compile_s, "step_time_s": times, "median_s": median, "cpu_time_s": cpu_times,
              "cpu_median_s": cpu_median, "threads": args.threads, "load_average": os.getloadavg(),
              "speedup": {name: {"wall": median[name] / median["jax"], "cpu": cpu_median[name] / cpu_median["jax"]}
                          for name in sides if name != "jax"}}
    print(f"trainable params: {jax_params:,} (both)   load average: {os.getloadavg()[0]:.2f}")
    print(f"{'':14} {'median s':>9} {'min s':>8} {'max s':>8} {'CPU s (median)':>15}")
    for name in times:
        print(f"{name:14} {median[name]:9.3f} {min(times[name]):8.3f} {max(times[name]):8.3f} "
              f"{cpu_median[name]:15.3f}")
    print(f"ours (jax) compile: {compile_s:.1f} s")
    for name, ratio in result["speedup"].items():
        print(f"speed-up of ours over {name}: {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU time")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="cpu_small", help="bundled bench config name or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. batch.pairs=4")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (XLA uses the host cores)")
    parser.add_argument("--torch-only", action="store_true", help="run only the HF + PEFT side (GPU script)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device (with --torch-only)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="HF gradient checkpointing (the peer of remat=full)")
    parser.add_argument("--output", help="write the measurements here as JSON")
    parser.add_argument("--table", nargs=2, metavar=("OURS_JSON", "TORCH_JSON"),
                        help="only print the GPU script's table from these files (a missing file: that side failed)")
    args = parser.parse_args(argv)

    if args.table:
        def load(path):
            if not os.path.exists(path):
                return None
            with open(path, encoding="utf-8") as f:
                return json.load(f)

        print(gpu_table(*map(load, args.table)))
        return 0

    from mme5_jax.bench.runner import load_config

    if args.torch_only:
        result = torch_only(args, load_config(args.config, args.overrides))
    else:
        result = alternate(args, load_config(args.config, ["mesh.cpu_devices=1", *args.overrides]))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 3 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
