"""The collectives of an optimized HLO module: how many run per step and the bytes each device
receives over its links, in one convention for every form the compilers print.

    table = collectives(compiled.as_text())
    table["all-gather"] -> {"count": 183, "bytes": 2.1e10, "array_bytes": 2.2e10, "ops": 3}

Counts are per execution of the program: a loop body's ops once per iteration, a
conditional's cheapest branch (by the bytes below) only. For a collective over groups of S
devices and its full array of X bytes (the gathered result, the scattered or reduced input,
the exchanged buffer), `bytes` is what one device must receive, with the best algorithm,
whatever form the compiler printed (sync, async `-start`, SparseCore `call-start`, or the TPU's
`all-reduce-scatter` fusion: an all-reduce whose result is sliced to the device's shard, so a
reduce-scatter):

    all-gather, reduce-scatter, all-to-all   (S - 1) / S * X
    all-reduce                               2 (S - 1) / S * X   (a reduce-scatter + all-gather)
    collective-permute                       X  (0 where every pair sends to itself)
    ragged-all-to-all                        (S - 1) / S * min(input, receive buffer)

A ragged all-to-all's receive buffer is sized for the worst case (the MoE dispatch: at
`dispatch_capacity_factor` x the balanced share) and what it sends is known only at run time, at
most its input: the smaller of the two is exact for a balanced routing with no dropped rows.
`array_bytes` is X itself, summed like `bytes`.

With `devices_per_host` (GPU clusters, whose hosts are joined by one NIC per GPU), each row also
has `network_bytes`: what must enter a device's host over the network, per NIC, when the
collective is done host-wise (the host's devices share what crosses once): for a group spanning
H hosts, (H - 1) X / S for all-gather and reduce-scatter, twice that for all-reduce, (H - 1) / H
X for all-to-all, X for a permute between hosts. Devices are numbered host-major.

Across TPU slices (multislice), `dcn_collectives` reads the transfers XLA hands to the
data-center network.
"""

from __future__ import annotations

import math
import re

import numpy as np

from mla_moe.train.hlo_text import Instruction, Module, arrays, type_bytes

KINDS = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
         "collective-permute")

_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:<=\[([\d,]+)\](?:T\(([\d,]+)\))?)?"
                          r"\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_REPLICAS = re.compile(r"\breplica_count=(\d+)")


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(perm) if perm else ids


