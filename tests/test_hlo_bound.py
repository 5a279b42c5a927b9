"""The roofline's reading of a compiled program (`hlo_text`, `hlo_traffic`, `hlo_collectives`,
`hlo_bound`): HBM traffic as a lower bound (HBM buffers only, each copy once at its HBM end,
loop bodies once per iteration, a conditional's costliest branch), collectives in one link-bytes
convention on every target, instructions printed over several lines, and the GPU network term
per host. Hand-made modules pin each rule exactly; small programs compiled for v5p, TPU7x and
H100 check the rules on the compilers' own output."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mla_moe.train import aot, hlo_bound, hlo_collectives, hlo_traffic, roofline
from mla_moe.train.hlo_text import Module
from pallas_kernels import targets

MIB = 1 << 20


# A 4-iteration loop whose body reads one [4,8] f32 slice of a stacked [4,4,8] parameter (128 B)
# and the carry (128 B) and writes the new carry (128 B), plus a copy of the carry (256 B); the
# entry copies the input (256 B) before the loop and reduces the result (128 B + 4 B) after it.
_LOOP = """\
HloModule m

%slice_w (p0: f32[4,4,8], p1: s32[]) -> f32[4,8] {
  %p0 = f32[4,4,8]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,4,8]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,4,8}
  ROOT %b = f32[4,8]{1,0} bitcast(%ds)
}

%step (c0: f32[4,8], w0: f32[4,4,8], i0: s32[]) -> f32[4,8] {
  %c0 = f32[4,8]{1,0} parameter(0)
  %w0 = f32[4,4,8]{2,1,0} parameter(1)
  %i0 = s32[] parameter(2)
  %w = f32[4,8]{1,0} fusion(%w0, %i0), kind=kLoop, calls=%slice_w
  ROOT %sum_c = f32[4,8]{1,0} add(%c0, %w)
}

%add (lhs: f32[], rhs: f32[]) -> f32[] {
  %lhs = f32[] parameter(0)
  %rhs = f32[] parameter(1)
  ROOT %s = f32[] add(%lhs, %rhs)
}

