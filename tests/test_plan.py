"""`mme5 plan`: ahead-of-time TPU compiles of the real step on this CPU host (libtpu, abstract devices).

Tiny models keep each compile to seconds. What is checked: topology names; the loop-aware FLOPs counter against a
program whose FLOPs are known; the memory parts of a compiled step; per-chip FLOPs halving from 4 to 8
data-parallel chips; the pairs search's boundary (with a small `--hbm-fraction`, since a tiny model never fills
a real chip); the embedding forward; the CLI's errors.
"""
import importlib.util
import json
import re

import pytest
import yaml

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu (the tpu extra) is not installed")

from mme5_jax.plan.topology import TopologyError, parse_topology  # noqa: E402

TINY_MODEL = {"vision": {"hidden_size": 16, "num_hidden_layers": 1, "num_global_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 32, "vision_output_dim": 32, "image_size": 28, "patch_size": 14,
                         "max_num_tiles": 1, "intermediate_layers_indices": [0]},
              "text": {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "intermediate_size": 128, "cross_attention_layers": [1]},
              "image_token_index": 256}
BENCH = {"model": TINY_MODEL, "dtype": "bfloat16", "remat": "none",
         "adapter": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
         "batch": {"pairs": 16, "query_tokens": 32, "query_tiles": 1, "target_tokens": 16, "target_tiles": 0,
                   "negatives": 0},
         "train": {"chunk_size": 8}, "mesh": {"data": -1}}
TRAIN = {"output_dir": "unused", "model": {"processor_dir": "unused", "dtype": "bfloat16"},
         "adapter": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.1}, "data": {
             "demo_dir": "unused", "global_batch_size": 8, "num_negatives": 1, "max_length": 32,
             "length_buckets": [32]}, "train": {"steps": 10, "chunk_size": 4}, "mesh": {"data": -1}}


@pytest.mark.parametrize("name, libtpu_name, chips", [
    ("v5p:2x2x1", "v5p:2x2x1", 4), ("v5p-8", "v5p:2x2x1", 4), ("v5p-64", "v5p:2x4x4", 32),
    ("v5p-128", "v5p:4x4x4", 64), ("v6e:16x16", "v6e:16x16", 256), ("v6e-256", "v6e:16x16", 256),
    ("v6e-8", "v6e:2x4", 8), ("v5e-16", "v5e:4x4", 16), ("V5E:2x2", "v5e:2x2", 4)])