def replica_groups(text: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective's attributes, in any printed form: a list
    (`{{0,1},{2,3}}`), an iota (`[2,4]<=[4,2]T(1,0)`), or named mesh axes
    (`mesh['x'=4,'y'=2] {'x'}`). No groups, or an empty list: all `num_devices` in one."""
    m = _GROUPS_IOTA.search(text)
    if m:
        perm = [int(p) for p in m.group(4).split(",")] if m.group(4) else None
        ids = _iota([int(d) for d in m.group(3).split(",")], perm)
        return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = _GROUPS_MESH.search(text)
    if m:
        axes = [(a.split("=")[0].strip(" '"), int(a.split("=")[1]))
                for a in m.group(1).split(",") if "=" in a]
        names, dims = [a for a, _ in axes], [n for _, n in axes]
        order = ([int(d) for d in m.group(2).split(",")] if m.group(2) else dims)
        perm = [int(p) for p in m.group(3).split(",")] if m.group(3) else None
        ids = _iota(order, perm).reshape(dims)
        chosen = [names.index(a.strip(" '")) for a in m.group(4).split(",") if a.strip(" '")]
        rest = [i for i in range(len(dims)) if i not in chosen]
        size = math.prod(dims[i] for i in chosen)
        return ids.transpose(rest + chosen).reshape(-1, size).tolist()
    m = _GROUPS_LIST.search(text)
    if m and m.group(1).strip():
        return [[int(d) for d in g.split(",") if d.strip()]
                for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    return [list(range(num_devices))]


def _elements(type_text: str) -> list[str]:
    """The top-level elements of a tuple type ("(A, (B, C))" -> ["A", "(B, C)"]); a non-tuple
    type is its own one element."""
    t = type_text.strip()
    if not t.startswith("("):
        return [t]
    out, depth, start = [], 0, 1
    for i, ch in enumerate(t):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                out.append(t[start:i])
        elif ch == "," and depth == 1:
            out.append(t[start:i])
            start = i + 1
    return [e.strip() for e in out if e.strip()]


def _kind(module: Module, ins: Instruction) -> str | None:
    base = ins.opcode.removesuffix("-start")
    if base not in KINDS:
        return None
    if base == "all-reduce" and module.sliced_reduce(ins):
        return "reduce-scatter"
    return base


def _full_bytes(module: Module, kind: str, ins: Instruction) -> float:
    """X of the module's docstring: the collective's full array, per device."""
    parts = _elements(ins.result)
    start = ins.opcode.endswith("-start")
    if kind == "ragged-all-to-all":
        out = arrays(ins.result)
        if start:  # ((input, output, offsets and sizes...), output)
            return min(out[0].nbytes, out[-1].nbytes) if out else 0.0
        sent = type_bytes(module.operand_type(ins, 0)) or math.inf
        return min(sum(a.nbytes for a in out), sent)
    if kind == "reduce-scatter":
        operand = parts[0] if start and len(parts) > 1 else module.operand_type(ins, 0)
        return type_bytes(operand) or type_bytes(ins.result)
    if start and len(parts) > 1:  # (operands, results[, contexts])
        return type_bytes(parts[1])
    return type_bytes(ins.result)


def _link_bytes(kind: str, full: float, size: int, ins: Instruction) -> float:
    if kind == "collective-permute":
        pairs = _PAIRS.search(ins.text)
        self_only = pairs and all(a == b for a, b in re.findall(r"\{(\d+),(\d+)\}",
                                                                 pairs.group(1)))
        return 0.0 if self_only else full
    share = (size - 1) / size if size else 0.0
    return (2 if kind == "all-reduce" else 1) * share * full


def _network_bytes(kind: str, full: float, group: list[int], per_host: int,
                   ins: Instruction) -> float:
    size = len(group)
    hosts = len({d // per_host for d in group})
    if kind == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", (_PAIRS.search(ins.text) or [""])[0])
        cross = [int(a) // per_host != int(b) // per_host for a, b in pairs]
        return full * (sum(cross) / len(cross)) if cross else 0.0
    if hosts <= 1:
        return 0.0
    if kind in ("all-to-all", "ragged-all-to-all"):
        return (hosts - 1) / hosts * full
    return (2 if kind == "all-reduce" else 1) * (hosts - 1) * full / size


def num_devices(hlo_text: str) -> int:
    """Devices the module runs on: its partitions x replicas (1 where the header says
    neither)."""
    head = hlo_text.split("\n", 1)[0]
    p, r = _PARTITIONS.search(head), _REPLICAS.search(head)
    return (int(p.group(1)) if p else 1) * (int(r.group(1)) if r else 1)


def collectives(hlo_text: str, *, devices_per_host: int = 0,
                module: Module | None = None) -> dict[str, dict[str, float]]:
    """{kind: {"count": runs per step, "ops": ops in the text, "bytes": bytes each device
    receives per step, "array_bytes": the full arrays' bytes per step[, "network_bytes": per
    NIC, with devices_per_host]}} for every kind in KINDS (zeros where absent)."""
    module = module or Module(hlo_text)
    devices = num_devices(hlo_text)
    table = {k: {"count": 0, "ops": 0, "bytes": 0.0, "array_bytes": 0.0} for k in KINDS}
    if devices_per_host:
        for row in table.values():
            row["network_bytes"] = 0.0
    # Each collective's kind, full array and replica groups, read once.
    found = {}
    for ins in module.instructions():
        kind = _kind(module, ins)
        if kind is not None:
            found[ins.name] = (ins, kind, _full_bytes(module, kind, ins),
                               replica_groups(ins.text, devices))

    def link(ins: Instruction) -> float:
        if ins.name not in found:
            return 0.0
        _, kind, full, groups = found[ins.name]
        return _link_bytes(kind, full, len(groups[0]), ins)

    # Of a conditional's branches, the cheapest (by link bytes) counts: the data decides which
    # runs, and a lower bound cannot assume the costlier.
    runs = module.runs_picking(lambda comp: module.total(link, start=comp))
    for ins, kind, full, groups in found.values():
        n = runs.get(ins.computation, 0)
        row = table[kind]
        row["ops"] += 1
        row["count"] += n
        row["array_bytes"] += n * full
        row["bytes"] += n * link(ins)
        if devices_per_host:
            row["network_bytes"] += n * max(
                _network_bytes(kind, full, g, devices_per_host, ins) for g in groups)
    return table


_DCN_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_DCN_OP = re.compile(r'_xla_megascale_reduce_operation="(\w+)"')


def dcn_collectives(hlo_text: str, *, module: Module | None = None
                    ) -> dict[str, dict[str, float]]:
    """The collectives that cross TPU slices, over the data-center network.

    A multislice TPU program keeps its in-slice collectives as HLO ops whose replica groups
    name one slice's devices; each cross-slice one becomes a host-transfer `send` (with its
    `recv`) tagged `_xla_megascale_transfer_type` (e.g. "ALL_REDUCE") and, for reductions,
    `_xla_megascale_reduce_operation` ("SUM"). Returns {"ALL_REDUCE/SUM": {"count", "bytes",
    "ops"}, ...}: runs per step, bytes sent per device per step, sends in the text."""
    module = module or Module(hlo_text)
    table: dict[str, dict[str, float]] = {}
    for ins in module.instructions():
        if ins.opcode != "send":
            continue
        kind = _DCN_TYPE.search(ins.text)
        if kind is None:
            continue
        op = _DCN_OP.search(ins.text)
        key = kind.group(1) + (f"/{op.group(1)}" if op else "")
        runs = module.runs.get(ins.computation, 0)
        sent = arrays(ins.result)
        row = table.setdefault(key, {"count": 0, "bytes": 0.0, "ops": 0})
        row["ops"] += 1
        row["count"] += runs
        row["bytes"] += runs * (sent[0].nbytes if sent else 0.0)
    return table


def instructions(hlo_text: str) -> list[Instruction]:
    """Every instruction of the module, computation by computation, in text order."""
    return Module(hlo_text).instructions()
