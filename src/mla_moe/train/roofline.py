"""A roofline lower bound on a compiled step's time, from the chip's published figures.

Each term is what one device must do divided by the rate it can do it at:

    compute_s = model FLOPs per device / peak dense bf16 FLOP/s
    hbm_s     = HBM bytes the compiled step reads and writes per device / HBM bandwidth
    ici_s     = collective bytes per device within a slice (NVLink on GPU) / inbound bandwidth
    dcn_s     = collective bytes per device across slices / data-center network bandwidth
    host_s    = bytes held in host memory per device / host-to-device bandwidth

The step takes at least the largest of them (`step_s_lower_bound`: the terms can overlap
perfectly, never better), so `mfu_upper_bound = compute_s / step_s_lower_bound` is the best MFU
the program allows. A lower bound from analysis, not a measurement: it ignores latency, launch
and synchronization costs, imperfect overlap, and work the compiler's counts cannot see (inside
Pallas custom calls).

The chip's figures, and where each comes from, are the chip table's (`pallas_kernels.chips`).
Figures are per *compile-only device*. TPU v4 and TPU7x (Ironwood) compile as two devices per
chip, one per TensorCore (`tpu7x:2x2x1` is 4 chips, 8 devices; the compiler's HBM per device is
half the chip's), so their per-device figures are half the chip's; every other chip is one
device. Bandwidths are one direction: a collective's bytes (the result per device) are what a
device receives, over its inbound links, which carry half the published bidirectional figure.

    row = chip("TPU v5")
    est = estimate(row, flops=3.2e14, bytes_accessed=4.1e11, ici_bytes=2e10, dcn_bytes=0,
                   host_bytes=0)
    est.step_s_lower_bound, est.mfu_upper_bound
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import chips
from pallas_kernels.chips import Chip

KIND = "lower bound from analysis, not a measurement"
_T = 1e12


def chip(device_kind: str) -> Chip | None:
    """The chip table's row for a compile-only device's `device_kind`; None if not in the
    table."""
    return chips.by_device_kind(device_kind)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Roofline terms of one step on one device, in seconds (see the module's docstring)."""

    compute_s: float
    hbm_s: float | None  # None where the compiler gives no bytes accessed (GPU)
    ici_s: float
    dcn_s: float
    host_s: float
    step_s_lower_bound: float
    mfu_upper_bound: float
    peak_flops: float  # per device
    hbm_bandwidth: float
    ici_bandwidth: float
    dcn_bandwidth: float
    host_bandwidth: float
    chip: str
    sources: dict[str, str]

    def to_json(self) -> dict:
        return {"kind": KIND, **dataclasses.asdict(self)}

    def text(self) -> list[str]:
        """A few lines for a terminal."""
        ms = lambda s: "n/a" if s is None else f"{1e3 * s:.3f} ms"  # noqa: E731
        terms = {"compute": self.compute_s, "HBM": self.hbm_s, "ICI": self.ici_s,
                 "DCN": self.dcn_s, "host": self.host_s}
        bound = max((k for k, v in terms.items() if v is not None), key=lambda k: terms[k])
        return [
            f"roofline estimate ({KIND}), per device, {self.chip}:",
            "  " + " | ".join(f"{k} {ms(v)}" for k, v in terms.items()),
            f"  step >= {ms(self.step_s_lower_bound)} ({bound}-bound), MFU <= "
            f"{100 * self.mfu_upper_bound:.1f}% of {self.peak_flops / _T:.1f} TFLOP/s bf16",
        ]


def estimate(row: Chip, *, flops: float, bytes_accessed: float | None, ici_bytes: float,
             dcn_bytes: float, host_bytes: float) -> Estimate:
    """The roofline terms for one device doing `flops` model FLOPs and moving these bytes
    (all per device per step) on `row`'s chip."""
    rate = row.per_device()
    compute_s = flops / rate["peak_flops"]
    hbm_s = None if bytes_accessed is None else bytes_accessed / rate["hbm_bandwidth"]
    ici_s = ici_bytes / rate["ici_bandwidth"]
    dcn_s = dcn_bytes / rate["dcn_bandwidth"]
    host_s = host_bytes / rate["host_bandwidth"]
    step = max(compute_s, hbm_s or 0.0, ici_s, dcn_s, host_s)
    sources = {k: v for k, v in row.sources.items() if k in chips.ROOFLINE_SOURCES}
    return Estimate(compute_s=compute_s, hbm_s=hbm_s, ici_s=ici_s, dcn_s=dcn_s, host_s=host_s,
                    step_s_lower_bound=step, mfu_upper_bound=compute_s / step if step else 0.0,
                    chip=row.name, sources=sources, **rate)
