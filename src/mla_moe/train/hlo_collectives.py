"""The collectives of an optimized HLO module: how many run per step and how many bytes they
move per device.

Counts are per execution of the program, not per line of text: an op inside the layer scan's
`while` body counts once per iteration (the loop's `known_trip_count`, else the constant bound
of its `i < N` condition), an op in a called computation once per call. Bytes are the op's
result per device (for an all-gather, the gathered array; for an all-reduce, the reduced
array), the usual proxy for what crosses the links. A ragged all-to-all is the exception: its
result is a preallocated receive buffer sized for the worst case (the MoE dispatch sizes it at
`dispatch_capacity_factor` x the balanced share), and what it sends is only known at run time
(`send_sizes`), at most its input operand. It counts as the smaller of the input operand and
the receive buffer: an upper bound on the bytes sent, exact for a balanced routing with no
dropped rows (dispatch: every row of the input is sent; combine: every row of the smaller
result comes back).

    table = collectives(compiled.as_text())
    table["all-gather"] -> {"count": 183, "bytes": 2.1e10, "ops": 3}

Across TPU slices (multislice), `dcn_collectives` reads the transfers XLA hands to the
data-center network. `bytes_accessed` walks the same computations for the HBM bytes their
instructions read and write, counting a loop body once (as XLA's cost analysis does) and once
per iteration: what the compiler's "bytes accessed" misses of a scanned model. `instructions`
lists the module's instructions as parsed here, for other readers of the text.
"""

from __future__ import annotations

import re
from typing import NamedTuple

KINDS = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
         "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|"
                    r"true_computation|false_computation)=\{?([^}\s]+(?:,\s*%?[\w.\-]+)*)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_S32_CONSTANT = re.compile(r"s32\[\]\S* constant\((\d+)\)")


def _trip_count(line: str, bodies: dict[str, list[str]]) -> int:
    """Iterations of a `while`: XLA's known_trip_count, else the bound N of a condition
    `counter < N` with a constant N (the form lax.scan and fori_loop lower to); 1 if neither."""
    m = _TRIP.search(line)
    if m:
        return int(m.group(1))
    m = _CONDITION.search(line)
    cond = bodies.get(m.group(1), []) if m else []
    if any("direction=LT" in ln for ln in cond):
        bounds = [int(c) for ln in cond for c in _S32_CONSTANT.findall(ln)]
        if len(bounds) == 1:
            return bounds[0]
    return 1


def _array_bytes(dtype: str, dims: str) -> float:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    if dtype.startswith("f8") or dtype.startswith("f4"):
        return n * (1 if dtype.startswith("f8") else 0.5)
    return n * _BYTES.get(dtype, 0)


def type_bytes(type_text: str) -> float:
    """Bytes of every array in an HLO type, e.g. "(f32[8,128]{1,0}, bf16[4])" -> 4104."""
    return float(sum(_array_bytes(d, s) for d, s in _ARRAY.findall(type_text)))


def _split_result(rest: str) -> tuple[str, str]:
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


def _result_bytes(kind: str, opcode: str, result: str) -> float:
    arrays = [_array_bytes(d, s) for d, s in _ARRAY.findall(result)]
    if not arrays:
        return 0.0
    if opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
        # (operands, results[, contexts]): the gathered / received arrays are the results.
        return float(arrays[1] if kind == "collective-permute" and len(arrays) > 1
                     else max(arrays))
    return float(sum(arrays))


def _kind(opcode: str) -> str | None:
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in KINDS else None


