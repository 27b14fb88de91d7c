"""HBM bytes and FLOPs of the 11B vision tower's layers alone, forward and backward, compiled for a TPU.

    python tools/plan_vision_layer.py [--topology v6e:2x2] [--images 10] [--layers 2] [--remat full]
                                      [--dropout 0.1] [--hlo F]

A whole 11B `mme5 plan` takes 4 minutes to compile here alone (10-13 beside another); a stack of `--layers` vision
layers (DoRA on q/k/v/o as mmE5 adapts them, dropout, remat, splash attention) at the real widths takes under a
minute, and the vision tower is most of a memory-bound step's bytes. Each chip holds `--images` images of 4 tiles,
the batch is split over the topology's chips, the loss is a mean square of the output, and the gradient is taken
for the adapters only, as in training. Prints per chip: peak memory, loop-aware FLOPs and HBM bytes, and the bytes
by kind of instruction and by named scope (`mme5_jax.plan.hlo_cost`). An estimate from the compiler, like
`mme5 plan`.
"""
import argparse
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v6e:2x2", help="libtpu topology name (default v6e:2x2)")
    parser.add_argument("--images", type=int, default=10, help="4-tile images per chip (default 10: the v6e-256 "
                                                               "recipe without GradCache)")
    parser.add_argument("--layers", type=int, default=2, help="vision layers in the scanned stack (default 2)")
    parser.add_argument("--remat", default="full", help="remat policy of the stack (default full)")
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout (default 0.1, mmE5's)")
    parser.add_argument("--hlo", help="also write the compiled HLO text here")
    args = parser.parse_args(argv)

    from mme5_jax.plan.cli import cpu_runtime_env
    cpu_runtime_env()
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mme5_jax.config import ModelConfig
    from mme5_jax.model import layers, lora
    from mme5_jax.model.lora_config import AdapterConfig
    from mme5_jax.model.masks import PaddingPairMask
    from mme5_jax.model.vision import VisionLayer
    from mme5_jax.plan.hlo_cost import loop_aware_cost
    from mme5_jax.plan.topology import abstract_devices, parse_topology
    from mme5_jax.sharding import make_mesh

    cfg = ModelConfig.from_yaml("llama-3.2-11b-vision").vision
    seq, width = cfg.max_num_tiles * cfg.padded_num_patches, cfg.hidden_size
    adapters = AdapterConfig(kind="dora", rank=8, alpha=64, dropout=args.dropout,
                             targets=(r"layers\.self_attn\.[qkvo]_proj",))

    def build():
        stack = layers.Stack(lambda r: VisionLayer(cfg, False, jnp.bfloat16, jnp.bfloat16, r), args.layers,
                             nnx.Rngs(0), args.remat)
        lora.add_adapters(stack, adapters, nnx.Rngs(1))
        return stack

    graphdef, trained, frozen = nnx.split(nnx.eval_shape(build), lora.LoRAParam, ...)

    def loss(trained, frozen, x, invalid, rng):
        stack = nnx.merge(graphdef, trained, frozen)
        if args.dropout:
            lora.seed_dropout(stack, rng, jnp.arange(x.shape[0]))
        y, _ = stack(x, PaddingPairMask(invalid))
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    topology = parse_topology(args.topology)
    mesh = make_mesh(topology.chips, 1, 1, devices=abstract_devices(topology))
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def shaped(tree, sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

    n = args.images * topology.chips
    inputs = (shaped(trained, replicated), shaped(frozen, replicated),
              jax.ShapeDtypeStruct((n, seq, width), jnp.bfloat16, sharding=rows),
              jax.ShapeDtypeStruct((n, seq), jnp.bool_, sharding=rows),
              jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    start = time.perf_counter()
    with layers.target_platform("tpu"), jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss)).lower(*inputs).compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    cost = loop_aware_cost(text)
    peak = compiled.memory_analysis().peak_memory_in_bytes
    print(f"{args.layers} vision layers, {args.images} images of {cfg.max_num_tiles} tiles per chip, remat "
          f"{args.remat}, dropout {args.dropout}, {topology.name}: compile {seconds:.0f} s")
    print(f"per chip: peak {peak / 2**30:.2f} GiB, FLOPs {cost.flops:.4e}, HBM bytes {cost.bytes_accessed:.4e}")
    for kind, moved in cost.bytes_by_kind.items():
        print(f"  {kind:20s} {moved:.3e}  {moved / cost.bytes_accessed:6.1%}")
    for entry in cost.bytes_by_source:
        print(f"  {entry['source']:80s} {entry['bytes']:.3e}  {entry['share']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