def test_topology_names(name, libtpu_name, chips):
    topology = parse_topology(name)
    assert (topology.libtpu_name, topology.chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name", ["v4-8", "v5p-6", "v6e:2x2x2", "v5p:2x2", "tpu", "v5p-"])
def test_bad_topology_names_are_named(name):
    with pytest.raises(TopologyError, match=name.replace("-", r"\-")):
        parse_topology(name)


def test_loop_aware_flops_of_a_scan_of_matmuls():
    """A scan of 12 matmuls inside a 3-step map over a 4-chip data-parallel mesh: every chip runs 36 matmuls of
    [64, 256] x [256, 256]. XLA's cost_analysis counts each loop body once; the walk multiplies."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from mme5_jax.plan.hlo_cost import loop_aware_cost, xla_cost
    from mme5_jax.plan.topology import abstract_devices

    layers, outer, rows, width = 12, 3, 256, 256
    mesh = jax.make_mesh((4,), ("data",), devices=abstract_devices(parse_topology("v5p:2x2x1")),
                         axis_types=(jax.sharding.AxisType.Auto,))

    def program(x, w):
        def layer(h, w_i):
            return jnp.dot(h, w_i, preferred_element_type=jnp.bfloat16), None

        return jax.lax.map(lambda h: jax.lax.scan(layer, h, w)[0], x)

    x = jax.ShapeDtypeStruct((outer, rows, width), jnp.bfloat16,
                             sharding=NamedSharding(mesh, PartitionSpec(None, "data")))
    w = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(program).lower(x, w).compile()
    cost = loop_aware_cost(compiled.as_text())
    true = outer * layers * 2.0 * (rows // 4) * width * width
    assert cost.flops == pytest.approx(true, rel=1e-3), cost
    assert not cost.unknown_loops
    assert sorted(loop["trip_count"] for loop in cost.loops) == [outer, layers]
    assert xla_cost(compiled)["flops"] == pytest.approx(true / (outer * layers), rel=1e-3)
    # The weights are read a slice at a time: bytes grow with the trip counts, not with the whole stack per step.
    per_step = 2 * width * width + 2 * 2 * (rows // 4) * width
    assert outer * layers * per_step <= cost.bytes_accessed <= 4 * outer * layers * per_step


ON_CHIP_HLO = """HloModule m

ENTRY %main (p0: bf16[1024,1024], p1: s8[4194304]) -> (bf16[1024,1024], s8[65536]) {
  %p0 = bf16[1024,1024]{1,0} parameter(0)
  %p1 = s8[4194304]{0} parameter(1)
  %cs = (bf16[1024,1024]{1,0:S(1)}, bf16[1024,1024]{1,0}, u32[]{:S(2)}) copy-start(%p0)
  %cd = bf16[1024,1024]{1,0:S(1)} copy-done(%cs)
  %ss = ((s8[4194304]{0}), s8[65536]{0:S(1)}, s32[]) slice-start(%p1), slice={[0:65536]}
  %sd = s8[65536]{0:S(1)} slice-done(%ss)
  %neg = bf16[1024,1024]{1,0} negate(%cd)
  ROOT %t = (bf16[1024,1024]{1,0}, s8[65536]{0:S(1)}) tuple(%neg, %sd)
}
"""


def test_bytes_count_hbm_traffic_only():
    """A prefetch into on-chip memory (S(1)) reads HBM once and writes nothing there; an async slice reads only
    its slice; an op reading the prefetched copy reads nothing from HBM."""
    from mme5_jax.plan.hlo_cost import loop_aware_cost

    cost = loop_aware_cost(ON_CHIP_HLO)
    weight = 1024 * 1024 * 2
    assert cost.bytes_accessed == weight + 65536 + weight  # copy-start's read, the slice, negate's write
    assert cost.bytes_by_kind["layout copies"] == weight and cost.bytes_by_kind["slices and updates"] == 65536


def _write(tmp_path, name, tree):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Plans of the tiny bench config on v5p:2x2x1 (4 chips) and v5p:2x2x2 (8 chips), and of a tiny training
    config (the pipeline's batch layout, DoRA, GradCache) on v6e:2x2."""
    from mme5_jax.plan.cli import plan_once
    from mme5_jax.plan.workload import load_workload

    root = tmp_path_factory.mktemp("plan")
    bench = load_workload(_write(root, "bench.yaml", BENCH))
    model = _write(root, "model.yaml", TINY_MODEL)
    train = load_workload(_write(root, "train.yaml", TRAIN), [f"model.config={model}"])
    return {"v5p4": plan_once(bench, parse_topology("v5p:2x2x1"), "train", 0.9, progress=False),
            "v5p8": plan_once(bench, parse_topology("v5p:2x2x2"), "train", 0.9, progress=False),
            "v6e": plan_once(train, parse_topology("v6e:2x2"), "train", 0.9, progress=False)}


@pytest.mark.parametrize("key", ["v5p4", "v6e"])
def test_memory_parts_add_up(plans, key):
    plan = plans[key]
    m = plan["memory_per_chip"]
    assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["generated_code"]
    # The arguments hold at least this chip's shards of the state and the batch (TPU layouts pad small arrays).
    assert m["arguments"] >= plan["argument_bytes_of_inputs"] > 0
    assert m["aliased"] > 0  # the donated train state comes back in place
    assert 0 < m["peak"] <= m["budget"] and m["fits"] and m["margin"] == m["budget"] - m["peak"]
    assert m["hbm"] == {"v5p4": 95, "v6e": 32}[key] * 2**30


@pytest.mark.parametrize("key", ["v5p4", "v6e"])
def test_costs_and_roofline(plans, key):
    plan = plans[key]
    c, r = plan["cost_per_chip"], plan["roofline"]
    assert c["loops"] and not c["unknown_loops"]
    # Every loop body counted once (and Pallas kernels, which XLA does not price, left out), the walk agrees with
    # XLA's own count of the same program.
    assert c["loop_bodies_once"]["flops"] == pytest.approx(c["xla_cost_analysis"]["flops"], rel=0.05)
    assert c["flops"] > 1.5 * c["loop_bodies_once"]["flops"]
    assert r["step_s"] == max(r["compute_s"], r["memory_s"]) > 0
    # Every byte has a kind (float sums of the same terms in another order: 1e-9 is ample).
    assert sum(c["bytes_by_kind"].values()) == pytest.approx(c["bytes_accessed"], rel=1e-9)
    assert c["bytes_by_kind"]["matmul fusions"] > 0
    # The largest sources, largest first, carry the model's named scopes (XLA's op_name metadata): some layer's
    # matmuls are among them.
    sources = c["bytes_by_source"]
    moved = [s["bytes"] for s in sources]
    assert moved == sorted(moved, reverse=True) and 0 < sum(moved) <= c["bytes_accessed"] * (1 + 1e-9)
    assert all(s["share"] == pytest.approx(s["bytes"] / c["bytes_accessed"]) for s in sources)
    layers = ("vision_attn", "vision_mlp", "text_self_attn", "text_cross_attn", "text_mlp")
    assert any(s["source"].split("/")[0] in layers and "dot_general" in s["source"] for s in sources), sources
    assert 0 < plan["model_flops"]["mfu_bound"] <= 1
    kernels = plan["attention_kernels"]
    assert set(kernels) == {"vision self-attention", "text self-attention", "cross-attention"}, kernels
    assert all(k["kernel"] in ("splash", "blocked") for k in kernels.values()), kernels
    splash = any(k["kernel"] == "splash" for k in kernels.values())
    assert bool(c["pallas_kernels"]) == splash and all(k["flops"] > 0 for k in c["pallas_kernels"].values())
    assert plan["versions"]["libtpu"] and "not a measurement" in plan["note"]


def test_training_plan_packs_the_expected_real_images(plans):
    """8 pairs, chunk 4, 4 chips: one example per chip and chunk, with mmE5's 6/7 + 5/14 x 2 = 1.57 images per
    example (k = 1) -> 2, rounded up to data.image_count_multiple (4)."""
    w = plans["v6e"]["workload"]
    assert w["images_per_example"] == pytest.approx(6 / 7 + 5 / 14 * 2)
    assert w["images_per_chip_and_chunk"] == 4


def test_flops_per_chip_halve_from_4_to_8_chips(plans):
    four, eight = plans["v5p4"], plans["v5p8"]
    assert (four["mesh"]["data"], eight["mesh"]["data"]) == (4, 8)
    assert four["workload"]["rows"] == eight["workload"]["rows"] == 16
    ratio = eight["cost_per_chip"]["flops"] / four["cost_per_chip"]["flops"]
    assert ratio == pytest.approx(0.5, rel=0.1), ratio
    assert not four["warnings"] and not eight["warnings"]


def test_search_pairs_finds_the_boundary(tmp_path):
    """With a budget of a few MiB (a tiny model never fills a chip), the largest fitting batch is found and one
    more pair per chip does not fit. Plain backprop: GradCache would keep the memory flat in the batch."""
    from mme5_jax.plan.cli import search
    from mme5_jax.plan.workload import load_workload

    text_only = {**BENCH, "batch": {**BENCH["batch"], "query_tiles": 0}, "train": {"chunk_size": None}}
    work = load_workload(_write(tmp_path, "bench.yaml", text_only))
    best, probes = search(work, parse_topology("v5p:2x2x1"), "pairs", hbm_fraction=3.5e-5, max_per_shard=16,
                          progress=False)
    assert best is not None and best["memory_per_chip"]["fits"]
    fitting = [p["candidate"] for p in probes if p["fits"]]
    missing = [p["candidate"] for p in probes if not p["fits"]]
    assert best["workload"]["rows"] == max(fitting)
    assert missing and min(missing) == max(fitting) + 4  # one more pair on each of the 4 chips
    assert all(p["peak"] <= best["memory_per_chip"]["budget"] for p in probes if p["fits"])


def test_keeping_attention_outputs_skips_the_recomputed_splash_forward(tmp_path):
    """Under full remat the backward recomputes every layer's forward, splash kernels included; keeping their
    outputs (full_keep_attention) leaves GradCache's pass and the differentiated pass as the only forwards.
    The fused backward shows as one dk/dv kernel of 5 matmuls a block, no dq kernel."""
    from mme5_jax.plan.cli import plan_once
    from mme5_jax.plan.workload import load_workload

    def kernels(remat):
        work = load_workload(_write(tmp_path, f"{remat}.yaml", {**BENCH, "remat": remat}))
        return plan_once(work, parse_topology("v5p:2x2x1"), "train", 0.9, progress=False)["cost_per_chip"][
            "pallas_kernels"]

    def forwards(found):
        return sum(v["calls"] for name, v in found.items() if "_fwd" in name)

    full, kept = kernels("full"), kernels("full_keep_attention")
    backward = {name: v for name, v in full.items() if "_dkv" in name}
    assert backward and not [name for name in full if "_dq" in name]
    assert forwards(full) == 3 * sum(v["calls"] for v in backward.values())  # GradCache, differentiated, remat
    assert forwards(kept) == 2 * sum(v["calls"] for name, v in kept.items() if "_dkv" in name)
    fwd = next(v for name, v in full.items() if "_fwd" in name and "_no_residuals" in name)
    dkv = next(iter(backward.values()))
    assert dkv["flops"] / dkv["calls"] == pytest.approx(2.5 * fwd["flops"] / fwd["calls"])  # 5 matmuls against 2


def test_embed_step(tmp_path):
    from mme5_jax.plan.cli import plan_once
    from mme5_jax.plan.workload import load_workload

    work = load_workload(_write(tmp_path, "bench.yaml", BENCH))
    plan = plan_once(work, parse_topology("v6e:2x2"), "embed", 0.9, rows=8, progress=False)
    assert plan["step"] == "embed" and plan["workload"]["rows"] == 8
    assert plan["memory_per_chip"]["aliased"] == 0 and plan["cost_per_chip"]["flops"] > 0


def test_cli_writes_the_plan_and_names_bad_values(tmp_path, capsys):
    from mme5_jax.cli import main

    config = _write(tmp_path, "bench.yaml", BENCH)
    out = tmp_path / "plan.json"
    assert main(["plan", config, "--topology", "v5p-8", "--output", str(out), "--no-progress"]) == 0
    plan = json.loads(out.read_text())
    assert plan["topology"]["libtpu_name"] == "v5p:2x2x1" and plan["config"]["batch"]["pairs"] == 16
    assert "FITS" in capsys.readouterr().out

    assert main(["plan", config, "--topology", "v5p-7", "--output", str(out)]) == 2
    assert "'v5p-7'" in capsys.readouterr().err
    assert main(["plan", config, "mesh.data=8", "--topology", "v5p:2x2x1", "--output", str(out)]) == 2
    assert "needs 8 chips, topology v5p:2x2x1 has 4" in capsys.readouterr().err


def test_missing_libtpu_is_a_clear_error(monkeypatch):
    from mme5_jax.plan import topology

    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"mme5-jax\[tpu\]"):
        topology.require_libtpu()