%body (p: (s32[], f32[4,8], f32[4,4,8])) -> (s32[], f32[4,8], f32[4,4,8]) {
  %p = (s32[], f32[4,8]{1,0}, f32[4,4,8]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ws = f32[4,4,8]{2,1,0} get-tuple-element(%p), index=2
  %cc = f32[4,8]{1,0} copy(%c)
  %n = f32[4,8]{1,0} fusion(%cc, %ws, %i), kind=kLoop, calls=%step
  ROOT %next = (s32[], f32[4,8]{1,0}, f32[4,4,8]{2,1,0}) tuple(%i, %n, %ws)
}

%cond (q: (s32[], f32[4,8], f32[4,4,8])) -> pred[] {
  ROOT %true = pred[] constant(true)
}

ENTRY %main (x: f32[4,8], ws: f32[4,4,8]) -> f32[] {
  %x = f32[4,8]{1,0} parameter(0)
  %w_in = f32[4,4,8]{2,1,0} parameter(1)
  %x2 = f32[4,8]{1,0} copy(%x)
  %zero = s32[] constant(0)
  %t0 = (s32[], f32[4,8]{1,0}, f32[4,4,8]{2,1,0}) tuple(%zero, %x2, %w_in)
  %loop = (s32[], f32[4,8]{1,0}, f32[4,4,8]{2,1,0}) while(%t0), condition=%cond, body=%body, backend_config=TRIP
  %r = f32[4,8]{1,0} get-tuple-element(%loop), index=1
  %f = f32[] constant(0)
  ROOT %total = f32[] reduce(%r, %f), dimensions={0,1}, to_apply=%add
}
""".replace("TRIP", '{"known_trip_count":{"n":"4"}}')  # noqa: E501 - HLO instructions are one line each


def test_traffic_counts_each_loop_iteration():
    body = 256 + (128 + 128 + 4 + 128)  # the copy; the fusion: carry, weight slice, index, out
    entry = 256 + (128 + 4 + 4)  # the copy; the reduce: input, init, result
    assert hlo_traffic.hbm_bytes(_LOOP) == {"per_step": entry + 4 * body, "once": entry + body}


# The same loop without a known_trip_count, bounded by its `i < 4` condition: 4 iterations
# from a counter that starts at 0; 3 where it starts at 1 (a copy of a constant), as XLA leaves
# a loop whose first iteration it peeled into the caller.
_BOUNDED = (_LOOP.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
            .replace("  ROOT %true = pred[] constant(true)",
                     "  %qi = s32[] get-tuple-element(%q), index=0\n"
                     "  %four = s32[] constant(4)\n"
                     "  ROOT %lt = pred[] compare(%qi, %four), direction=LT"))
_PEELED = _BOUNDED.replace("  %zero = s32[] constant(0)",
                           "  %one = s32[] constant(1)\n  %zero = s32[] copy(%one)")


def test_a_peeled_loop_runs_from_its_counters_start():
    assert "known_trip_count" not in _BOUNDED
    assert Module(_BOUNDED).runs["body"] == 4
    assert Module(_PEELED).runs["body"] == 3


# On-chip and host buffers: an HBM -> VMEM prefetch (copy-start) reads 4 KiB of HBM once; the
# fusion reads the prefetched copy from VMEM (nothing) and a 4 KiB HBM operand, and writes its
# 4 KiB result to VMEM (nothing); an HBM -> HBM copy reads and writes 4 KiB; the offload of a
# 4 KiB slice into a host buffer reads it from HBM (host side: the host term's).
_SPACES = """\
HloModule m, num_partitions=1

%f (a: f32[32,32], b: f32[32,32]) -> f32[32,32] {
  %a = f32[32,32]{1,0} parameter(0)
  %b = f32[32,32]{1,0} parameter(1)
  ROOT %s = f32[32,32]{1,0} add(%a, %b)
}

ENTRY %main (x: f32[32,32], y: f32[32,32], h: f32[4,32,32]) -> f32[32,32] {
  %x = f32[32,32]{1,0} parameter(0)
  %y = f32[32,32]{1,0} parameter(1)
  %h = f32[4,32,32]{2,1,0:S(5)} parameter(2)
  %cs = (f32[32,32]{1,0:T(8,128)S(1)}, f32[32,32]{1,0}, u32[]{:S(2)}) copy-start(%x)
  %cd = f32[32,32]{1,0:T(8,128)S(1)} copy-done(%cs)
  %v = f32[32,32]{1,0:S(1)} fusion(%cd, %y), kind=kLoop, calls=%f
  %c = f32[32,32]{1,0} copy(%y)
  %i = s32[] constant(0)
  %up = f32[1,32,32]{2,1,0} bitcast(%c)
  %ds = ((f32[4,32,32]{2,1,0:S(5)}, f32[1,32,32]{2,1,0}, s32[], s32[], s32[]), f32[4,32,32]{2,1,0:S(5)}, u32[]{:S(2)}) dynamic-update-slice-start(%h, %up, %i, %i, %i)
  ROOT %o = f32[32,32]{1,0} copy(%v)
}
"""  # noqa: E501 - HLO instructions are one line each


def test_traffic_counts_hbm_buffers_only():
    kib4 = 32 * 32 * 4
    # prefetch read + fusion's HBM operand + HBM copy (read, write) + offloaded slice read +
    # its three s32 indices + the last copy (reads VMEM, writes HBM).
    assert hlo_traffic.hbm_bytes(_SPACES)["per_step"] == (kib4 + kib4 + 2 * kib4 + kib4 + 12
                                                          + kib4)


# A conditional whose second branch costs more (in HBM bytes and in collectives) than its
# first; a custom call whose backend_config is printed over three lines, one starting with "}".
_BRANCHES = """\
HloModule m, num_partitions=4

%cheap (p: f32[64]) -> f32[64] {
  %p = f32[64]{0} parameter(0)
  ROOT %n = f32[64]{0} negate(%p)
}

%costly (q: f32[64]) -> f32[64] {
  %q = f32[64]{0} parameter(0)
  %g = f32[256]{0} all-gather(%q), replica_groups={{0,1,2,3}}, dimensions={0}
  %s = f32[64]{0} slice(%g), slice={[0:64]}
  ROOT %e = f32[64]{0} exponential(%s)
}

ENTRY %main (x: f32[64], b: s32[]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  %b = s32[] parameter(1)
  %k = f32[64]{0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"a": 1,
"meta":"{\\"block\\": 512}"
}
  %c = f32[64]{0} conditional(%b, %k, %k), branch_computations={%cheap, %costly}
  ROOT %r = f32[64]{0} all-reduce(%c), replica_groups=[1,4]<=[4], to_apply=%cheap
}
"""


def test_conditionals_count_their_cheapest_branch_and_long_instructions_parse():
    """The data decides which branch runs, so a lower bound counts the cheapest: here the
    negation, not the gather."""
    module = Module(_BRANCHES)
    assert [i.name for i in module.computations["main"]] == ["x", "b", "k", "c", "r"]
    table = hlo_collectives.collectives(_BRANCHES, module=module)
    assert table["all-gather"] == {"count": 0, "ops": 1, "bytes": 0.0, "array_bytes": 0.0}
    assert table["all-reduce"]["bytes"] == 2 * 3 / 4 * 256
    # the cheap branch (negate: read, write) + all-reduce (read, write); the Pallas kernel is
    # left out of the bound, and its operand and result (once each) are its kernel bytes.
    assert hlo_traffic.hbm_bytes(_BRANCHES)["per_step"] == 2 * 256 + 2 * 256
    assert hlo_traffic.kernel_bytes(_BRANCHES) == 2 * 256
    # Given the first branch more HBM traffic, the gather's branch counts for the traffic
    # (gather: read 256 B, write 1 KiB; slice and exponential: read, write); each term takes
    # its own cheapest branch, so the collectives still count none.
    heavy = _BRANCHES.replace("ROOT %n = f32[64]{0} negate(%p)",
                              "%big = f32[8192]{0} broadcast(%p), dimensions={}\n"
                              "  ROOT %n = f32[64]{0} slice(%big), slice={[0:64]}")
    assert hlo_collectives.collectives(heavy)["all-gather"]["bytes"] == 0
    costly = (256 + 1024) + 2 * 256 + 2 * 256
    assert hlo_traffic.hbm_bytes(heavy)["per_step"] == costly + 2 * 256


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,2},{1,3}}", [[0, 2], [1, 3]]),
    ("replica_groups={}", [[0, 1, 2, 3]]),
    ("", [[0, 1, 2, 3]]),
    ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2] {'x'}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2] {'y'}", [[0, 1], [2, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2] {'x','y'}", [[0, 1, 2, 3]]),
])
def test_replica_groups_in_every_printed_form(text, groups):
    assert hlo_collectives.replica_groups(text, 4) == groups


def test_gpu_network_term_is_per_host():
    """One all-gather of X bytes over 256 GPUs on 32 hosts of 8: each GPU receives 255/256 X;
    what must enter a host over its 8 NICs is 31/32 X, so 31 X / 256 per NIC (not 31/32 of
    each GPU's receive), and the rest comes over NVLink."""
    x = 256 * 1024 * 2
    hlo = ("HloModule m, num_partitions=256\n\nENTRY %main (a: bf16[1024]) -> bf16[262144] {\n"
           "  %a = bf16[1024]{0} parameter(0)\n"
           "  ROOT %g = bf16[262144]{0} all-gather(%a), replica_groups=[1,256]<=[256], "
           "dimensions={0}\n}\n")
    h200 = roofline.chip("NVIDIA H200 141GB HBM3e")
    bound = hlo_bound.measure(hlo, chip=h200, flops_per_device=0.0)
    assert bound.dcn_bytes == pytest.approx(31 * x / 256)
    assert bound.ici_bytes == pytest.approx(255 / 256 * x - 31 * x / 256)
    rate = h200.per_device()
    assert bound.estimate["dcn_s"] == pytest.approx(31 * x / 256 / rate["dcn_bandwidth"])
    one_host = hlo.replace("256", "8").replace("bf16[262144]", "bf16[8192]")
    bound = hlo_bound.measure(one_host, chip=h200, flops_per_device=0.0)
    assert bound.dcn_bytes == 0 and bound.ici_bytes == pytest.approx(7 / 8 * 8192 * 2)


# Small programs compiled for real targets.

def _fsdp_grad(w, x):
    return jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2))(w, x)


