"""Loop-aware FLOPs and bytes of a compiled XLA program, read from its optimised HLO text.

XLA's `cost_analysis()` counts a `while` body once, whatever its trip count, and the train step is almost all
loops (the layer scans, blocked attention's `lax.map`, GradCache's chunk loops). This walk prices every
instruction the way XLA's HloCostAnalysis does, then multiplies each loop body by its trip count.

Trip counts: the `known_trip_count` XLA writes into a while's backend_config where it has one (CPU, GPU); else
the induction variable of the loop, as every `lax.scan`/`lax.map` compiles: the condition compares a tuple element
with a constant, the body adds a constant to that element, and the loop's input sets it from a constant. A loop
whose count cannot be read is counted once and listed in `unknown_loops`.

FLOPs: a dot or convolution costs 2 x output elements x contracted elements; elementwise ops one per output
element, reductions one per input element; transcendentals are counted apart, as XLA does. Bytes count HBM
traffic: each instruction outside fusions reads its operands and writes its output, except that a fusion reading
a parameter only through slices reads the slices, an in-place dynamic-update-slice moves only its update, an
async copy or slice moves its destination's size, and arrays that the TPU compiler placed in on-chip memory
(a layout's memory space S(1) and up: VMEM, SMEM) move nothing through HBM. The bytes are
also split by kind of instruction (`BYTE_KINDS`) and by the model's named scopes (the TOP_SOURCES largest), so a
memory-bound plan shows where its traffic goes.
"""
import dataclasses
import functools
import math
import re

import numpy as np

from mme5_jax.plan.hlo_text import arrays, called, dims, elements_of, hbm_bytes, parse_module

_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Components of an op_name that JAX adds around a program's named scopes.
_STRUCTURE = frozenset({"while", "body", "cond", "closed_call", "checkpoint", "remat", "rematted_computation", "pjit",
                        "shard_map", "custom_jvp_call", "custom_vjp_call", "core_call"})
# How many of the largest byte sources a cost lists.
TOP_SOURCES = 15

TRANSCENDENTAL = frozenset({"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic",
                            "sqrt", "rsqrt", "cbrt", "power", "sine", "cosine", "tan", "atan2", "erf"})
ELEMENTWISE = frozenset({"add", "subtract", "multiply", "divide", "remainder", "maximum", "minimum", "negate", "abs",
                         "sign", "compare", "select", "clamp", "and", "or", "xor", "not", "floor", "ceil",
                         "round-nearest-even", "round-nearest-afz", "shift-left", "shift-right-logical",
                         "shift-right-arithmetic", "is-finite", "convert", "real", "imag", "popcnt",
                         "count-leading-zeros", "stochastic-convert"})
# No memory traffic of their own: views, plumbing, and the second half of async pairs (the start moved the data).
NO_TRAFFIC = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional",
                        "call", "after-all", "partition-id", "replica-id", "opt-barrier", "copy-done", "slice-done",
                        "call-done", "async-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
                        "send-done", "recv-done", "iota"})
COLLECTIVES = frozenset({"all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter",
                         "all-to-all", "collective-permute", "collective-permute-start", "ragged-all-to-all"})
SLICES = frozenset({"dynamic-slice", "slice", "gather"})
LAYOUT = frozenset({"copy", "copy-start", "transpose", "reshape", "broadcast"})
MOVES = frozenset({"dynamic-slice", "slice", "slice-start", "gather", "dynamic-update-slice", "scatter", "pad",
                   "concatenate"})
BYTE_KINDS = ("matmul fusions", "attention kernels", "other fusions", "layout copies", "slices and updates",
              "collectives", "other")


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    transcendentals: float = 0.0
    bytes: float = 0.0
    collective_bytes: float = 0.0
    bytes_by_kind: dict = dataclasses.field(default_factory=dict)
    bytes_by_source: dict = dataclasses.field(default_factory=dict)

    def add(self, other, times=1.0):
        self.flops += times * other.flops
        self.transcendentals += times * other.transcendentals
        self.bytes += times * other.bytes
        self.collective_bytes += times * other.collective_bytes
        for kind, moved in other.bytes_by_kind.items():
            self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0.0) + times * moved
        for source, moved in other.bytes_by_source.items():
            self.bytes_by_source[source] = self.bytes_by_source.get(source, 0.0) + times * moved


