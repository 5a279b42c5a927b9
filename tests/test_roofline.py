"""The roofline estimate: its arithmetic on hand-made figures, the host-RAM limit, and Ironwood
(tpu7x) targets. What it reads of a compiled program (HBM traffic, collective bytes, the GPU
network term) is tested in test_hlo_bound.py."""

import pytest

from configs import tiny
from mla_moe.train import aot, roofline
from pallas_kernels import targets

GIB = 1 << 30


def _report(**kw) -> aot.Report:
    fields = dict(what="train", target="tpu:v5p:2x2x1", mesh={"fsdp": 4}, device_kind="TPU v5",
                  num_devices=4, batch_size=8, seq_len=128, fits=True, per_device_bytes=GIB,
                  hbm_capacity_bytes=95 * GIB)
    fields.update(kw)
    return aot.Report(**fields)


def test_estimate_of_a_hand_made_v5p_report():
    """v5p: 459 TFLOP/s, 2765 GB/s HBM, 600 GB/s inbound ICI, 50 Gbit/s DCN, 32 GB/s host."""
    est = roofline.estimate(roofline.chip("TPU v5"), flops=459e12, bytes_accessed=2 * 2765e9,
                            ici_bytes=1.2e12, dcn_bytes=6.25e9 / 2, host_bytes=8e9).to_json()
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
    report = _report(model_flops_per_step=4 * 459e12, estimate=est)
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
    assert report.num_devices == 8 and report.hbm_capacity_bytes == int(94.75 * GIB)
    est = report.to_json()["estimate"]
    assert est["chip"] == "TPU7x (Ironwood)" and est["peak_flops"] == 2307e12 / 2
    assert est["compute_s"] == pytest.approx(report.model_flops_per_step / 8 / (2307e12 / 2))
    assert est["hbm_s"] == pytest.approx(report.hbm_traffic_bytes / (7380e9 / 2))
    assert report.hbm_traffic_bytes > 0 and report.compiler_bytes_accessed_once > 0
    assert est["step_s_lower_bound"] == max(est["compute_s"], est["hbm_s"], est["ici_s"],
                                            est["dcn_s"], est["host_s"])
    assert report.host_ram_bytes == int(960e9 / 8)
    assert "roofline estimate (lower bound from analysis, not a measurement)" in report.text()