def _softmax(a):
    return jax.nn.log_softmax(a, -1).sum()


def _exchange(mesh):
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    def f(x):
        return jax.lax.all_to_all(x, "x", 0, 0, tiled=True) + jax.lax.psum(x, "x")
    return f


def _scan(w_LDD, x_BD):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BD, w_LDD)[0]


# name: (function of the mesh, [(shape, spec)] of its f32 arguments; n: devices)
PROGRAMS = {
    "fsdp_grad": (lambda m: _fsdp_grad, lambda n: [((1024, 1024), P("x")),
                                                   ((64 * n, 1024), P("x"))]),
    "softmax": (lambda m: _softmax, lambda n: [((256 * n, 4096), P("x"))]),
    "exchange": (_exchange, lambda n: [((8 * n * n, 1024), P("x"))]),
}


@functools.cache
def _compiled(target: str, program: str):
    mesh = Mesh(np.array(targets.devices(target)), ("x",))
    make, specs = PROGRAMS[program]
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, p))
            for s, p in specs(mesh.size)]
    # The FSDP gradient leaves sharded like its weight: reduce-scattered, not all-reduced.
    out = NamedSharding(mesh, P("x")) if program == "fsdp_grad" else None
    return jax.jit(make(mesh), out_shardings=out).lower(*args).compile()


@pytest.mark.parametrize("target, program", [
    ("tpu:v5p:2x2x1", "fsdp_grad"), ("tpu:v5p:2x2x1", "softmax"),
    ("tpu:tpu7x:2x2x1", "softmax"), ("tpu:tpu7x:2x2x1", "exchange")])
