"""Where the CPU train step spends its time: share of step time per HLO op category, from a
jax.profiler trace of the compiled step, and the same categories counted in a TPU compile.

    python bench/profile_cpu.py                      # bench/model_cpu.py's forward+backward
    python bench/profile_cpu.py --case tiny          # bench/train_cpu.py's tiny train step
    python bench/profile_cpu.py --tpu v5p:2x2x1      # + the tiny step compiled for TPU (counts)

Method. The step is compiled once; its optimized HLO (`compiled.as_text()`, the module that
`--xla_dump_to` writes after optimizations) names every instruction. XLA:CPU runs one thunk per
instruction and the profiler records each as an event named after it, on the thread that ran
it. Per thread, an event's self time is its duration less that of the instruction events
nested in it (a while or conditional thunk contains its body's events), so nothing is counted
twice; time in the thunk executor outside any instruction is "runtime". Each instruction gets
one category, from its opcode or, for a fusion, from the ops fused into it, in this order:
  matmul         dot / convolution (alone or fused: XLA:CPU's YNNPACK fusions)
  scatter/gather scatter, gather, dynamic-slice, dynamic-update-slice
  sort           sort
  reduce         reduce, reduce-window
  copy/transpose copy, transpose, and fusions of only data movement (slice, concatenate,
                 pad, broadcast, transpose, copy), or elementwise fusions that also transpose
  elementwise    every other fusion or elementwise op
  loop control   while / conditional / call thunks themselves (their bodies are counted by
                 op) and the ops of while conditions
  runtime        the thunk executor's own time between instructions
Shares are of the summed self time of all threads (two cores can run two thunks at once);
"ms/step" is that sum per step. The "where" table groups the same times by the name scopes
of the model (layer_i/attention, layer_i/moe, head, mtp_k, loss; bwd = the transpose of jvp).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mla_moe.train import hlo_collectives, metrics

CATEGORIES = (
    "matmul",
    "elementwise",
    "copy/transpose",
    "reduce",
    "scatter/gather",
    "sort",
    "loop control",
    "async copy",
    "runtime",
    "other",
)
_MATMUL = {"dot", "convolution"}
_SCATTER_GATHER = {"scatter", "gather", "dynamic-slice", "dynamic-update-slice"}
_REDUCE = {"reduce", "reduce-window"}
_TRANSPOSE = {"transpose", "copy"}
_MOVE = {
    "slice",
    "concatenate",
    "pad",
    "broadcast",
    "reshape",
    "bitcast",
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "iota",
    "reverse",
    "transpose",
    "copy",
}
_CONTROL = {"while", "conditional", "call"}
_ASYNC_COPY = {"copy-start", "copy-done"}  # XLA:TPU's prefetches between memory spaces
_OTHER = {
    "rng-bit-generator",
    "rng",
    "custom-call",
    "infeed",
    "outfeed",
    "after-all",
    "partition-id",
    "replica-id",
    "all-reduce",
    "all-gather",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
    "send",
    "recv",
    "copy-start",
    "copy-done",
}

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SCOPE = re.compile(r"\b(layers?_[\d_]+|mtp_\d+|embed|head|loss)\b")
_PART = re.compile(r"\b(attention|moe|mlp)\b")


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    computation: str
    called: tuple[str, ...]
    op_name: str
    dims: tuple[int, ...]  # of an array result (empty for a tuple)
    nbytes: float  # of the result (all arrays of a tuple)
    text: str  # `opcode(operands), attributes`


def parse_hlo(text: str) -> tuple[dict[str, Instr], dict[str, list[str]], set[str]]:
    """(instructions by name, instruction names by computation, while-condition names), from
    hlo_collectives' reading of the module."""
    instrs, comps, conditions = {}, collections.defaultdict(list), set()
    for ins in hlo_collectives.instructions(text):
        conditions.update(ins.called.get("condition", ()))
        on = _OP_NAME.search(ins.text)
        shape = re.match(r"\w+\[([\d,]*)\]", ins.result)
        dims = tuple(int(x) for x in shape.group(1).split(",") if x) if shape else ()
        called = tuple(c for names in ins.called.values() for c in names)
        instrs[ins.name] = Instr(
            ins.name,
            ins.opcode,
            ins.computation,
            called,
            on.group(1) if on else "",
            dims,
            hlo_collectives.type_bytes(ins.result),
            ins.text,
        )
        comps[ins.computation].append(ins.name)
    return instrs, comps, conditions


def _fused_opcodes(instr: Instr, instrs, comps) -> set[str]:
    ops, todo, seen = set(), list(instr.called), set()
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        for n in comps.get(c, ()):
            ops.add(instrs[n].opcode)
            todo.extend(instrs[n].called)
    return ops


