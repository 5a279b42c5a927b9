"""The roofline estimate: its arithmetic on hand-made reports, the host-RAM limit, the HBM bytes
of a scanned loop counted once per iteration, and Ironwood (tpu7x) targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from mla_moe.train import aot, hlo_collectives, roofline
from pallas_kernels import targets

GIB = 1 << 30


def _report(**kw) -> aot.Report:
    fields = dict(what="train", target="tpu:v5p:2x2x1", mesh={"fsdp": 4}, device_kind="TPU v5",
                  num_devices=4, batch_size=8, seq_len=128, fits=True, per_device_bytes=GIB,
                  hbm_bytes=95 * GIB)
    fields.update(kw)
    return aot.Report(**fields)


def _table(nbytes: float) -> dict:
    return {"all-gather": {"count": 3, "bytes": nbytes / 2, "ops": 1},
            "reduce-scatter": {"count": 1, "bytes": nbytes / 2, "ops": 1}}


def test_estimate_of_a_hand_made_v5p_report():
    """v5p: 459 TFLOP/s, 2765 GB/s HBM, 600 GB/s inbound ICI, 50 Gbit/s DCN, 32 GB/s host."""
    report = _report(model_flops_per_step=4 * 459e12, bytes_accessed=2 * 2765e9,
                     collectives=_table(1.2e12), dcn_collectives={
                         "ALL_REDUCE/SUM": {"count": 1, "bytes": 6.25e9 / 2, "ops": 1}},
                     host_bytes=int(8e9))
    est = aot.estimate_report(report)
    assert est["kind"] == "lower bound from analysis, not a measurement"
    assert est["compute_s"] == pytest.approx(1.0, rel=1e-12)
    assert est["hbm_s"] == pytest.approx(2.0, rel=1e-12)
    assert est["ici_s"] == pytest.approx(2.0, rel=1e-12)  # 1.2e12 B / 600e9 B/s
    assert est["dcn_s"] == pytest.approx(0.5, rel=1e-12)  # 3.125e9 B / 6.25e9 B/s
    assert est["host_s"] == pytest.approx(0.25, rel=1e-12)  # 8e9 B / 32e9 B/s
    assert est["step_s_lower_bound"] == pytest.approx(2.0, rel=1e-12)
    assert est["mfu_upper_bound"] == pytest.approx(0.5, rel=1e-12)
    assert (est["peak_flops"], est["hbm_bandwidth"], est["ici_bandwidth"],
            est["dcn_bandwidth"], est["host_bandwidth"]) == (459e12, 2765e9, 600e9, 6.25e9, 32e9)
    assert est["chip"] == "TPU v5p" and "2765 GB/s" in est["sources"]["hbm"]
    report.estimate = est
    text = report.text()
    assert "lower bound from analysis, not a measurement" in text
    assert "step >= 2000.000 ms" in text and "MFU <= 50.0%" in text


def test_estimate_per_device_on_two_devices_per_chip():
    """A made-up chip of 2 devices: every rate halves; the largest term bounds the step."""
    row = roofline.Chip("test", "test kind", 2, 10e12, 4e9, 2e9, 1e9, 0.5e9, 64 * GIB, 4,
                        {"peak_flops": "made up"})
    est = roofline.estimate(row, flops=10e12, bytes_accessed=1e9, ici_bytes=3e9, dcn_bytes=0.0,
                            host_bytes=0.0)
    assert (est.compute_s, est.hbm_s, est.ici_s, est.dcn_s, est.host_s) == (2.0, 0.5, 3.0, 0.0,
                                                                            0.0)
    assert est.step_s_lower_bound == 3.0 and est.mfu_upper_bound == 2.0 / 3.0
    assert row.devices_per_host == 8 and row.host_ram_per_device == 8 * GIB
    # No bytes accessed (GPU: no cost analysis): HBM is unknown, not zero, and not the bound.
    est = roofline.estimate(row, flops=10e12, bytes_accessed=None, ici_bytes=0.0,
                            dcn_bytes=0.0, host_bytes=0.0)
    assert est.hbm_s is None and est.step_s_lower_bound == 2.0 and est.mfu_upper_bound == 1.0
    assert "HBM n/a" in "\n".join(est.text())


def test_chip_table_covers_the_targets():
    for kind in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU7x",
                 "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200 141GB HBM3e"):
        row = roofline.chip(kind)
        assert row is not None, kind
        assert {"peak_flops", "hbm", "ici", "dcn", "host", "host_ram"} <= set(row.sources)
    ironwood = roofline.chip("TPU7x")
    assert ironwood.per_device()["peak_flops"] == 2307e12 / 2
    assert ironwood.per_device()["hbm_bandwidth"] == 7380e9 / 2
    assert ironwood.host_ram_per_device == 960e9 / 8
    assert roofline.chip("TPU v5").host_ram_per_device == 448e9 / 4


def test_host_ram_limit():
    """v5p: 448 GB per 4-chip host. 113 GB of host buffers per device x 4 devices exceed it."""
    report = _report(host_bytes=int(113e9))
    aot.check_fits(report)
    assert not report.fits and report.limit_exceeded == "host RAM"
    assert report.host_ram_bytes == int(448e9 / 4)
    text = report.text()
    assert "DOES NOT FIT: exceeds host RAM" in text and "of 95.00 GiB HBM (1.1%) -> fits" in text
    report = _report(host_bytes=int(111e9))
    aot.check_fits(report)
    assert report.fits and report.limit_exceeded == ""
    # Two devices of a host: 2 x 200 GB fit in its 448 GB.
    report = _report(num_devices=2, host_bytes=int(200e9))
    aot.check_fits(report)
    assert report.fits
    # Over HBM: the HBM limit is named.
    report = _report(per_device_bytes=96 * GIB)
    aot.check_fits(report)
    assert not report.fits and report.limit_exceeded == "HBM"
    assert "DOES NOT FIT: exceeds HBM" in report.text()
    report = _report(per_device_bytes=96 * GIB, host_bytes=int(113e9))
    aot.check_fits(report)
    assert not report.fits and report.limit_exceeded == "HBM and host RAM"


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


def test_bytes_accessed_counts_each_loop_iteration():
    body = 256 + (128 + 128 + 4 + 128)  # the copy; the fusion: carry, weight slice, index, out
    entry = 256 + (128 + 4 + 4)  # the copy; the reduce: input, init, result
    assert hlo_collectives.bytes_accessed(_LOOP) == {"per_step": entry + 4 * body,
                                                     "once": entry + body}


def _scan_bytes(num_layers: int, mesh: Mesh) -> tuple[float, float, dict]:
    """A scan of tanh(x @ w_l) over `num_layers` stacked bf16 [256, 256] weights, x [512, 256]
    f32 split 4 ways, compiled for v5p: (per-step bytes, the compiler's count, the walk)."""

    def f(w_LDD, x_BD):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BD, w_LDD)[0]

    w = jax.ShapeDtypeStruct((num_layers, 256, 256), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    compiled = jax.jit(f).lower(w, x).compile()
    per_step, compiler = aot.bytes_accessed(compiled)
    return per_step, compiler, hlo_collectives.bytes_accessed(compiled.as_text())


def test_scan_bytes_scale_with_the_trip_count_on_v5p():
    """XLA's count is the same for 3 and 6 layers (the body counted once); the per-step count
    grows by the same body per layer, which holds at least the layer's weight slice and the
    carry read and written, and it equals the compiler's count plus the missed iterations.
    (At 2 layers XLA unrolls the loop.)"""
    mesh = Mesh(np.array(targets.devices("tpu:v5p:2x2x1")), ("x",))
    step3, compiler3, walk3 = _scan_bytes(3, mesh)
    step6, compiler6, walk6 = _scan_bytes(6, mesh)
    assert compiler6 == pytest.approx(compiler3, rel=0.01)
    # The walk counts a body once the way the compiler does (measured: 0.6% apart).
    assert walk3["once"] == pytest.approx(compiler3, rel=0.05)
    body = (walk3["per_step"] - walk3["once"]) / 2
    weight, carry = 256 * 256 * 2, 128 * 256 * 4
    assert body >= weight + 2 * carry
    assert walk6["per_step"] - walk6["once"] == 5 * body
    assert step6 - step3 == pytest.approx(3 * body, rel=1e-9)
    assert step3 == compiler3 + 2 * body


def test_tpu7x_targets():
    t = targets.parse_target("tpu:tpu7x:2x2x1")
    assert (t.platform, t.chip, t.topology) == ("tpu", "tpu7x", "2x2x1")
    with pytest.raises(ValueError, match="unknown tpu 'v7x'"):
        targets.parse_target("tpu:v7x:2x2x1")
    devices = targets.devices(t)
    assert len(devices) == 8 and devices[0].device_kind == "TPU7x"  # 4 chips, 2 devices each
    assert len({tuple(d.coords) for d in devices}) == 4
    assert targets.hbm_bytes(devices[0]) == int(94.75 * GIB)


def test_tpu7x_train_step_fits_with_an_estimate():
    """The micro model's train step on tpu7x:2x2x1 (8 devices, fsdp=4 x expert=2)."""
    config = tiny.get_config("micro")
    config.mesh.update(data=1, fsdp=4, expert=2, tensor=1)
    config.train.update(batch_size=8, seq_len=64)
    report, compiled = aot.compile_train(config, targets.devices("tpu:tpu7x:2x2x1"),
                                         target="tpu:tpu7x:2x2x1")
    assert compiled is not None and report.fits and report.limit_exceeded == ""
    assert report.num_devices == 8 and report.hbm_bytes == int(94.75 * GIB)
    est = report.to_json()["estimate"]
    assert est["chip"] == "TPU7x (Ironwood)" and est["peak_flops"] == 2307e12 / 2
    assert est["compute_s"] == pytest.approx(report.model_flops_per_step / 8 / (2307e12 / 2))
    assert est["hbm_s"] == pytest.approx(report.bytes_accessed / (7380e9 / 2))
    assert report.bytes_accessed >= report.compiler_bytes_accessed > 0
    assert est["step_s_lower_bound"] == max(est["compute_s"], est["hbm_s"], est["ici_s"],
                                            est["dcn_s"], est["host_s"])
    assert report.host_ram_bytes == int(960e9 / 8)
    assert "roofline estimate (lower bound from analysis, not a measurement)" in report.text()


def test_gpu_collectives_across_hosts_go_over_the_network():
    """256 H200s on 32 hosts, one mesh axis: 31/32 of each collective's bytes come from other
    hosts, over the 400 Gbit/s NIC per GPU; the rest over NVLink (450 GB/s inbound)."""
    report = _report(target="gpu:h200:1x32x8", mesh={"fsdp": 256},
                     device_kind="NVIDIA H200 141GB HBM3e", num_devices=256,
                     model_flops_per_step=256 * 989e12, collectives=_table(32 * 50e9))
    est = aot.estimate_report(report)
    assert est["dcn_s"] == pytest.approx(31.0, rel=1e-12)  # 31/32 of 1.6e12 B at 50 GB/s
    assert est["ici_s"] == pytest.approx(50e9 / 450e9, rel=1e-12)
    assert est["step_s_lower_bound"] == pytest.approx(31.0, rel=1e-12)
    one_host = aot.estimate_report(_report(
        target="gpu:h200:1x1x8", mesh={"fsdp": 8}, device_kind="NVIDIA H200 141GB HBM3e",
        num_devices=8, model_flops_per_step=8 * 989e12, collectives=_table(450e9)))
    assert one_host["dcn_s"] == 0 and one_host["ici_s"] == pytest.approx(1.0, rel=1e-12)
