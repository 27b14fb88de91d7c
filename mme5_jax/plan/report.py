"""A compiled program's plan, per chip: memory against the chip's HBM, loop-aware FLOPs and bytes, the roofline
step time, the FLOPs model's count and the MFU it bounds; and the table `mme5 plan` prints."""
import datetime
import importlib.metadata

from mme5_jax.plan.aot import Compiled
from mme5_jax.plan.hlo_cost import loop_aware_cost, xla_cost
from mme5_jax.plan.topology import Topology
from mme5_jax.plan.workload import Workload, embed_call, flops_calls

ESTIMATE = ("An estimate from the XLA TPU compiler (its memory analysis and a loop-aware walk of the compiled "
            "HLO), not a measurement on the chips.")


def versions() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("jax", "jaxlib", "libtpu", "flax", "mme5-jax")}


def memory(compiled, topology: Topology, hbm_fraction: float) -> dict:
    """Per-chip parts of XLA's memory analysis; `fits` compares the peak with `hbm_fraction` of the chip's HBM."""
    a = compiled.memory_analysis()
    parts = {"arguments": a.argument_size_in_bytes, "outputs": a.output_size_in_bytes,
             "aliased": a.alias_size_in_bytes, "temporaries": a.temp_size_in_bytes,
             "generated_code": a.generated_code_size_in_bytes}
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["generated_code"]
    hbm = topology.chip["hbm_bytes"]
    budget = int(hbm_fraction * hbm)
    peak = int(a.peak_memory_in_bytes)
    return {**{k: int(v) for k, v in parts.items()}, "total": int(total), "peak": peak, "hbm": hbm,
            "hbm_fraction": hbm_fraction, "budget": budget, "fits": peak <= budget, "margin": budget - peak}


def model_flops(work: Workload, step: str, rows: int) -> dict:
    """The FLOPs model's count of one step (mme5_jax.bench.flops) for the whole mesh."""
    from mme5_jax.bench.flops import forward_flops, step_flops

    if step == "embed":
        total = forward_flops(work.model, embed_call(work, rows))
        return {"model": total, "hardware": total}
    flops = step_flops(work.model, flops_calls(work), work.adapter, num_queries=work.pairs,
                       num_negatives=work.negatives, grad_cache=work.chunk_size is not None, remat=work.remat,
                       dropout_active=True)
    return {"model": flops.model, "hardware": flops.hardware}