def category(instr: Instr, instrs, comps, conditions) -> str:
    if instr.computation in conditions or instr.opcode in _CONTROL:
        return "loop control"
    if instr.opcode in _ASYNC_COPY:
        return "async copy"
    ops = _fused_opcodes(instr, instrs, comps) if instr.opcode == "fusion" else {instr.opcode}
    if ops & _MATMUL:
        return "matmul"
    if ops & _SCATTER_GATHER:
        return "scatter/gather"
    if "sort" in ops:
        return "sort"
    if ops & _REDUCE:
        return "reduce"
    if ops & _TRANSPOSE or (
        ops <= _MOVE
        and ops - {"parameter", "constant", "bitcast", "reshape", "tuple", "get-tuple-element"}
    ):
        return "copy/transpose"
    if ops & _OTHER:
        return "other"
    return "elementwise"


def matmul_flops(instr: Instr, instrs, comps) -> int:
    """2 x output elements x contracted size, over the dots in `instr` (or `instr` itself)."""
    dots = (
        [instr]
        if instr.opcode == "dot"
        else [
            instrs[n] for c in instr.called for n in comps.get(c, ()) if instrs[n].opcode == "dot"
        ]
    )
    flops = 0
    for d in dots:
        lhs = re.match(r"dot\(%?([\w.\-]+)", d.text).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", d.text).group(1)
        k = math.prod(instrs[lhs].dims[int(i)] for i in contracting.split(",") if i)
        flops += 2 * math.prod(d.dims) * k
    return flops


def dot_form(instr: Instr, instrs, comps) -> str:
    """`[2048,256]x[256,4096] c(1|0)`: the dot's operand shapes and contracting dims."""
    dots = (
        [instr]
        if instr.opcode == "dot"
        else [
            instrs[n] for c in instr.called for n in comps.get(c, ()) if instrs[n].opcode == "dot"
        ]
    )
    if not dots:
        return ""
    d = dots[0]
    lhs, rhs = re.match(r"dot\(%?([\w.\-]+), %?([\w.\-]+)", d.text).groups()
    lc = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", d.text).group(1)
    rc = re.search(r"rhs_contracting_dims=\{([\d,]*)\}", d.text).group(1)
    batch = " batch" if "lhs_batch_dims" in d.text else ""
    dims = lambda n: ",".join(map(str, instrs[n].dims))  # noqa: E731
    return f"[{dims(lhs)}]x[{dims(rhs)}] c({lc}|{rc}){batch}"


def where(instr: Instr) -> str:
    """`layer_3/attention bwd`-style label from the instruction's name scopes."""
    scope = _SCOPE.search(instr.op_name)
    part = _PART.search(instr.op_name)
    label = scope.group(1) if scope else "(outside the model)"
    if part:
        label += "/" + part.group(1)
    return label + (" bwd" if "transpose(" in instr.op_name else " fwd")


# --- the trace ----------------------------------------------------------------------------------
_EXECUTOR = "ThunkExecutor::Execute"


def self_times(xplane_path: str, names) -> tuple[collections.Counter, collections.Counter]:
    """(self ns, events) per instruction name (and "runtime"), summed over the CPU threads."""
    from jax.profiler import ProfileData

    out, calls = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(xplane_path).planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            evs = sorted(
                (
                    (e.start_ns, e.duration_ns, e.name)
                    for e in line.events
                    if e.name in names or e.name == _EXECUTOR
                ),
                key=lambda e: (e[0], -e[1]),
            )
            stack: list[list] = []  # [end, name, self, is_op]
            for start, dur, name in evs:
                while stack and stack[-1][0] <= start:
                    _close(stack.pop(), out)
                is_op = name != _EXECUTOR
                calls[name] += is_op
                parent = next((s for s in reversed(stack) if s[3]), None)
                if not is_op and parent is not None:
                    continue  # a nested executor (a loop body): its time stays with the loop
                if parent is None and stack:
                    parent = stack[-1]  # under the executor (which nests as it continues)
                if parent is not None:
                    parent[2] -= dur
                stack.append([start + dur, name, dur, is_op])
            while stack:
                _close(stack.pop(), out)
    return out, calls


def _close(entry, out):
    _, name, self_ns, is_op = entry
    out[name if is_op else "runtime"] += max(self_ns, 0)


def trace_step(run, steps: int, names):
    """Runs `run()` (one step, blocking) `steps` times under the profiler: (self ns and
    events per instruction and "runtime", summed over the steps; the steps' wall seconds)."""
    with tempfile.TemporaryDirectory() as d:
        walls = []
        with jax.profiler.trace(d):
            for _ in range(steps):
                t0 = time.perf_counter()
                run()
                walls.append(time.perf_counter() - t0)
        path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
        return (*self_times(path, names), walls)


# --- the steps ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    compiled: object  # the compiled executable (its as_text() is the optimized HLO)
    run: object  # () -> None: one step, blocking
    tokens: int  # tokens per step


