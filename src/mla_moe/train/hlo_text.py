"""Reading an optimized HLO module's text (`compiled.as_text()`): its computations, their
instructions, how many times each computation runs per execution, and the arrays (with their
memory spaces) each instruction touches.

    module = Module(compiled.as_text())
    for ins in module.instructions():
        ins.opcode, ins.result, module.runs[ins.computation]

Counts are per execution of the program: a computation called as a `while` body runs once per
iteration (the loop's `known_trip_count`, else the constant bound of its `i < N` condition),
one called by `calls=` / `to_apply=` once per call, and every branch of a `conditional` as
often as the conditional (an upper count of the branches; readers that need one branch, such as
the bytes walk, pick the cheapest: the data decides which branch runs, and a lower bound
cannot assume the costlier).

An instruction may span several lines (a custom call's `backend_config` can hold a newline);
lines are joined until the brackets outside string literals balance.

Memory spaces: a layout's `S(n)` places the array outside HBM. Space 0 (no `S(n)`) is the
device's HBM; 5 is host memory; any other (1: TPU VMEM, 2/6/8: SMEM, semaphores, SparseCore
contexts) is on-chip.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

HBM, HOST = 0, 5

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^{}]*\})?")
_SPACE = re.compile(r"S\((\d+)\)")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|"
                    r"true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_S32_CONSTANT = re.compile(r"s32\[\]\S* constant\((\d+)\)")
_BRANCHES = ("branch_computations", "true_computation", "false_computation")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OPERAND = re.compile(r"%([\w.\-]+)")


class Array(NamedTuple):
    """One array of an HLO type: its bytes and memory space."""

    nbytes: float
    space: int


def _array_bytes(dtype: str, dims: str) -> float:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    if dtype.startswith("f8") or dtype.startswith("f4"):
        return n * (1 if dtype.startswith("f8") else 0.5)
    return n * _BYTES.get(dtype, 0)


def arrays(type_text: str) -> list[Array]:
    """The arrays of an HLO type, in order: "(f32[8,128]{1,0:S(1)}, bf16[4])" ->
    [Array(4096, 1), Array(8, 0)]."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        space = _SPACE.search(layout) if layout else None
        out.append(Array(_array_bytes(dtype, dims), int(space.group(1)) if space else HBM))
    return out


def type_bytes(type_text: str, space: int | None = None) -> float:
    """Bytes of the arrays of an HLO type, of every memory space or only of `space`:
    "(f32[8,128]{1,0}, bf16[4])" -> 4104."""
    return float(sum(a.nbytes for a in arrays(type_text) if space is None or a.space == space))


def split_result(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, opcode); TYPE may be a tuple with nested layouts."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
        elif ch == " " and depth == 0:
            opcode = rest[i + 1:].split("(", 1)[0].strip()
            return rest[:i], opcode
    return rest, ""


def _operands(text: str, opcode: str) -> tuple[str, ...]:
    """The instruction names an operand list refers to, in order."""
    args = text.split(opcode + "(", 1)
    if len(args) < 2:
        return ()
    depth, end = 1, len(args[1])
    for i, ch in enumerate(args[1]):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return tuple(_OPERAND.findall(args[1][:end]))


class Instruction(NamedTuple):
    """One instruction of an HLO module."""

    computation: str  # the computation that holds it
    name: str
    result: str  # its result type: "f32[8,128]{1,0}", or a tuple "(f32[8]{0}, s32[])"
    opcode: str
    called: dict[str, tuple[str, ...]]  # computations it calls, by role ("calls", "body", ...)
    text: str  # what follows the result type: "opcode(operands), attributes"
    operands: tuple[str, ...] = ()
    root: bool = False


def _balance(line: str) -> int:
    """Open minus closed brackets of a line, outside string literals."""
    bare = _STRING.sub("", line) if '"' in line else line
    return bare.count("{") + bare.count("(") - bare.count("}") - bare.count(")")


def _blocks(hlo_text: str) -> list[tuple[str, bool, list[str]]]:
    """(name, is_entry, instruction lines) per computation, in text order; an instruction
    printed over several lines comes back as one."""
    comps = []
    current, pending, depth = None, "", 0
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = (m.group(1), line.startswith("ENTRY"), [])
            continue
        if pending:
            pending += " " + line.strip()
            depth += _balance(line)
            if depth <= 0:
                current[2].append(pending)
                pending = ""
            continue
        if line.startswith("}"):  # "}" or, for a SparseCore one, '}, execution_thread="..."'
            comps.append(current)
            current = None
            continue
        depth = _balance(line)
        if depth > 0:
            pending = line
        else:
            current[2].append(line)
    return comps


def _instruction(comp: str, line: str) -> Instruction | None:
    m = _NAME.match(line)
    if not m:
        return None
    rest = line.split("=", 1)[1].strip()
    result, opcode = split_result(rest)
    called: dict[str, tuple[str, ...]] = {}
    for role, targets in _CALLS.findall(line):
        called[role] = called.get(role, ()) + tuple(re.findall(r"[\w.\-]+", targets))
    text = rest[len(result):].lstrip()
    return Instruction(comp, m.group(1), result, opcode, called, text,
                       _operands(text, opcode), line.lstrip().startswith("ROOT"))