def warnings(work: Workload, mesh, step: str) -> list:
    """What makes the compiled program waste the chips, found from the settings (a bench config's GradCache chunk
    may not split over the batch shards; a training config's must, `mme5 train` checks it)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if step == "train" and work.chunk_size and work.chunk_size % shards:
        return [f"train.chunk_size {work.chunk_size} does not split over the {shards} batch shards: every chip "
                f"encodes each whole chunk (choose a multiple of {shards})"]
    return []


def _images(work: Workload, mesh) -> dict:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return {"image_shares": list(work.image_shares), "images_per_example": work.images_per_example(),
            "images_per_chip_and_chunk": work.images_per_cell(shards)}


def make_plan(work: Workload, topology: Topology, result: Compiled, step: str, hbm_fraction: float,
              rows: int, command=None) -> dict:
    compiled, chips = result.compiled, topology.chips
    cost = loop_aware_cost(compiled.as_text())
    chip = topology.chip
    compute_s = cost.flops / chip["bf16_flops_per_s"]
    memory_s = cost.bytes_accessed / chip["hbm_bytes_per_s"]
    step_s = max(compute_s, memory_s)
    counted = model_flops(work, step, rows)
    per_chip_model = counted["model"] / chips
    return {
        "note": ESTIMATE,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": command,
        "step": step,
        "topology": {"name": topology.name, "libtpu_name": topology.libtpu_name, "chips": chips,
                     "device_kind": result.mesh.devices.flat[0].device_kind},
        "mesh": dict(result.mesh.shape),
        "workload": {"kind": work.kind, "rows": rows, "rows_per_chip": rows / chips,
                     "chunk_size": work.chunk_size if step == "train" else None,
                     "negatives": work.negatives if step == "train" else 0, "dtype": work.dtype,
                     "remat": work.remat, "adapter": work.adapter.kind if step == "train" else None,
                     **(_images(work, result.mesh) if step == "train" and work.kind == "train" else {})},
        "memory_per_chip": memory(compiled, topology, hbm_fraction),
        "argument_bytes_of_inputs": result.argument_bytes_expected,
        "cost_per_chip": {"flops": cost.flops, "transcendentals": cost.transcendentals,
                          "bytes_accessed": cost.bytes_accessed, "collective_bytes": cost.collective_bytes,
                          "bytes_by_kind": cost.bytes_by_kind, "bytes_by_source": cost.bytes_by_source,
                          "loops": cost.loops, "unknown_loops": cost.unknown_loops, "pallas_kernels": cost.kernels,
                          "loop_bodies_once": {"flops": cost.flops_once, "bytes_accessed": cost.bytes_once},
                          "xla_cost_analysis": xla_cost(compiled)},
        "roofline": {"compute_s": compute_s, "memory_s": memory_s, "step_s": step_s,
                     "bound": "compute" if compute_s >= memory_s else "memory",
                     "peak_flops_per_s": chip["bf16_flops_per_s"], "hbm_bytes_per_s": chip["hbm_bytes_per_s"],
                     "hbm_bytes": chip["hbm_bytes"], "peak_source": f"{chip['name']}, bf16 dense: {chip['source']}"},
        "model_flops": {"per_step": counted["model"], "hardware_per_step": counted["hardware"],
                        "per_chip": per_chip_model,
                        "mfu_bound": per_chip_model / (step_s * chip["bf16_flops_per_s"]) if step_s else None},
        "attention_kernels": result.attention_kernels,
        "warnings": warnings(work, result.mesh, step),
        "compile_s": result.compile_s,
    }


def format_bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _ms(seconds):
    return f"{seconds * 1e3:.3g} ms"


def format_table(plan: dict) -> str:
    m, c, r, f = plan["memory_per_chip"], plan["cost_per_chip"], plan["roofline"], plan["model_flops"]
    b = {k: format_bytes(v) for k, v in m.items() if k not in ("fits", "hbm_fraction")}
    t, w = plan["topology"], plan["workload"]
    rows = [
        ("step", f"{plan['step']} on {t['name']} ({t['libtpu_name']}, {t['chips']} x {t['device_kind']}), mesh "
                 + " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())),
        ("batch", f"{w['rows']} {'pairs' if plan['step'] == 'train' else 'rows'} ({w['rows_per_chip']:g} per chip)"
                  + (f", GradCache chunk {w['chunk_size']}" if w.get("chunk_size") else "")
                  + (f", {w['images_per_chip_and_chunk']} images per chip and chunk ({w['images_per_example']:.3g} "
                     f"per example)" if "images_per_chip_and_chunk" in w else "")),
        ("memory per chip", f"peak {b['peak']} of {b['hbm']} HBM (budget {100 * m['hbm_fraction']:.3g}%: "
                            f"{b['budget']}) -> {'FITS' if m['fits'] else 'DOES NOT FIT'}, margin {b['margin']}"),
        ("  parts", f"arguments {b['arguments']}, outputs {b['outputs']} (aliased {b['aliased']}), temporaries "
                    f"{b['temporaries']}, code {b['generated_code']}, total {b['total']}"),
        ("FLOPs per chip", f"{c['flops']:.4g} (loop-aware HLO walk; {len(c['loops'])} loops, "
                           f"{len(c['unknown_loops'])} with unknown trip count; Pallas kernels "
                           f"{sum(k['flops'] for k in c['pallas_kernels'].values()):.4g}, estimated from shapes)"),
        ("bytes per chip", f"{c['bytes_accessed']:.4g} HBM, {c['collective_bytes']:.4g} in collectives; "
                           + ", ".join(f"{kind} {100 * moved / max(c['bytes_accessed'], 1):.0f}%" for kind, moved
                                       in sorted(c["bytes_by_kind"].items(), key=lambda kv: -kv[1])[:4])),
        ("  largest sources", "; ".join(f"{s['source']} {100 * s['share']:.0f}%" for s in c["bytes_by_source"][:3])),
        ("roofline step", f"{_ms(r['step_s'])} ({r['bound']}-bound: compute {_ms(r['compute_s'])}, memory "
                          f"{_ms(r['memory_s'])}); peaks: {r['peak_source']}"),
        ("model FLOPs", f"{f['per_step']:.4g} per step, {f['per_chip']:.4g} per chip -> MFU at most "
                        f"{100 * (f['mfu_bound'] or 0):.1f}%"),
        ("attention", "; ".join(f"{kind}: {v['kernel']}" + (f" ({v['why_not_splash']})" if v["why_not_splash"] else "")
                                for kind, v in plan["attention_kernels"].items())),
        ("compile", f"{plan['compile_s']:.1f} s; jax {plan['versions']['jax']}, libtpu "
                    f"{plan['versions']['libtpu']}, {plan['date']}"),
    ]
    width = max(len(k) for k, _ in rows)
    rows += [("warning", w) for w in plan["warnings"]]
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [plan["note"]])