def model_step() -> Step:
    """bench/model_cpu.py's jitted forward+backward on its config and batch."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from flax import nnx
    from model_cpu import CONFIG, jax_step

    from mla_moe import DeepSeekModel, ModelConfig

    cfg = ModelConfig(**CONFIG)
    step, params = jax_step(DeepSeekModel(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 256)))
    compiled = step.lower(params, tokens).compile()
    return Step(compiled, lambda: jax.block_until_ready(compiled(params, tokens)), tokens.size)


def tiny_config():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_cpu import tiny_config as config

    return config()


def tiny_step() -> Step:
    """bench/train_cpu.py's tiny train step: the trainer's jitted step, optimizer included."""
    from mla_moe.train import trainer
    from mla_moe.train.bench import random_batch

    config = tiny_config()
    t = config.train
    with trainer.run_mesh(config) as (cfg, mesh):
        built = trainer.build(config, mesh)
        state = built.init_fn()
        batch = random_batch(np.random.default_rng(0), cfg.vocab_size, config, built.batch_sh)
        fault = np.int32(-1)
        compiled = built.step_fn.lower(state, batch, fault).compile()
    box = [state]

    def run():  # the state is donated: carry it from step to step
        box[0], out = compiled(box[0], batch, fault)
        jax.block_until_ready((box[0], out))

    return Step(compiled, run, t.batch_size * t.seq_len)


def tpu_text(topology: str) -> str:
    """The optimized HLO of the tiny train step compiled for compile-only TPU devices."""
    from mla_moe.train import aot
    from pallas_kernels import targets

    target = f"tpu:{topology}"
    devices = targets.devices(target)
    config = tiny_config()
    config.mesh.data = len(devices)
    _, compiled = aot.compile_train(config, devices, target=target)
    return compiled.as_text()


# --- tables -------------------------------------------------------------------------------------
def count_table(text: str) -> tuple[collections.Counter, collections.Counter]:
    """(instructions, bytes written) per category in an optimized HLO module: fusions count
    once (their fused ops not), loop bodies once; parameters, tuples, constants, bitcasts and
    copy-done (its copy-start counts) are left out. Nothing is timed: this is what compares a
    CPU program with a TPU one."""
    instrs, comps, conditions = parse_hlo(text)
    fused = set()
    for ins in instrs.values():
        if ins.opcode == "fusion":
            fused.update(ins.called)
    counts, nbytes = collections.Counter(), collections.Counter()
    for ins in instrs.values():
        if ins.computation in fused or ins.opcode in (
            "parameter",
            "tuple",
            "get-tuple-element",
            "constant",
            "bitcast",
            "copy-done",
        ):
            continue
        cat = category(ins, instrs, comps, conditions)
        counts[cat] += 1
        if cat != "loop control":
            nbytes[cat] += ins.nbytes
    return counts, nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("model", "tiny"), default="model")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--top", type=int, default=15, help="rows of the slowest-instruction table")
    ap.add_argument(
        "--tpu",
        default="",
        help="also count the tiny step's ops compiled for "
        "this TPU topology, e.g. v5p:2x2x1 (compile only, libtpu)",
    )
    ap.add_argument(
        "--list",
        default="",
        choices=("",) + CATEGORIES,
        help="also list the slowest instructions of this category",
    )
    ap.add_argument(
        "--where",
        default="",
        help="list only instructions whose 'where' label "
        "contains this, e.g. 'layer_1/attention fwd'",
    )
    ap.add_argument("--hlo_out", default="", help="write the CPU step's optimized HLO here")
    args = ap.parse_args()

    step = model_step() if args.case == "model" else tiny_step()
    text = step.compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    instrs, comps, conditions = parse_hlo(text)
    step.run()  # warm up
    untraced, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step.run()
        untraced.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ns, calls, walls = trace_step(step.run, args.steps, set(instrs))
    peak = max(metrics.measure_matmul_flops(2048, 5, jnp.float32) for _ in range(2))

    by_cat, by_where, by_where_cat = (
        collections.Counter(),
        collections.Counter(),
        collections.defaultdict(collections.Counter),
    )
    for name, t in ns.items():
        if name == "runtime":
            cat, loc = "runtime", "(runtime)"
        else:
            ins = instrs[name]
            cat, loc = category(ins, instrs, comps, conditions), where(ins)
        by_cat[cat] += t
        by_where[loc] += t
        by_where_cat[loc][cat] += t
    total = sum(by_cat.values())
    per_step = 1e-6 / args.steps  # ns summed over the steps -> ms per step
    wall = statistics.median(untraced)

    print(
        f"\n{args.case}: {step.tokens} tokens/step; untraced step {wall * 1e3:.0f} ms wall, "
        f"{statistics.median(cpu) * 1e3:.0f} ms process CPU time (medians of {args.steps}; "
        f"CPU time is the steadier figure on a shared machine), "
        f"{statistics.median(walls) * 1e3:.0f} ms traced; busy thread time "
        f"{total * per_step:.0f} ms/step over {os.cpu_count()} CPUs; "
        f"{len(instrs)} HLO instructions; jax {jax.__version__}"
    )
    counts, _ = count_table(text)
    print("\n| category | ms/step | share | HLO ops |\n|---|---|---|---|")
    for cat in CATEGORIES:
        if by_cat[cat] or counts[cat]:
            print(
                f"| {cat} | {by_cat[cat] * per_step:.1f} | {by_cat[cat] / total:.1%} | "
                f"{counts[cat]} |"
            )
    print("\n| where | ms/step | share | matmul | non-matmul: largest |\n|---|---|---|---|---|")
    for loc, t in sorted(by_where.items(), key=lambda kv: -kv[1]):
        cats = by_where_cat[loc]
        rest = [(c, v) for c, v in cats.most_common() if c != "matmul"]
        big = f"{rest[0][0]} {rest[0][1] * per_step:.1f}" if rest else "-"
        print(
            f"| {loc} | {t * per_step:.1f} | {t / total:.1%} | "
            f"{cats['matmul'] * per_step:.1f} | {big} |"
        )
    print(
        "\n| slowest instructions | category | where | ms/step | calls/step |\n"
        "|---|---|---|---|---|"
    )
    for name, t in ns.most_common(args.top):
        if name == "runtime":
            continue
        ins = instrs[name]
        print(
            f"| {name} ({ins.opcode}) | {category(ins, instrs, comps, conditions)} | "
            f"{where(ins)} | {t * per_step:.1f} | {calls[name] / args.steps:g} |"
        )
    mm = [
        (n, t)
        for n, t in ns.items()
        if n != "runtime" and category(instrs[n], instrs, comps, conditions) == "matmul"
    ]
    print(
        "\n| slowest matmuls | form (operands, contracting dims) | ms/step | calls/step "
        "| GFLOP/s |\n|---|---|---|---|---|"
    )
    for name, t in sorted(mm, key=lambda kv: -kv[1])[: args.top]:
        ins = instrs[name]
        flops = matmul_flops(ins, instrs, comps) * calls[name]
        print(
            f"| {name} | {dot_form(ins, instrs, comps)} | {t * per_step:.1f} | "
            f"{calls[name] / args.steps:g} | {flops / t:.0f} |"
        )
    mm_flops = sum(matmul_flops(instrs[n], instrs, comps) * calls[n] for n, _ in mm)
    rate = mm_flops / sum(t for _, t in mm) * 1e9
    print(
        f"\nmatmuls: {mm_flops / args.steps / 1e9:.2f} GFLOP/step at {rate / 1e9:.0f} GFLOP/s "
        f"of their own time, {rate / peak:.2f} of the f32 peak ({peak / 1e9:.0f} GFLOP/s, a "
        f"2048^3 jnp.dot timed in this run); the step's matmul FLOPs over its wall time: "
        f"{mm_flops / args.steps / wall / peak:.3f} of the peak"
    )
    if args.list or args.where:
        print(
            f"\n| {args.list or 'all'} instructions in '{args.where or 'all'}' | category | "
            "where | ms/step | calls/step | shape | op_name |\n|---|---|---|---|---|---|---|"
        )
        rows = [
            (n, t)
            for n, t in ns.items()
            if n != "runtime"
            and args.list in ("", category(instrs[n], instrs, comps, conditions))
            and args.where in where(instrs[n])
        ]
        for name, t in sorted(rows, key=lambda kv: -kv[1])[: args.top]:
            ins = instrs[name]
            print(
                f"| {name} | {category(ins, instrs, comps, conditions)} | {where(ins)} | "
                f"{t * per_step:.1f} | {calls[name] / args.steps:g} | {list(ins.dims)} | "
                f"{ins.op_name.split('/', 1)[-1]} |"
            )
    if args.tpu:
        tpu, tpu_bytes = count_table(tpu_text(args.tpu))
        cpu, cpu_bytes = count_table(
            text if args.case == "tiny" else tiny_step().compiled.as_text()
        )
        print(
            f"\n| tiny train step, optimized HLO | CPU ops | CPU MB written | TPU {args.tpu} "
            "ops | TPU MB written per chip |\n|---|---|---|---|---|"
        )
        for cat in CATEGORIES:
            if cpu[cat] or tpu[cat]:
                print(
                    f"| {cat} | {cpu[cat]} | {cpu_bytes[cat] / 1e6:.1f} | {tpu[cat]} | "
                    f"{tpu_bytes[cat] / 1e6:.1f} |"
                )


if __name__ == "__main__":
    main()
