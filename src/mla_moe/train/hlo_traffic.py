"""HBM traffic of an optimized HLO module: a lower bound on the bytes one device reads from and
writes to its HBM per step, from the compiled program's own instructions.

    hbm_bytes(compiled.as_text()) -> {"per_step": 4.1e12, "once": 3.0e11}

What counts: per instruction, the operands it reads and the result it writes, **only where
they live in HBM** (memory space 0; `hlo_text`'s memory spaces). Buffers in VMEM, SMEM or on
the SparseCore are on-chip and count nothing; host buffers (space 5) count only at their HBM
end (an offloaded layer input counts the bytes read from HBM to send it, not the host write).

    fusion                    its HBM operands (an operand it only slices: the slices, as the
                              layer scan's weight at step i) + its HBM result (an in-place
                              dynamic-update-slice root: the update)
    copy-start                each HBM end of the copy once (HBM -> VMEM prefetch: the read)
    other async -start        the HBM buffers of its (operands, results) tuple
    dynamic-slice, slice      the slice read (if the operand is in HBM) + written (if the
                              result is)
    dynamic-update-slice      the update read and written in place
    Pallas kernel             nothing: what a kernel touches depends on its grid and on
                              data the text does not hold (megablox visits only the row tiles
                              of its groups; flash attention skips masked blocks and re-reads
                              K/V per query block), so no count of it is a bound;
                              `kernel_bytes` gives its operands and results once each, beside
                              the bound (other custom calls, e.g. cuBLAS, count like any op)
    parameter, constant, tuple, get-tuple-element, bitcast, *-done, control flow: nothing

A `while` body counts once per iteration (`per_step`) or once (`once`, as XLA's cost analysis
counts a loop body); a conditional counts its cheapest branch (the data decides which runs);
fusion bodies and reducers add
nothing of their own (their traffic is the fusion's).

Why a lower bound: each HBM operand is counted as read once and each result as written once,
whatever the fusion's tiling re-reads, and kernels count nothing; the compiler's own cost model
counts at least that (on loop-free programs the walk is never above
`cost_analysis()["bytes accessed"]`, tested).
"""

from __future__ import annotations

from mla_moe.train.hlo_text import HBM, Instruction, Module, arrays, type_bytes

_NO_TRAFFIC = frozenset((
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
    "iota"))
_SLICES = frozenset(("dynamic-slice", "slice", "gather"))
# custom_call_target of Pallas kernels: Mosaic TPU, Triton and Mosaic GPU.
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "triton_kernel_call",
                  "mosaic_gpu")


def is_kernel(ins: Instruction) -> bool:
    """Whether an instruction is a Pallas kernel (a custom call of a kernel target)."""
    return ins.opcode == "custom-call" and any(
        f'custom_call_target="{t}"' in ins.text for t in KERNEL_TARGETS)


def _hbm(type_text: str) -> float:
    return type_bytes(type_text, HBM)


