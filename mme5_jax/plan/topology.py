"""TPU topology names and their abstract devices, for compiling ahead of time on a host without the chips.

Two spellings are accepted: libtpu's own `GEN:AxBxC` (chips along each torus axis, e.g. `v5p:2x4x4`) and Cloud's
slice names `GEN-N`. In slice names v5p counts TensorCores (two per chip: v5p-64 is 32 chips), v5e and v6e count
chips (v6e-256 is 16x16). A slice name maps onto the shape Cloud gives that slice: the last of the smallest axes
doubles at each step (v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e/v6e: 2x2, 2x4, 4x4, 4x8, ...).
"""
import dataclasses
import importlib.util
import math
import re

from mme5_jax.bench.peaks import TPU_CHIPS

# generation -> (axes of its torus, TensorCores counted per chip in Cloud's slice names)
GENERATIONS = {"v5e": (2, 1), "v5p": (3, 2), "v6e": (2, 1)}
EXAMPLES = "v5p:2x2x1, v5p-64, v6e:16x16, v6e-256, v5e-16"


class TopologyError(ValueError):
    """An unknown or malformed topology name; the message names the value and the accepted forms."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str            # as given
    generation: str      # v5e | v5p | v6e
    shape: tuple         # chips along each axis

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chip(self) -> dict:
        return TPU_CHIPS[self.generation]


def _slice_shape(generation, chips):
    axes = GENERATIONS[generation][0]
    shape = [1] * axes if chips == 1 else [2] * (axes - 1) + [1] if axes == 3 else [2, 2]
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return tuple(shape) if math.prod(shape) == chips else None


def parse_topology(name: str) -> Topology:
    """`v5p:2x2x1` / `v5p-64` / `v6e-256` ... -> Topology; TopologyError naming `name` otherwise."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v5e|v5p|v6e):(\d+(?:x\d+)*)", text)
    if m:
        generation, shape = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        if len(shape) != GENERATIONS[generation][0] or min(shape) < 1:
            raise TopologyError(f"topology {name!r}: {generation} has {GENERATIONS[generation][0]} torus axes, e.g. "
                                f"{EXAMPLES}")
        return Topology(name, generation, shape)
    m = re.fullmatch(r"(v5e|v5p|v6e)-(\d+)", text)
    if m:
        generation, count = m.group(1), int(m.group(2))
        per_chip = GENERATIONS[generation][1]
        chips = count // per_chip
        shape = _slice_shape(generation, chips) if count % per_chip == 0 and chips >= 1 else None
        if shape is None:
            unit = "TensorCores (2 per chip)" if per_chip == 2 else "chips"
            example = f"{generation}:{'x'.join(['2'] * GENERATIONS[generation][0])}"
            raise TopologyError(f"topology {name!r}: {generation}-N counts {unit} and needs a power-of-two slice; "
                                f"give the shape instead, e.g. {example}")
        return Topology(name, generation, shape)
    raise TopologyError(f"topology {name!r} not understood; use GEN:AxB[xC] or a slice name GEN-N with GEN one of "
                        f"{', '.join(GENERATIONS)}, e.g. {EXAMPLES}")


def require_libtpu():
    """Ahead-of-time TPU compiles need libtpu (the `tpu` extra); a clear error instead of JAX's own."""
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("mme5 plan compiles for TPU with libtpu, which is not installed: "
                           "pip install 'mme5-jax[tpu]' (jax[tpu] at the pinned JAX version)")


def abstract_devices(topology: Topology):
    """The topology's devices, abstract: enough to lower and compile for it, nothing to run on."""
    from jax.experimental import topologies

    require_libtpu()
    description = topologies.get_topology_desc(topology_name=topology.libtpu_name, platform="tpu")
    devices = list(description.devices)
    if len(devices) != topology.chips:
        raise TopologyError(f"topology {topology.name!r}: libtpu gives {len(devices)} devices for "
                            f"{topology.libtpu_name}, expected {topology.chips} chips")
    return devices
