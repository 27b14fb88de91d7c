"""The analytic FLOPs model against XLA's cost analysis, and `mme5 bench` writing a well-formed bench.json.

No timing assertions: speed is measured by tools/bench_vs_torch.py and recorded in docs/benchmarks.md.
"""
import json

import jax
import jax.numpy as jnp
import pytest
import yaml
from flax import nnx

from mme5_jax.bench.flops import Encode, forward_flops, linear_paths, step_flops, xla_flops
from mme5_jax.bench.runner import BenchConfigError, adapter_config, flops_calls, load_config, model_config, \
    xla_step_flops
from mme5_jax.cli import main
from mme5_jax.model.layers import Linear
from mme5_jax.model.mllama import MllamaModel

# Small enough to compile in seconds, large enough (head_dim 32) that matmuls dominate as they do at scale.
SMALL_MODEL = {
    "vision": {"hidden_size": 64, "num_hidden_layers": 2, "num_global_layers": 1, "num_attention_heads": 2,
               "intermediate_size": 256, "intermediate_layers_indices": [0], "vision_output_dim": 128,
               "image_size": 56, "patch_size": 14, "max_num_tiles": 4},
    "text": {"vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": 4, "cross_attention_layers": [1, 3],
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0},
    "image_token_index": 1000,
}
TEXT_TARGETS = [r"language_model\.blocks\.layers\.layers\.\d+\.(self_attn|cross_attn)\.[qkvo]_proj",
                r"language_model\.blocks\.layers\.layers\.\d+\.mlp\.(gate|up|down)_proj"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "small.yaml"
    path.write_text(yaml.safe_dump({
        "model": SMALL_MODEL,
        "adapter": {"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "targets": TEXT_TARGETS},
        "batch": {"pairs": 4, "query_tokens": 32, "query_tiles": 4, "target_tokens": 16, "target_tiles": 0},
        "mesh": {"cpu_devices": 1},
        "bench": {"warmup": 1, "steps": 2},
    }))
    return str(path)


def test_walk_covers_every_linear_of_the_model():
    cfg = model_config({"model": SMALL_MODEL})
    model = nnx.eval_shape(lambda: MllamaModel(cfg, rngs=nnx.Rngs(0)))
    ours = {".".join(map(str, p)) for p, node in nnx.iter_graph(model) if isinstance(node, Linear)}
    assert linear_paths(cfg) == ours


@pytest.mark.parametrize("call", [Encode(4, 32, 4), Encode(4, 48, 0)], ids=["image", "text_only"])
def test_forward_flops_within_10_percent_of_xla(call):
    cfg = model_config({"model": SMALL_MODEL})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MllamaModel(cfg, rngs=nnx.Rngs(0))))
    v = cfg.vision
    def spec(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype)
    batch = {"input_ids": spec((call.batch, call.seq_len)), "attention_mask": spec((call.batch, call.seq_len))}
    if call.tiles:
        batch.update(pixel_values=spec((call.batch, 1, call.tiles, 3, v.image_size, v.image_size), jnp.float32),
                     aspect_ratio_ids=spec((call.batch, 1)), aspect_ratio_mask=spec((call.batch, 1, call.tiles)),
                     cross_attention_mask=spec((call.batch, call.seq_len, 1, call.tiles)),
                     has_image=spec((call.batch,), jnp.bool_))
    xla = xla_flops(lambda: jax.jit(lambda s, b: nnx.merge(graphdef, s).embed(b)).lower(state, batch))
    ours = forward_flops(cfg, call)
    print(f"forward {call}: ours {ours:.4g}, XLA {xla:.4g}, ratio {ours / xla:.3f}")
    assert abs(ours / xla - 1) < 0.10, (ours, xla)


@pytest.mark.parametrize("overrides", [[], ["train.chunk_size=2"]], ids=["backprop", "gradcache"])
def test_step_flops_within_10_percent_of_xla(config_path, overrides):
    config = load_config(config_path, overrides)
    cfg = model_config(config)
    ours = step_flops(cfg, flops_calls(config, cfg), adapter_config(config), num_queries=4,
                      grad_cache=bool(overrides))
    xla = xla_step_flops(config)
    print(f"step {overrides}: ours {ours.hardware:.4g} (model {ours.model:.4g}), XLA {xla:.4g}, "
          f"ratio {ours.hardware / xla:.3f}")
    assert abs(ours.hardware / xla - 1) < 0.10, (ours.hardware, xla)
    assert ours.model < ours.hardware


