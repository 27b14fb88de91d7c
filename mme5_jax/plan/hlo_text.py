"""HLO text of a compiled program, parsed into computations and instructions (what `hlo_cost` walks).

Only what the cost walk needs: each instruction's name, type, opcode, operand names and attribute text; array
types read as (dtype, dims). An instruction may span lines: a Pallas kernel's metadata holds newlines.
"""
import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([^\]]*)\]")
_ARRAY_LAYOUT = re.compile(r"\b([a-z]+[0-9a-z]*)\[([^\]]*)\](\{[^}]*\})?")
# A layout's memory space: S(0) (or none) is HBM; TPU programs place some buffers in on-chip memories (VMEM,
# SMEM), S(1) and up, whose traffic is not HBM traffic.
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = ")
_END = re.compile(r"^\}, execution_thread=")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")


def arrays(type_text: str) -> list[tuple[float, bool]]:
    """(bytes, in HBM) of every array in an HLO type, in order (a tuple's elements flattened)."""
    out = []
    for dtype, shape, layout in _ARRAY_LAYOUT.findall(type_text):
        space = _MEMORY_SPACE.search(layout) if layout else None
        out.append((float(_DTYPE_BYTES.get(dtype, 0) * _elements(shape)), space is None or space.group(1) == "0"))
    return out


def hbm_bytes(type_text: str) -> float:
    """Bytes of the arrays of an HLO type that live in HBM."""
    return sum(size for size, in_hbm in arrays(type_text) if in_hbm)


def _elements(shape: str) -> int:
    return math.prod(int(d.lstrip("<=")) for d in shape.split(",") if d) if shape else 1


def dims(type_text: str) -> list[int]:
    """The dimensions of the first array in an HLO type (bounded dynamic ones at their bound)."""
    m = _ARRAY.search(type_text)
    return [int(d.lstrip("<=")) for d in m.group(2).split(",") if d] if m else []


def _close(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at `start`."""
    depth = 0
    for m in re.finditer(r"[()]", text[start:]):
        depth += 1 if m.group() == "(" else -1
        if depth == 0:
            return start + m.end()
    raise ValueError(f"unbalanced parentheses in HLO: {text[start:start + 80]!r}")


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    operands: list
    attrs: str
    literal: str


@dataclasses.dataclass
class Computation:
    name: str
    instrs: dict = dataclasses.field(default_factory=dict)
    root: str | None = None


def parse_instr(line: str):
    """-> (Instr, is_root) for an instruction line, else None."""
    m = _INSTR.match(line)
    if m is None:
        return None
    rest = line[m.end():]
    end = _close(rest, 0) if rest.startswith("(") else rest.index(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    paren = rest.index("(")
    opcode = rest[:paren]
    close = _close(rest, paren)
    inside = rest[paren + 1:close - 1]
    operands = re.findall(r"%([\w.\-]+)", inside)
    instr = Instr(m.group(2), type_text, opcode, operands, rest[close:], inside if not operands else "")
    return instr, bool(m.group(1))


def parse_module(text: str):
    """-> ({name: Computation}, entry name) of an HLO module's text.

    An instruction may span lines (a Pallas kernel's metadata holds newlines), so lines are joined until the next
    instruction or the computation's closing brace."""
    computations, entry, current, pending = {}, None, None, []

    def flush():
        parsed = parse_instr(" ".join(pending)) if pending else None
        pending.clear()
        if parsed is not None:
            instr, is_root = parsed
            current.instrs[instr.name] = instr
            if is_root:
                current.root = instr.name

    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = computations.setdefault(m.group(2), Computation(m.group(2)))
                entry = m.group(2) if m.group(1) else entry
            continue
        if line == "}" or _END.match(line):
            flush()
            current = None
        elif _INSTR.match(line):
            flush()
            pending.append(line)
        elif pending:
            pending.append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def elements_of(type_text: str) -> int:
    """Elements of every array in an HLO type."""
    return sum(_elements(shape) for _, shape in _ARRAY.findall(type_text))


def called(instr, key):
    """The computation an instruction names with `key` (calls, to_apply, body, condition), or None."""
    for k, name in _CALLED.findall(instr.attrs):
        if k == key:
            return name
    return None