@dataclasses.dataclass
class Module:
    """An HLO module's computations, parsed from its text.

    computations: {name: [Instruction, ...]} in text order (callees before callers);
    entry: the entry computation's name; runs: {computation: executions per run of the
    program}; by_name: {instruction name: Instruction}; types: {instruction name: result
    type}."""

    computations: dict[str, list[Instruction]]
    by_name: dict[str, Instruction]
    entry: str
    runs: dict[str, int]
    types: dict[str, str]

    def __init__(self, hlo_text: str):
        self.computations, entry = {}, ""
        for name, is_entry, lines in _blocks(hlo_text):
            self.computations[name] = [i for i in (_instruction(name, ln) for ln in lines) if i]
            entry = name if is_entry else entry
        self.entry = entry or (next(reversed(self.computations)) if self.computations else "")
        self.by_name = {i.name: i for ins in self.computations.values() for i in ins}
        self.types = {name: i.result for name, i in self.by_name.items()}
        self.runs = self.runs_picking()

    def instructions(self) -> list[Instruction]:
        """Every instruction, computation by computation, in text order."""
        return [i for ins in self.computations.values() for i in ins]

    def trip_count(self, ins: Instruction) -> int:
        """Iterations of a `while`: XLA's known_trip_count, else the bound N of a condition
        `counter < N` with a constant N (the form lax.scan and fori_loop lower to); 1 if
        neither."""
        m = _TRIP.search(ins.text)
        if m:
            return int(m.group(1))
        m = _CONDITION.search(ins.text)
        cond = self.computations.get(m.group(1), []) if m else []
        if any("direction=LT" in i.text for i in cond):
            bounds = [int(c) for i in cond for c in _S32_CONSTANT.findall(i.result + " " + i.text)]
            if len(bounds) == 1:
                return max(bounds[0] - self._counter_start(ins, cond), 0)
        return 1

    def _counter_start(self, loop: Instruction, cond: list[Instruction]) -> int:
        """The constant a `while`'s counter starts from: 0 for a plain scan; 1 (or more) where
        XLA peeled the first iterations out of the loop and left the bound as it was."""
        compare = next((i for i in cond if i.opcode == "compare" and "direction=LT" in i.text),
                       None)
        counter = next((self.by_name.get(o) for o in (compare.operands if compare else ())
                        if getattr(self.by_name.get(o), "opcode", "") == "get-tuple-element"),
                       None)
        index = re.search(r"\bindex=(\d+)", counter.text) if counter else None
        init = self.by_name.get(loop.operands[0]) if loop.operands else None
        if index is None or init is None or init.opcode != "tuple":
            return 0
        value = self.by_name.get(init.operands[int(index.group(1))])
        while value is not None and value.opcode in ("copy", "bitcast", "copy-done"):
            value = self.by_name.get(value.operands[0]) if value.operands else None
        start = _S32_CONSTANT.search(value.result + " " + value.text) if value else None
        return int(start.group(1)) if start else 0

    def runs_picking(self, branch_cost=None) -> dict[str, int]:
        """{computation: executions per run}. A conditional runs each of its branches as
        often as itself, or, with `branch_cost` (computation name -> a cost), only its
        cheapest branch (which runs is decided by data; a lower bound takes the least)."""
        runs = {name: 0 for name in self.computations}
        if self.entry:
            runs[self.entry] = 1
        # Callees are printed before their callers: walk callers first.
        for name in reversed(self.computations):
            m = runs.get(name, 0)
            if not m:
                continue
            for ins in self.computations[name]:
                trip = self.trip_count(ins) if ins.opcode == "while" else 1
                called = ins.called
                if branch_cost and ins.opcode == "conditional":
                    branches = [c for r in _BRANCHES for c in called.get(r, ())]
                    called = {r: c for r, c in called.items() if r not in _BRANCHES}
                    if branches:
                        called["branch_computations"] = (min(branches, key=branch_cost),)
                for role, callees in called.items():
                    times = trip if role in ("body", "condition") else 1
                    for callee in callees:
                        if callee in runs:
                            runs[callee] += m * times
        return runs

    def total(self, cost, *, trips: bool = True, into_calls: bool = True,
              start: str = "") -> float:
        """Sum of `cost(instruction)` over one run of the program (or of the computation
        `start`): loop bodies times their
        trip count (`trips`) or once, a conditional's cheapest branch, called computations
        (fusion bodies, reducers, async calls too with `into_calls`) once per call."""
        memo: dict[str, float] = {}

        def comp_total(name: str) -> float:
            if name in memo:
                return memo[name]
            memo[name] = 0.0  # a malformed cycle counts nothing
            out = 0.0
            for ins in self.computations.get(name, []):
                out += cost(ins)
                if ins.opcode == "while":
                    n = self.trip_count(ins) if trips else 1
                    out += n * sum(comp_total(c) for role in ("body", "condition")
                                   for c in ins.called.get(role, ()))
                elif ins.opcode == "conditional":
                    out += min((comp_total(c) for r in _BRANCHES
                                for c in ins.called.get(r, ())), default=0.0)
                elif ins.opcode == "call" or into_calls:
                    out += sum(comp_total(c) for role in ("calls", "to_apply")
                               for c in ins.called.get(role, ()))
            memo[name] = out
            return out
        return comp_total(start or self.entry)

    def operand_type(self, ins: Instruction, index: int = 0) -> str:
        """The type of an instruction's operand `index`: printed inline (`bf16[8,4]{1,0} %x`)
        or, as in compiled modules, the result type of the instruction it names."""
        args = ins.text.split(ins.opcode + "(", 1)
        if index == 0 and len(args) == 2:
            inline = _ARRAY.match(args[1].lstrip())
            if inline:
                return inline.group(0)
        if index < len(ins.operands):
            return self.types.get(ins.operands[index], "")
        return ""

    def sliced_reduce(self, ins: Instruction) -> bool:
        """Whether an all-reduce is the TPU's reduce-scatter form (an `all-reduce-scatter`
        fusion): its computation's root is a dynamic-slice of it, each device keeping its
        shard of the sum."""
        return any(i.root and i.opcode == "dynamic-slice" and i.operands[:1] == (ins.name,)
                   for i in self.computations.get(ins.computation, []))