@pytest.mark.parametrize("topology, dkv_block", [("v5p:2x2x1", 384), ("v6e:2x2", 4224)])
def test_fused_backward_key_blocks_fit_each_chips_vmem(topology, dkv_block):
    """The 11B cross-attention's backward (32 query heads over 8 KV heads, 256 text rows, 4 tiles of 1032 vision
    tokens, bfloat16, 20 rows per chip as in the v5p-64 plan) compiles for each chip: its key block is the whole
    padded sequence where the scoped VMEM holds it (v6e, 32 MiB) and the forward's block where it does not (v5p,
    16 MiB: libtpu counts 17.16 MiB at the whole sequence here)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from mme5_jax.model import splash
    from mme5_jax.model.masks import TileMask
    from mme5_jax.plan.topology import abstract_devices
    from mme5_jax.sharding import make_mesh

    mesh = make_mesh(4, devices=abstract_devices(parse_topology(topology)))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    q = jax.ShapeDtypeStruct((80, 256, 32, 128), jnp.bfloat16, sharding=rows)
    kv = jax.ShapeDtypeStruct((80, 4 * 1032, 8, 128), jnp.bfloat16, sharding=rows)
    tiles = jax.ShapeDtypeStruct((80, 256, 4), jnp.bool_, sharding=rows)

    def loss(q, k, v, tiles):
        out = splash.splash_attention(q, k, v, TileMask(tiles, 1032), placement=("data", None, None))
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, tiles).compile()
    blocks = {int(b) for b in re.findall(r'\\"block_kv_dkv\\": (\d+)', compiled.as_text())}
    assert blocks == {dkv_block}