def _computations(hlo_text: str) -> tuple[list[tuple[str, list[str]]], dict[str, int]]:
    """The module's computations (name, lines) and how many times each runs per execution."""
    comps: list[tuple[str, list[str]]] = []
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = (m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.startswith("}"):  # "}" or, for a SparseCore one, '}, execution_thread="..."'
            comps.append(current)
            current = None
        else:
            current[1].append(line)
    bodies = dict(comps)
    mult = {name: 0 for name, _ in comps}
    if entry is None and comps:
        entry = comps[-1][0]
    mult[entry] = 1
    # Callees are printed before their callers: walk callers first.
    for name, lines in reversed(comps):
        m = mult.get(name, 0)
        if not m:
            continue
        for line in lines:
            trip = _trip_count(line, bodies) if " while(" in line else 1
            for role, targets in _CALLS.findall(line):
                times = trip if role in ("body", "condition") else 1
                for callee in re.findall(r"[\w.\-]+", targets):
                    if callee in mult:
                        mult[callee] += m * times
    return comps, mult


_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")


def _result_types(comps) -> dict[str, str]:
    """{instruction name: its result type} over the module (names are unique in a module)."""
    types = {}
    for _, lines in comps:
        for line in lines:
            m = _NAME.match(line)
            if m:
                types[m.group(1)] = _split_result(line.split("=", 1)[1].strip())[0]
    return types


def _first_operand_bytes(line: str, opcode: str, types: dict[str, str]) -> float | None:
    """Bytes of an op's first operand: its type printed inline (`bf16[8,4]{1,0} %x`) or, as in
    compiled TPU modules, the result type of the instruction it names."""
    args = line.split(opcode + "(", 1)
    if len(args) < 2:
        return None
    inline = _ARRAY.match(args[1].lstrip())
    if inline:
        return _array_bytes(*inline.groups())
    name = re.match(r"\s*%?([\w.\-]*)", args[1]).group(1)
    arrays = _ARRAY.findall(types.get(name, ""))
    return float(sum(_array_bytes(*a) for a in arrays)) if arrays else None


def _ragged_bytes(line: str, opcode: str, result: str, types: dict[str, str]) -> float:
    """min(input operand, receive buffer) of a ragged all-to-all. The async form (GPU) returns
    ((input, output, offsets and sizes...), output); the sync form (TPU) the output."""
    arrays = [_array_bytes(d, s) for d, s in _ARRAY.findall(result)]
    if not arrays:
        return 0.0
    if opcode.endswith("-start"):
        return float(min(arrays[0], arrays[-1]))
    sent = _first_operand_bytes(line, opcode, types)
    return float(sum(arrays) if sent is None else min(sum(arrays), sent))


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": runs per step, "bytes": bytes per device per step, "ops": ops in the
    text}} for every collective kind (zeros where absent). Ragged all-to-alls count the
    smaller of their input operand and receive buffer (see the module's docstring)."""
    comps, mult = _computations(hlo_text)
    types = _result_types(comps)
    table = {k: {"count": 0, "bytes": 0.0, "ops": 0} for k in KINDS}
    for name, lines in comps:
        m = mult.get(name, 0)
        for line in lines:
            if "=" not in line:
                continue
            rest = line.split("=", 1)[1].strip()
            result, opcode = _split_result(rest)
            kind = _kind(opcode)
            if kind is None:
                continue
            row = table[kind]
            row["ops"] += 1
            row["count"] += m
            if kind == "ragged-all-to-all":
                nbytes = _ragged_bytes(line, opcode, result, types)
            else:
                nbytes = _result_bytes(kind, opcode, result)
            row["bytes"] += m * nbytes
    return table


_DCN_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_DCN_OP = re.compile(r'_xla_megascale_reduce_operation="(\w+)"')


def dcn_collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """The collectives that cross TPU slices, over the data-center network.

    A multislice TPU program keeps its in-slice collectives as HLO ops whose replica groups
    name one slice's devices; each cross-slice one becomes a host-transfer `send` (with its
    `recv`) tagged `_xla_megascale_transfer_type` (e.g. "ALL_REDUCE") and, for reductions,
    `_xla_megascale_reduce_operation` ("SUM"). Returns {"ALL_REDUCE/SUM": {"count", "bytes",
    "ops"}, ...}: runs per step, bytes sent per device per step, sends in the text."""
    comps, mult = _computations(hlo_text)
    table: dict[str, dict[str, float]] = {}
    for name, lines in comps:
        m = mult.get(name, 0)
        for line in lines:
            if "=" not in line or " send(" not in line:
                continue
            kind = _DCN_TYPE.search(line)
            if kind is None:
                continue
            op = _DCN_OP.search(line)
            key = kind.group(1) + (f"/{op.group(1)}" if op else "")
            result, _ = _split_result(line.split("=", 1)[1].strip())
            arrays = _ARRAY.findall(result)
            row = table.setdefault(key, {"count": 0, "bytes": 0.0, "ops": 0})
            row["ops"] += 1
            row["count"] += m
            row["bytes"] += m * (_array_bytes(*arrays[0]) if arrays else 0.0)
    return table


# Bytes accessed: what the step reads and writes in HBM, per device. XLA's cost analysis gives it
# ("bytes accessed") but counts a `while` body once; the layer scan runs its body once per layer.
# `bytes_accessed` counts the text the same way per computation and walks the trip counts, so
# that per step = the compiler's count + (per-step count - once count) of this walk.
_NO_TRAFFIC = frozenset((
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"))
_SLICES = frozenset(("dynamic-slice", "slice", "gather"))
_OPERAND = re.compile(r"%([\w.\-]+)")
_ENTRY = re.compile(r"^ENTRY\s+%?([\w.\-]+)", re.M)


def _operands(line: str, opcode: str) -> list[str]:
    """The names an instruction's operand list refers to, in order."""
    args = line.split(opcode + "(", 1)
    if len(args) < 2:
        return []
    depth, end = 1, len(args[1])
    for i, ch in enumerate(args[1]):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return _OPERAND.findall(args[1][:end])


class _Module:
    """A parsed module for the bytes walk: instructions by computation, result types, and the
    computations whose traffic is their caller's (fusion bodies, reducers)."""

    def __init__(self, hlo_text: str):
        self.comps, _ = _computations(hlo_text)
        self.types = _result_types(self.comps)
        self.insts: dict[str, list[tuple[str, str, str, list[str], str]]] = {}
        fused: set[str] = set()
        for name, lines in self.comps:
            rows = []
            for line in lines:
                m = _NAME.match(line)
                if not m:
                    continue
                result, opcode = _split_result(line.split("=", 1)[1].strip())
                rows.append((m.group(1), opcode, result, _operands(line, opcode), line))
                if opcode != "call" and opcode != "while" and opcode != "conditional":
                    fused.update(c for role, targets in _CALLS.findall(line)
                                 if role in ("calls", "to_apply")
                                 for c in re.findall(r"[\w.\-]+", targets))
            self.insts[name] = rows
        self.fused = fused  # fusion bodies and reducers: their traffic is their caller's

    def bytes_of(self, name: str) -> float:
        return type_bytes(self.types.get(name, ""))

    def _callee(self, line: str) -> str | None:
        m = re.search(r"\bcalls=%?([\w.\-]+)", line)
        return m.group(1) if m else None

    def _param_read(self, comp: str, index: int, full: float) -> float:
        """Bytes a fusion reads of its operand `index`: the slices taken where every use of the
        parameter is a slice (the layer scan's weight at step i), else the whole operand."""
        rows = self.insts.get(comp, [])
        param = next((n for n, op, _, _, ln in rows
                      if op == "parameter" and f"parameter({index})" in ln), None)
        return full if param is None else min(full, self._uses(comp, param, full))

    def _uses(self, comp: str, name: str, full: float) -> float:
        rows = self.insts.get(comp, [])
        if any(r[0] == name and r[4].lstrip().startswith("ROOT") for r in rows):
            return full  # the fusion's result: what its caller reads of it is the caller's
        total = 0.0
        for n, opcode, result, operands, line in rows:
            if name not in operands:
                continue
            first = operands[0] == name
            if opcode in _SLICES and first:
                total += type_bytes(result)
            elif opcode == "dynamic-update-slice" and first:
                pass  # updated in place: the update is counted as the fusion's output
            elif opcode == "bitcast":
                total += self._uses(comp, n, full)
            elif opcode == "fusion" and self._callee(line):
                for i, o in enumerate(operands):
                    if o == name:
                        total += self._param_read(self._callee(line), i, full)
            else:
                return full
        return total

    def _written(self, comp: str, result: str) -> float:
        """Bytes a fusion writes: its result, less what an in-place dynamic-update-slice root
        leaves untouched."""
        rows = self.insts.get(comp, [])
        root = next((r for r in rows if r[4].lstrip().startswith("ROOT")), None)
        if root is None:
            return type_bytes(result)
        by_name = {r[0]: r for r in rows}

        def written(row) -> float:
            _, opcode, res, operands, _ = row
            if opcode == "dynamic-update-slice" and len(operands) > 1:
                return self.bytes_of(operands[1])
            if opcode == "tuple":
                return sum(written(by_name[o]) if o in by_name else 0.0 for o in operands)
            return type_bytes(res)
        return written(root)

    def instruction_bytes(self, opcode: str, result: str, operands: list[str],
                          line: str) -> float:
        """HBM bytes one instruction reads and writes."""
        if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
            return 0.0
        if opcode.endswith("-start"):
            return type_bytes(result)  # (operands, results[, context]) buffers
        if opcode in ("dynamic-slice", "slice"):
            return 2.0 * type_bytes(result)
        if opcode == "dynamic-update-slice" and len(operands) > 1:
            return 2.0 * self.bytes_of(operands[1])
        callee = self._callee(line) if opcode == "fusion" else None
        if callee:
            read = sum(self._param_read(callee, i, self.bytes_of(o))
                       for i, o in enumerate(operands))
            return read + self._written(callee, result)
        return sum(self.bytes_of(o) for o in operands) + type_bytes(result)


def bytes_accessed(hlo_text: str) -> dict[str, float]:
    """HBM bytes per device the module's instructions read and write, from the optimized text:
    {"per_step": with each loop body times its trip count, "once": each loop body once, as
    XLA's cost analysis counts it}.

    Per instruction, operands + result, as XLA's HloCostAnalysis counts them: a fusion counts
    its operands and its result, an operand it only slices (the scan's stacked weights) as the
    slices, a dynamic-update-slice root as the update; tuples, bitcasts, parameters and
    constants move nothing. The fusion bodies themselves add nothing (their traffic is the
    fusion's). A conditional counts its costliest branch. `per_step - once` is what the
    compiler's count misses."""
    mod = _Module(hlo_text)
    bodies = dict(mod.comps)
    memo: dict[tuple[str, bool], float] = {}

    def total(name: str, trips: bool) -> float:
        if (name, trips) in memo:
            return memo[name, trips]
        memo[name, trips] = 0.0  # a malformed cycle counts nothing
        out = 0.0
        for _, op, res, operands, line in mod.insts.get(name, []):
            out += mod.instruction_bytes(op, res, operands, line)
            called = {role: re.findall(r"[\w.\-]+", targets)
                      for role, targets in _CALLS.findall(line)}
            if op == "while":
                n = _trip_count(line, bodies) if trips else 1
                out += n * sum(total(c, trips) for role in ("body", "condition")
                               for c in called.get(role, []))
            elif op == "conditional":
                branches = [c for role in ("branch_computations", "true_computation",
                                           "false_computation") for c in called.get(role, [])]
                out += max((total(c, trips) for c in branches), default=0.0)
            elif op == "call":
                out += sum(total(c, trips) for c in called.get("to_apply", []))
        memo[name, trips] = out
        return out

    m = _ENTRY.search(hlo_text)
    entry = m.group(1) if m else (mod.comps[-1][0] if mod.comps else "")
    return {"per_step": total(entry, True), "once": total(entry, False)}


class Instruction(NamedTuple):
    """One instruction of an HLO module's text, as `instructions` reads it."""

    computation: str  # the computation that holds it
    name: str
    result: str  # its result type: "f32[8,128]{1,0}", or a tuple "(f32[8]{0}, s32[])"
    opcode: str
    called: dict[str, tuple[str, ...]]  # computations it calls, by role ("calls", "body", ...)
    text: str  # what follows the result type: "opcode(operands), attributes"


def instructions(hlo_text: str) -> list[Instruction]:
    """Every instruction of the module, computation by computation, in text order."""
    comps, _ = _computations(hlo_text)
    out = []
    for comp, lines in comps:
        for line in lines:
            m = _NAME.match(line)
            if not m:
                continue
            rest = line.split("=", 1)[1].strip()
            result, opcode = _split_result(rest)
            called: dict[str, tuple[str, ...]] = {}
            for role, targets in _CALLS.findall(line):
                called[role] = called.get(role, ()) + tuple(re.findall(r"[\w.\-]+", targets))
            text = rest[len(result) :].lstrip()
            out.append(Instruction(comp, m.group(1), result, opcode, called, text))
    return out