def test_traffic_of_loop_free_programs_never_exceeds_the_compilers_count(target, program):
    compiled = _compiled(target, program)
    walk = hlo_traffic.hbm_bytes(compiled.as_text())
    assert walk["per_step"] == walk["once"]
    assert 0 < walk["once"] <= aot.compiler_bytes_accessed(compiled)


def test_exchange_counts_the_same_on_gpu_and_tpu():
    """One all-to-all and one all-reduce of X = 8 x 8 x 1024 f32 per device over 8 devices:
    7/8 X and 2 x 7/8 X arrive over links, on an H100 host as on a TPU7x slice."""
    x = 8 * 8 * 1024 * 4
    for target in ("gpu:h100:1x1x8", "tpu:tpu7x:2x2x1"):
        table = hlo_collectives.collectives(_compiled(target, "exchange").as_text())
        assert table["all-to-all"]["bytes"] == 7 / 8 * x, target
        assert table["all-reduce"]["bytes"] == 2 * 7 / 8 * x, target


def test_reduce_scatter_in_every_form():
    """The FSDP gradient of a [1024, 1024] f32 weight: reduce-scattered as v5p's
    all-reduce-scatter fusion over 4 devices and as H100's reduce-scatter-start over 8; the
    weight all-gathered (f32: the tests' matmuls run at full precision)."""
    w = 1024 * 1024 * 4
    v5p = hlo_collectives.collectives(_compiled("tpu:v5p:2x2x1", "fsdp_grad").as_text())
    assert v5p["reduce-scatter"]["bytes"] == 3 / 4 * w and v5p["all-reduce"]["count"] == 0
    assert v5p["all-gather"]["bytes"] == 3 / 4 * w
    h100 = hlo_collectives.collectives(_compiled("gpu:h100:1x1x8", "fsdp_grad").as_text())
    assert h100["reduce-scatter"]["bytes"] == 7 / 8 * w
    assert h100["all-gather"]["bytes"] == 7 / 8 * w


def test_fsdp_scan_traffic_per_iteration():
    """A scan over L stacked bf16 [1024, 1024] weights split 4 ways (FSDP) on v5p: each
    iteration's traffic is the same (6 layers - 3 layers = 3 bodies), and it holds at least the
    weight shard's slice read (512 KiB), the gathered weight written (2 MiB) and the new carry
    written (512 KiB); counted once, the walk is under the compiler's count."""
    mesh = Mesh(np.array(targets.devices("tpu:v5p:2x2x1")), ("x",))
    walks = {}
    for layers in (3, 6):
        w = jax.ShapeDtypeStruct((layers, 1024, 1024), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, "x")))
        x = jax.ShapeDtypeStruct((512, 1024), jnp.float32, sharding=NamedSharding(mesh, P("x")))
        compiled = jax.jit(_scan).lower(w, x).compile()
        walks[layers] = hlo_traffic.hbm_bytes(compiled.as_text())
        assert walks[layers]["once"] <= aot.compiler_bytes_accessed(compiled)
    body = (walks[3]["per_step"] - walks[3]["once"]) / 2
    assert walks[6]["per_step"] - walks[6]["once"] == 5 * body
    assert walks[6]["per_step"] - walks[3]["per_step"] == pytest.approx(3 * body)
    assert body >= 256 * 1024 * 2 + 1024 * 1024 * 2 + 128 * 1024 * 4


def test_gpu_hosts_share_what_crosses_the_network():
    """The FSDP gradient on 2 hosts of 8 H100s: of the 4 MiB weight gathered over 16 GPUs, one
    host's half must enter the other, shared by its 8 NICs: 4 MiB / 16 per NIC."""
    text = _compiled("gpu:h100:1x2x8", "fsdp_grad").as_text()
    table = hlo_collectives.collectives(text, devices_per_host=8)
    assert table["all-gather"]["network_bytes"] == 4 * MIB / 16
    assert table["reduce-scatter"]["network_bytes"] == 4 * MIB / 16
    bound = hlo_bound.measure(text, chip=roofline.chip("NVIDIA H100 80GB HBM3"),
                              flops_per_device=1e9)
    assert bound.dcn_bytes == 2 * 4 * MIB / 16
    assert bound.ici_bytes == pytest.approx(2 * 15 / 16 * 4 * MIB - bound.dcn_bytes)


@pytest.mark.parametrize("hlo", [_LOOP, _SPACES, _BRANCHES], ids=["loop", "spaces", "branches"])
def test_breakdown_adds_up_to_the_traffic(hlo):
    parts = hlo_traffic.breakdown(hlo, lambda ins: ins.opcode)
    assert sum(parts.values()) == hlo_traffic.hbm_bytes(hlo)["per_step"]
    assert all(v > 0 for v in parts.values())