@dataclasses.dataclass
class HloCost:
    """Per-device totals of one compiled program; `*_once` count every loop body once and no Pallas kernel's FLOPs,
    as XLA's cost_analysis does (to compare with it)."""

    flops: float
    transcendentals: float
    bytes_accessed: float
    collective_bytes: float
    flops_once: float
    bytes_once: float
    loops: list
    unknown_loops: list
    kernels: dict
    bytes_by_kind: dict
    bytes_by_source: list

    def to_dict(self):
        return dataclasses.asdict(self)


class _Walker:
    def __init__(self, computations, count_kernels=True):
        self.computations, self.count_kernels = computations, count_kernels
        self.loops, self.unknown, self.kernels = [], [], {}
        self._flops_cache, self._users_cache, self._params_cache = {}, {}, {}

    # --- FLOPs of one instruction (recursing into fusions) -----------------------------------------------------
    def instr_flops(self, comp, instr) -> tuple[float, float]:
        op = instr.opcode
        out = elements_of(instr.type)
        if op == "fusion":
            return self.computation_flops(called(instr, "calls"))
        if op == "dot":
            lhs = dims(comp.instrs[instr.operands[0]].type) if instr.operands[0] in comp.instrs else []
            contracting = re.search(r"lhs_contracting_dims=\{([^}]*)\}", instr.attrs)
            size = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
            return 2.0 * out * size, 0.0
        if op == "convolution":
            return _convolution_flops(comp, instr), 0.0
        if op == "custom-call":
            return (_kernel_flops(comp, instr) if self.count_kernels else 0.0), 0.0
        if op in TRANSCENDENTAL:
            return 0.0, float(out)
        if op in ELEMENTWISE:
            return float(out), 0.0
        if op in ("reduce", "reduce-window"):
            return float(sum(elements_of(comp.instrs[o].type) for o in instr.operands[:len(instr.operands) // 2]
                             if o in comp.instrs)), 0.0
        return 0.0, 0.0

    def computation_flops(self, name) -> tuple[float, float]:
        if name not in self._flops_cache:
            comp = self.computations[name]
            totals = [self.instr_flops(comp, i) for i in comp.instrs.values()]
            self._flops_cache[name] = (sum(t[0] for t in totals), sum(t[1] for t in totals))
        return self._flops_cache[name]

    # --- bytes of one top-level instruction --------------------------------------------------------------------
    def instr_bytes(self, comp, instr) -> float:
        """HBM bytes: reads of operands and writes of outputs that live in HBM (not in on-chip memories)."""
        op = instr.opcode
        if op in NO_TRAFFIC or (op == "custom-call" and 'custom_call_target="tpu_custom_call"' not in instr.attrs):
            return 0.0
        if op == "dynamic-update-slice":
            update = self._type_bytes(comp, instr.operands[1])
            return update + (update if self._in_hbm(comp, instr.operands[0]) else 0.0)
        if op in ("dynamic-slice", "slice"):
            size, out_in_hbm = arrays(instr.type)[0]
            return size * (self._in_hbm(comp, instr.operands[0]) + out_in_hbm)
        if op == "copy-start":  # -> (destination, source, context): one copy between memories
            size, out_in_hbm = arrays(instr.type)[0]
            return self._type_bytes(comp, instr.operands[0]) + (size if out_in_hbm else 0.0)
        if op == "slice-start":  # -> ((operands), slice, ...): reads the slice only
            size, out_in_hbm = arrays(instr.type)[len(instr.operands)]
            return size * (self._in_hbm(comp, instr.operands[0]) + out_in_hbm)
        if op == "fusion":
            return self._fusion_bytes(comp, instr)
        return hbm_bytes(instr.type) + sum(self._type_bytes(comp, o) for o in instr.operands)

    def _type_bytes(self, comp, name):
        return hbm_bytes(comp.instrs[name].type) if name in comp.instrs else 0.0

    def _in_hbm(self, comp, name):
        return name in comp.instrs and any(in_hbm for _, in_hbm in arrays(comp.instrs[name].type))

    def _fusion_bytes(self, comp, instr) -> float:
        fused = self.computations[called(instr, "calls")]
        root = fused.instrs[fused.root]
        outputs = [fused.instrs[o] for o in root.operands] if root.opcode == "tuple" else [root]
        in_place = {o.operands[0] for o in outputs if o.opcode == "dynamic-update-slice"}
        # Whether each output lives in HBM: from the fusion's own type, whose arrays are its outputs in order.
        placed = arrays(instr.type)
        total = sum((self._type_bytes(fused, o.operands[1]) if o.opcode == "dynamic-update-slice"
                     else arrays(o.type)[0][0]) * placed[i][1] for i, o in enumerate(outputs) if i < len(placed))
        for index, operand in enumerate(instr.operands):
            if not self._in_hbm(comp, operand):
                continue
            read = self._param_read(fused, index, in_place)
            total += self._type_bytes(comp, operand) if read is None else read
        return total

    def _param_read(self, fused, index, in_place=frozenset()):
        """Bytes a fusion reads of its parameter `index` when it reads only slices of it (or updates it in place),
        else None (the whole operand)."""
        users = self._users(fused.name)
        name = self._params(fused.name).get(index)
        readers = users.get(name, [])
        if name in in_place and len(readers) == 1:
            return 0.0
        total = 0.0
        for user, position in readers:
            if user.opcode in SLICES and position == 0:
                total += arrays(user.type)[0][0]
            elif user.opcode == "fusion":
                nested = self._param_read(self.computations[called(user, "calls")], position)
                if nested is None:
                    return None
                total += nested
            else:
                return None
        return total if readers else None

    def _params(self, name):
        if name not in self._params_cache:
            self._params_cache[name] = {int(i.literal): i.name for i in self.computations[name].instrs.values()
                                        if i.opcode == "parameter"}
        return self._params_cache[name]

    def _users(self, name):
        if name not in self._users_cache:
            users = {}
            for i in self.computations[name].instrs.values():
                for position, o in enumerate(i.operands):
                    users.setdefault(o, []).append((i, position))
            self._users_cache[name] = users
        return self._users_cache[name]

    def byte_kind(self, instr) -> str:
        op = instr.opcode
        if op in COLLECTIVES:
            return "collectives"
        if op == "custom-call":
            return "attention kernels" if (kernel_name(instr) or "").startswith("splash") else "other"
        if op == "fusion":
            fused = self.computations[called(instr, "calls")].instrs.values()
            return "matmul fusions" if any(i.opcode in ("dot", "convolution") for i in fused) else "other fusions"
        if op in ("dot", "convolution"):
            return "matmul fusions"
        if op in LAYOUT:
            return "layout copies"
        return "slices and updates" if op in MOVES else "other"

    # --- control flow ------------------------------------------------------------------------------------------
    def walk(self, name, multiplier=1.0, once=False) -> Cost:
        """Cost of a computation run once; loops inside multiply by their trip count unless `once`."""
        comp, cost = self.computations[name], Cost()
        for instr in comp.instrs.values():
            if instr.opcode == "while":
                trip = 1 if once else self.trip_count(comp, instr, multiplier)
                cost.add(self.walk(called(instr, "body"), multiplier * trip, once), trip)
                continue
            if instr.opcode in ("call", "call-start", "async-start"):
                cost.add(self.walk(called(instr, "to_apply") or called(instr, "calls"), multiplier, once))
                continue
            if instr.opcode == "conditional":
                branches = [b.strip().lstrip("%") for b in _BRANCHES.search(instr.attrs).group(1).split(",")]
                costs = [self.walk(b, multiplier, once) for b in branches]
                cost.add(max(costs, key=lambda c: c.flops + c.bytes))
                continue
            flops, transcendentals = self.instr_flops(comp, instr)
            moved = self.instr_bytes(comp, instr)
            if instr.opcode == "custom-call" and kernel_name(instr) and not once:
                entry = self.kernels.setdefault(kernel_name(instr), {"calls": 0.0, "flops": 0.0})
                entry["calls"] += multiplier
                entry["flops"] += multiplier * flops
            cost.add(Cost(flops, transcendentals, moved, moved if instr.opcode in COLLECTIVES else 0.0,
                          {self.byte_kind(instr): moved} if moved else {},
                          {source_of(instr): moved} if moved else {}))
        return cost

    def trip_count(self, comp, instr, multiplier) -> int:
        """The loop's trip count (see the module docstring); 1, recorded as unknown, when it cannot be read."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr.attrs)
        trip = int(known.group(1)) if known else _induction_trip_count(self.computations, comp, instr)
        entry = {"loop": instr.name, "trip_count": trip, "runs": multiplier}
        if trip is None:
            self.unknown.append(entry)
            trip = 1
        self.loops.append(entry)
        return trip


def _convolution_flops(comp, instr) -> float:
    """2 x batch x output features x input features x the (output, kernel) position pairs of each spatial
    dimension that meet a real input element: XLA writes batched matmuls as convolutions whose batch dimensions
    are spatial with an input dilation as large as the window, so most window positions fall into holes."""
    lhs, rhs = (dims(comp.instrs[o].type) if o in comp.instrs else None for o in instr.operands[:2])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if lhs is None or rhs is None or labels is None:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    out = dims(instr.type)
    window = _window(instr.attrs, sum(c.isdigit() for c in rhs_labels))
    total = 2.0 * math.prod(size for size, label in zip(out, out_labels) if not label.isdigit())
    total *= math.prod(size for size, label in zip(rhs, rhs_labels) if label == "i")
    for d, (stride, (low, _), lhs_dilate, rhs_dilate) in enumerate(window):
        digit = str(d)
        total *= _valid_pairs(lhs[lhs_labels.index(digit)], rhs[rhs_labels.index(digit)],
                              out[out_labels.index(digit)], stride, low, lhs_dilate, rhs_dilate)
    return total


def source_of(instr) -> str:
    """The named scopes (`mme5_jax.model.layers.scoped`) and JAX primitive that an instruction (a fusion: its root)
    came from, as XLA's metadata records them: "vision_attn/adapter/dot_general", with " (backward)" for ops
    of the gradient; JAX's own layers of the name (jit, jvp, while/body, ...) are dropped."""
    op_name = _OP_NAME.search(instr.attrs)
    if op_name is None:
        return instr.opcode
    parts = op_name.group(1).split("/")
    names = [p for p in parts[:-1] if "(" not in p and p not in _STRUCTURE and not p.startswith("branch_")]
    names.append(re.sub(r"\[.*", "", parts[-1]))
    name = "/".join(n for i, n in enumerate(names) if i == 0 or n != names[i - 1])
    return name + (" (backward)" if any(p.startswith("transpose(") for p in parts) else "")


def kernel_name(instr):
    """The Pallas kernel a TPU custom call runs (from its op_name), or None for other custom calls."""
    if 'custom_call_target="tpu_custom_call"' not in instr.attrs:
        return None
    m = re.search(r'op_name="[^"]*/([\w.\-]+)/pallas_call"', instr.attrs)
    return m.group(1) if m else "tpu_custom_call"


def _kernel_flops(comp, instr) -> float:
    """A splash attention kernel's matmul FLOPs from its q and k operands [..., heads, length, head_dim]: the
    forward runs 2 matmuls (scores, probs x values), the dq kernel 3, the dk/dv kernel 4 and the fused backward
    (dk/dv with dq as a third output) 5, over every block (an upper bound: splash skips fully masked blocks).
    Other kernels carry no cost model here: 0."""
    name = kernel_name(instr) or ""
    m = re.match(r"splash_\w+?_(fwd|dq|dkv)", name)
    if not m:
        return 0.0
    floats = [d for d in (dims(comp.instrs[o].type) for o in instr.operands if o in comp.instrs
                          and re.match(r"\(?(f|bf)\d+\[", comp.instrs[o].type)) if len(d) >= 3]
    if len(floats) < 2:
        return 0.0
    q, k = floats[0], floats[1]
    matmuls = {"fwd": 2, "dq": 3, "dkv": 4}[m.group(1)]
    if m.group(1) == "dkv" and len(re.findall(r"(?:f|bf)\d+\[", instr.type)) >= 5:
        matmuls = 5  # fused: dq's partial sums join dk, dv and their two accumulators among the outputs
    return 2.0 * matmuls * math.prod(q[:-1]) * k[-2] * q[-1]


def _window(attrs, rank):
    """[(stride, (pad low, pad high), lhs dilation, rhs dilation)] per spatial dimension."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in m.group(1).split()) if m else {}

    def ints(key, default):
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * rank

    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields \
        else [(0, 0)] * rank
    return list(zip(ints("stride", 1), pads, ints("lhs_dilate", 1), ints("rhs_dilate", 1)))


@functools.lru_cache(maxsize=None)
def _valid_pairs(size, kernel, out, stride, low, lhs_dilate, rhs_dilate) -> int:
    j = np.arange(kernel, dtype=np.int64)[None, :] * rhs_dilate - low
    rows = max(1, (1 << 22) // kernel)  # bounds the [rows, kernel] grid's memory
    total = 0
    for first in range(0, out, rows):
        p = np.arange(first, min(out, first + rows), dtype=np.int64)[:, None] * stride + j
        total += int(np.count_nonzero((p >= 0) & (p <= (size - 1) * lhs_dilate) & (p % lhs_dilate == 0)))
    return total


def _constant(comp, name):
    """The integer value of `name` when it is a scalar constant (through copies and bitcasts), else None."""
    seen = 0
    while name in comp.instrs and seen < 8:
        instr = comp.instrs[name]
        if instr.opcode == "constant":
            m = re.fullmatch(r"\s*(-?\d+)\s*", instr.literal)
            return int(m.group(1)) if m else None
        if instr.opcode not in ("copy", "bitcast", "convert") or not instr.operands:
            return None
        name, seen = instr.operands[0], seen + 1
    return None


def _tuple_index(comp, name):
    """k when `name` is get-tuple-element(parameter, index=k) (through copies), else None."""
    instr = comp.instrs.get(name)
    while instr is not None and instr.opcode == "copy":
        instr = comp.instrs.get(instr.operands[0])
    if instr is None or instr.opcode != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", instr.attrs)
    return int(m.group(1)) if m else None


def _induction_trip_count(computations, comp, instr):
    cond = computations[called(instr, "condition")]
    body = computations[called(instr, "body")]
    compare = cond.instrs[cond.root]
    if compare.opcode != "compare" or len(compare.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", compare.attrs).group(1)
    a, b = compare.operands
    if _tuple_index(cond, a) is not None and _constant(cond, b) is not None:
        index, limit = _tuple_index(cond, a), _constant(cond, b)
    elif _tuple_index(cond, b) is not None and _constant(cond, a) is not None:
        index, limit = _tuple_index(cond, b), _constant(cond, a)
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    else:
        return None
    init_tuple = comp.instrs.get(instr.operands[0])
    body_root = body.instrs[body.root]
    if init_tuple is None or init_tuple.opcode != "tuple" or body_root.opcode != "tuple":
        return None
    start = _constant(comp, init_tuple.operands[index])
    update = body.instrs.get(body_root.operands[index])
    if start is None or update is None or update.opcode != "add":
        return None
    steps = [_constant(body, o) for o in update.operands if _tuple_index(body, o) != index]
    if len(steps) != 1 or not steps[0]:
        return None
    step = steps[0]
    if direction == "LT" and step > 0:
        return max(0, -(-(limit - start) // step))
    if direction == "LE" and step > 0:
        return max(0, (limit - start) // step + 1)
    if direction == "GT" and step < 0:
        return max(0, -(-(start - limit) // -step))
    return None


def loop_aware_cost(hlo_text: str) -> HloCost:
    """Per-device FLOPs and bytes of a compiled program's HLO text (`compiled.as_text()`), loops counted."""
    computations, entry = parse_module(hlo_text)
    walker = _Walker(computations)
    full = walker.walk(entry)
    once = _Walker(computations, count_kernels=False).walk(entry, once=True)
    return HloCost(flops=full.flops, transcendentals=full.transcendentals, bytes_accessed=full.bytes,
                   collective_bytes=full.collective_bytes, flops_once=once.flops, bytes_once=once.bytes,
                   loops=walker.loops, unknown_loops=walker.unknown, kernels=walker.kernels,
                   bytes_by_kind={kind: full.bytes_by_kind.get(kind, 0.0) for kind in BYTE_KINDS},
                   bytes_by_source=[{"source": source, "bytes": moved, "share": moved / max(full.bytes, 1.0)}
                                    for source, moved in sorted(full.bytes_by_source.items(),
                                                                key=lambda kv: -kv[1])[:TOP_SOURCES]])


def xla_cost(compiled) -> dict:
    """XLA's own cost_analysis of a compiled program (every loop body once), its flops and bytes accessed."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}