class _Walk:
    """The bytes walk over one module (see the module's docstring)."""

    def __init__(self, module: Module):
        self.module = module
        self.by_name = {c: {i.name: i for i in ins} for c, ins in module.computations.items()}

    def operand_hbm(self, ins: Instruction, index: int) -> float:
        return _hbm(self.module.operand_type(ins, index))

    def param_read(self, comp: str, index: int, full: float) -> float:
        """Bytes a fusion reads of its operand `index` (`full` bytes in HBM): the slices taken
        where every use of the parameter is a slice, else all of it."""
        param = next((i for i in self.module.computations.get(comp, [])
                      if i.opcode == "parameter" and i.text.startswith(f"parameter({index})")),
                     None)
        return full if param is None or not full else min(full, self.uses(comp, param.name, full))

    def uses(self, comp: str, name: str, full: float) -> float:
        rows = self.module.computations.get(comp, [])
        if any(i.name == name and i.root for i in rows):
            return full  # the fusion's result: what its caller reads of it is the caller's
        total = 0.0
        for i in rows:
            if name not in i.operands:
                continue
            first = i.operands[0] == name
            if i.opcode in _SLICES and first:
                total += type_bytes(i.result)
            elif i.opcode == "dynamic-update-slice" and first:
                pass  # updated in place: the update is counted as the fusion's output
            elif i.opcode == "bitcast":
                total += self.uses(comp, i.name, full)
            elif i.opcode == "fusion" and i.called.get("calls"):
                callee = i.called["calls"][0]
                total += sum(self.param_read(callee, k, full)
                             for k, o in enumerate(i.operands) if o == name)
            else:
                return full
        return total

    def written(self, comp: str, result: str) -> float:
        """HBM bytes a fusion writes: its HBM result, an in-place dynamic-update-slice root
        writing only its update."""
        hbm = _hbm(result)
        rows = self.by_name.get(comp, {})
        root = next((i for i in rows.values() if i.root), None)
        if root is None:
            return hbm

        def size(ins: Instruction) -> float:
            if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
                return type_bytes(self.module.types.get(ins.operands[1], ""))
            if ins.opcode == "tuple":
                return sum(size(rows[o]) for o in ins.operands if o in rows)
            return type_bytes(ins.result)
        return min(hbm, size(root))

    def instruction(self, ins: Instruction) -> float:
        """HBM bytes one instruction reads and writes."""
        op = ins.opcode
        if op in _NO_TRAFFIC or op.endswith("-done") or is_kernel(ins):
            return 0.0
        if op == "copy-start":  # (destination, source, context): each HBM end once
            ends = arrays(ins.result)[:2]
            return float(sum(a.nbytes for a in ends if a.space == HBM))
        if op.endswith("-start"):
            return _hbm(ins.result)
        if op in ("dynamic-slice", "slice"):
            read = type_bytes(ins.result) if self.operand_hbm(ins, 0) else 0.0
            return read + _hbm(ins.result)
        if op == "dynamic-update-slice" and len(ins.operands) > 1:
            update = self.operand_hbm(ins, 1)
            return update + (type_bytes(self.module.operand_type(ins, 1))
                             if self.operand_hbm(ins, 0) else 0.0)
        if op == "fusion" and ins.called.get("calls"):
            callee = ins.called["calls"][0]
            read = sum(self.param_read(callee, k, self.operand_hbm(ins, k))
                       for k in range(len(ins.operands)))
            return read + self.written(callee, ins.result)
        return self.operands_and_result(ins)

    def operands_and_result(self, ins: Instruction) -> float:
        return sum(self.operand_hbm(ins, k) for k in range(len(ins.operands))) + _hbm(ins.result)

    def kernel(self, ins: Instruction) -> float:
        return self.operands_and_result(ins) if is_kernel(ins) else 0.0


def hbm_bytes(hlo_text: str, *, module: Module | None = None) -> dict[str, float]:
    """HBM bytes per device the module's instructions read and write (a lower bound; see the
    module's docstring): {"per_step": each loop body times its trip count, "once": each loop
    body once, as XLA's cost analysis counts it}."""
    module = module or Module(hlo_text)
    walk = _Walk(module)
    return {"per_step": module.total(walk.instruction, into_calls=False),
            "once": module.total(walk.instruction, trips=False, into_calls=False)}


def kernel_bytes(hlo_text: str, *, module: Module | None = None) -> float:
    """The HBM operands and results of the module's Pallas kernels, each once, per step: what
    the bound leaves out, as the kernels would move it reading and writing each buffer once
    and whole (a kernel may touch less, skipping tiles, or more, re-reading blocks)."""
    module = module or Module(hlo_text)
    return module.total(_Walk(module).kernel, into_calls=False)


def breakdown(hlo_text: str, key, *, module: Module | None = None) -> dict[str, float]:
    """The per-step HBM bytes of `hbm_bytes`, summed by `key(instruction)` (e.g. a prefix of
    its `op_name`): where a program's traffic goes."""
    module = module or Module(hlo_text)
    walk = _Walk(module)
    out: dict[str, float] = {}

    def visit(comp: str, times: float) -> None:
        for ins in module.computations.get(comp, []):
            nbytes = walk.instruction(ins)
            if nbytes:
                k = key(ins)
                out[k] = out.get(k, 0.0) + times * nbytes
            if ins.opcode == "while":
                for role in ("body", "condition"):
                    for c in ins.called.get(role, ()):
                        visit(c, times * module.trip_count(ins))
            elif ins.opcode == "conditional":
                branches = [c for role in ("branch_computations", "true_computation",
                                           "false_computation") for c in ins.called.get(role, ())]
                if branches:
                    visit(min(branches, key=lambda c: module.total(
                        walk.instruction, into_calls=False, start=c)), times)
            elif ins.opcode == "call":
                for c in ins.called.get("to_apply", ()):
                    visit(c, times)
    visit(module.entry, 1.0)
    return out