def test_frozen_vision_tower_costs_forward_only():
    cfg = model_config({"model": SMALL_MODEL})
    calls = [Encode(4, 32, 4), Encode(4, 16, 0)]
    text_only = step_flops(cfg, calls, adapter_config({"adapter": {"kind": "lora", "rank": 8, "alpha": 16,
                                                                   "dropout": 0.0, "targets": TEXT_TARGETS}}),
                           num_queries=4)
    everywhere = step_flops(cfg, calls, adapter_config({"adapter": {"kind": "dora", "rank": 8, "alpha": 64,
                                                                    "dropout": 0.1, "targets": None}}),
                            num_queries=4, remat="full", grad_cache=True)
    assert text_only.breakdown["vision/dense"]["bwd"] == 0
    assert text_only.breakdown["vision/attention"]["bwd"] == 0
    assert everywhere.breakdown["vision/attention"]["bwd"] > 0
    assert everywhere.breakdown["vision/dora"]["fwd"] > 0
    assert everywhere.breakdown["hardware_only/remat_recompute"] > 0
    assert everywhere.breakdown["hardware_only/grad_cache_forward"] == everywhere.forward_executed


def test_bad_config_keys_are_named(config_path):
    with pytest.raises(BenchConfigError, match="batch.pears"):
        load_config(config_path, ["batch.pears=3"])
    with pytest.raises(BenchConfigError, match="train.chunk_size"):
        load_config(config_path, ["train.chunk_size=3"])
    with pytest.raises(BenchConfigError, match="remat"):
        load_config(config_path, ["remat=some"])


def test_mme5_bench_writes_well_formed_json(config_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", config_path, "batch.pairs=2", "--output", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    steps = result["step_time_s"]
    assert len(steps["all"]) == 2 and steps["min"] <= steps["median"] <= steps["max"]
    assert result["compile_s"] > 0
    per_chip = result["per_chip"]
    # float64 (JSON keeps every bit): one division each, 1e-16; pytest.approx's default rel=1e-6 is ample, here too.
    assert per_chip["examples_per_s"] == pytest.approx(2 / steps["median"])
    assert per_chip["text_tokens_per_s"] == pytest.approx(2 * (32 + 16) / steps["median"])
    assert per_chip["image_tiles_per_s"] == pytest.approx(2 * 4 / steps["median"])
    assert 0 < result["mfu"] < result["hfu"]
    assert result["peak"]["source"] == "measured" and result["peak"]["flops_per_s"] > 0
    assert result["memory"]["peak_bytes"] > 0
    assert result["flops_per_step"]["model"] > 0
    assert "MFU" in capsys.readouterr().out


def _tool(name):
    """A script of tools/ as a module, with tools/ importable as it is when the script runs (its own folder first)."""
    import importlib.util
    import pathlib
    import sys

    tools = pathlib.Path(__file__).parents[1] / "tools"
    if str(tools) not in sys.path:
        sys.path.append(str(tools))
    path = tools / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_table_rows_ratio_and_out_of_memory():
    """The GPU script's table: both sides with the speed-up, HF's out-of-memory row, and a side that failed."""
    gpu_table = _tool("bench_vs_torch").gpu_table
    ours = {"device": {"kind": "NVIDIA H200"}, "flops_per_step": {"model": 226.83e12}, "compile_s": 109.4,
            "step_time_s": {"median": 1.340, "min": 1.338, "max": 1.378}, "mfu": 0.171, "hfu": 0.245,
            "per_chip": {"examples_per_s": 5.97, "model_tflops_per_s": 169.3}, "memory": {"peak_bytes": 20.5 * 2**30}}
    torch = {"device": "NVIDIA H200", "step_time_s": {"median": 2.008, "min": 1.778, "max": 2.365},
             "examples_per_s": 3.98, "model_tflops_per_s": 112.9, "mfu": 0.114, "peak_memory_bytes": 86.2 * 2**30}
    table = gpu_table(ours, torch)
    assert "NVIDIA H200; model FLOPs/step 226.83 TFLOP" in table
    assert "ours (JAX)      1.340   1.338   1.378   5.97    169.3  17.1%  24.5%     20.5     109.4" in table
    assert "HF + PEFT       2.008   1.778   2.365   3.98    112.9  11.4%      -     86.2         -" in table
    assert table.endswith("speed-up of ours over HF + PEFT: 1.50x")

    oom = {"device": "NVIDIA H200", "error": "out of memory in step 1: CUDA out of memory.",
           "peak_memory_bytes": 139.3 * 2**30}
    table = gpu_table(ours, oom)
    assert "HF + PEFT   out of memory in step 1: CUDA out of memory. (peak 139.3 GiB)" in table
    assert "speed-up" not in table
    table = gpu_table(None, torch)
    assert "ours (JAX)" not in table and "model FLOPs/step unknown" in table and "speed-up" not in table


def test_torch_side_reports_out_of_memory(monkeypatch, tmp_path):
    """HF + PEFT running out of GPU memory is a result (the 11B DoRA recipe does on an H200), not a crash."""
    import torch

    module = _tool("bench_vs_torch")

    def step():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 784.00 MiB.\nmore detail")

    monkeypatch.setattr(module, "torch_step_fn", lambda *a, **k: (step, 1234))
    output = tmp_path / "torch.json"
    rc = module.main(["gpu_11b", "model=tiny", "dtype=float32", "--torch-only", "--output", str(output)])
    result = json.loads(output.read_text())
    assert rc == 3
    assert result["error"] == "out of memory in step 1: CUDA out of memory. Tried to allocate 784.00 MiB."
    assert result["trainable_params"] == 1234 and "step_time_s" not in result


def test_cpu_ceiling_prices_each_part_at_its_best_rate(config_path, tmp_path):
    """tools/cpu_ceiling.py: the step's FLOPs split into dense and attention add up to the hardware count, and
    each ceiling is that split priced at the rates it measured (XLA's own, and the best of either framework)."""
    module = _tool("cpu_ceiling")
    output = tmp_path / "ceiling.json"
    assert module.main([config_path, "--steps", "1", "--repeats", "1", "--output", str(output)]) == 0
    result = json.loads(output.read_text())

    config = load_config(config_path)
    cfg = model_config(config)
    b = config["batch"]
    flops = step_flops(cfg, flops_calls(config, cfg), adapter_config(config), num_queries=b["pairs"])
    split, rates = result["flops"], result["rates"]
    # float64 sums of a few dozen FLOP counts in another order (~1e-15 relative): approx's default rel=1e-6 is ample.
    assert split["dense"] + split["attention"] == pytest.approx(flops.hardware)
    assert split["attention"] == pytest.approx(sum(v["fwd"] + v["bwd"] for k, v in flops.breakdown.items()
                                                   if k.endswith("/attention")) +
                                               flops.breakdown["hardware_only/masked_attention"])
    assert set(rates["attention"]) == {"xla", "torch_sdpa_masked", "torch_sdpa_unmasked"}
    assert rates["dense"]["xla"] == max(row["xla"] for row in result["matmuls"])
    xla = split["dense"] / rates["dense"]["xla"] + split["attention"] / rates["attention"]["xla"]
    best = (split["dense"] / max(rates["dense"].values()) + split["attention"] / max(rates["attention"].values()))
    assert result["ceiling_s"] == pytest.approx({"xla": xla, "best": best})
    assert result["ceiling_s"]["best"] <= result["ceiling_s"]["xla"]
    assert result["max_speedup"]["xla"] == pytest.approx(result["hf_step_s"] / xla)
    assert result["attention_shape"] == [4, 4 * cfg.vision.padded_num_patches, 2, 32]


def test_per_tower_remat_recomputes_only_the_vision_tower():
    """`vision_keep_attention_text_dots`: the vision tower recomputes its matmuls, the text decoder keeps them."""
    from mme5_jax.model.layers import Stack

    cfg = model_config({"model": SMALL_MODEL})
    adapter = adapter_config({"adapter": {"kind": "dora", "rank": 8, "alpha": 16, "dropout": 0.0, "targets": None}})
    calls = [Encode(4, 32, 4), Encode(4, 16, 0)]

    def recompute(remat):
        return step_flops(cfg, calls, adapter, num_queries=4, remat=remat).breakdown["hardware_only/remat_recompute"]

    combined, vision_and_text = recompute("vision_keep_attention_text_dots"), recompute("full_keep_attention")
    assert 0 < combined < vision_and_text
    model = nnx.eval_shape(lambda: MllamaModel(cfg, rngs=nnx.Rngs(0), remat="vision_keep_attention_text_dots"))
    stacks = {path[0]: node.remat for path, node in nnx.iter_graph(model) if isinstance(node, Stack)}
    assert stacks == {"vision_model": "full_keep_attention", "language_model": "dots"}
