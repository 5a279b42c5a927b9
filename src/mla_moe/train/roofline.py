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

KIND = "lower bound from analysis, not a measurement"
_G = 1e9
_T = 1e12
_GIB = 1 << 30
_GBPS = 1e9 / 8  # bytes/s in one Gbit/s


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's published figures (whole chip), and how many compile-only devices it is.

    Bandwidths in bytes/s, one direction; `sources` names, per figure, where it comes from."""

    name: str
    device_kind: str  # jax's `device_kind` of the compile-only devices
    devices_per_chip: int
    chip_peak_flops: float  # dense bf16
    chip_hbm_bandwidth: float
    chip_ici_bandwidth: float  # inbound: half the bidirectional figure
    chip_dcn_bandwidth: float
    chip_host_bandwidth: float  # host <-> device (PCIe), one direction
    host_ram_bytes: int  # per host
    chips_per_host: int
    sources: dict[str, str]

    @property
    def devices_per_host(self) -> int:
        return self.chips_per_host * self.devices_per_chip

    @property
    def host_ram_per_device(self) -> float:
        return self.host_ram_bytes / self.devices_per_host

    def per_device(self) -> dict[str, float]:
        """The figures one compile-only device has: the chip's over `devices_per_chip`."""
        n = self.devices_per_chip
        return {"peak_flops": self.chip_peak_flops / n,
                "hbm_bandwidth": self.chip_hbm_bandwidth / n,
                "ici_bandwidth": self.chip_ici_bandwidth / n,
                "dcn_bandwidth": self.chip_dcn_bandwidth / n,
                "host_bandwidth": self.chip_host_bandwidth / n}


_GCP = "cloud.google.com TPU {} docs"
_ASSUMED_PCIE4 = ("not published; assumed PCIe Gen4 x16, 32 GB/s per direction (an optimistic "
                  "rate keeps the bound a lower bound)")

CHIPS: tuple[Chip, ...] = (
    Chip("TPU v4", "TPU v4", 2, 275 * _T, 1200 * _G, 300 * _G, 50 * _GBPS, 16 * _G,
         407 * _G, 4, {
             "peak_flops": _GCP.format("v4") + ": 275 TFLOP/s bf16 per chip",
             "hbm": _GCP.format("v4") + ": 32 GiB HBM2, 1200 GB/s per chip",
             "ici": "TPU v4 paper (Jouppi et al., ISCA 2023): 6 ICI links per chip at 400 "
                    "Gbit/s per direction -> 300 GB/s inbound",
             "dcn": "not published per chip; assumed v5p's 50 Gbit/s per chip",
             "host": "PCIe Gen3 x16 per chip (TPU v4 paper): 16 GB/s per direction",
             "host_ram": _GCP.format("v4") + ": a v4 TPU VM has 4 chips, 407 GB RAM",
             "devices": "libtpu compile-only 'v4:2x2x1' gives 8 devices (2 TensorCores per "
                        "chip, 15.25G HBM each by the compiler): per-device = half a chip"}),
    Chip("TPU v5e", "TPU v5 lite", 1, 197 * _T, 819 * _G, 200 * _G, 25 * _GBPS, 32 * _G,
         512 * _GIB, 8, {
             "peak_flops": _GCP.format("v5e") + ": 197 TFLOP/s bf16 per chip",
             "hbm": _GCP.format("v5e") + ": 16 GB HBM2, 819 GB/s per chip",
             "ici": _GCP.format("v5e") + ": 400 GB/s bidirectional ICI per chip -> 200 GB/s "
                    "inbound",
             "dcn": _GCP.format("v5e") + ": 2 x 100 Gbit/s NICs per 8-chip host -> 25 Gbit/s "
                    "per chip",
             "host": _ASSUMED_PCIE4,
             "host_ram": _GCP.format("v5e") + ": 512 GiB DRAM per 8-chip host"}),
    Chip("TPU v5p", "TPU v5", 1, 459 * _T, 2765 * _G, 600 * _G, 50 * _GBPS, 32 * _G,
         448 * _G, 4, {
             "peak_flops": _GCP.format("v5p") + ": 459 TFLOP/s bf16 per chip",
             "hbm": _GCP.format("v5p") + ": 95 GiB HBM2e, 2765 GB/s per chip",
             "ici": _GCP.format("v5p") + ": 1200 GB/s bidirectional ICI per chip (4800 Gbit/s "
                    "per direction) -> 600 GB/s inbound",
             "dcn": _GCP.format("v5p") + ": 50 Gbit/s DCN per chip",
             "host": _ASSUMED_PCIE4,
             "host_ram": _GCP.format("v5p") + ": 448 GB RAM per 4-chip VM"}),
    Chip("TPU v6e", "TPU v6 lite", 1, 918 * _T, 1640 * _G, 400 * _G, 100 * _GBPS, 32 * _G,
         1536 * _GIB, 8, {
             "peak_flops": _GCP.format("v6e") + ": 918 TFLOP/s bf16 per chip",
             "hbm": _GCP.format("v6e") + ": 32 GB HBM, 1640 GB/s per chip",
             "ici": _GCP.format("v6e") + ": 800 GB/s bidirectional ICI per chip -> 400 GB/s "
                    "inbound",
             "dcn": _GCP.format("v6e") + ": 4 x 200 Gbit/s NICs per 8-chip host -> 100 Gbit/s "
                    "per chip",
             "host": _ASSUMED_PCIE4,
             "host_ram": _GCP.format("v6e") + ": 1536 GiB DRAM per 8-chip host"}),
    Chip("TPU7x (Ironwood)", "TPU7x", 2, 2307 * _T, 7380 * _G, 600 * _G, 100 * _GBPS,
         64 * _G, 960 * _G, 4, {
             "peak_flops": _GCP.format("TPU7x") + ": 2307 TFLOP/s bf16 per chip (4614 FP8)",
             "hbm": _GCP.format("TPU7x") + ": 192 GiB HBM, 7380 GB/s per chip",
             "ici": "Google Ironwood announcement: 1.2 TB/s bidirectional ICI per chip -> 600 "
                    "GB/s inbound",
             "dcn": "GKE Ironwood docs: 2 NICs per 4-chip VM; NIC rate not published, assumed "
                    "200 Gbit/s each -> 100 Gbit/s per chip",
             "host": "not published; assumed PCIe Gen5 x16, 64 GB/s per direction",
             "host_ram": _GCP.format("TPU7x") + ": 960 GB RAM per 4-chip VM",
             "devices": "libtpu compile-only 'tpu7x:2x2x1' gives 8 devices (2 TensorCores per "
                        "chip, 94.75G HBM each by the compiler): per-device = half a chip"}),
    Chip("NVIDIA A100", "NVIDIA A100-SXM4-80GB", 1, 312 * _T, 2039 * _G, 300 * _G,
         200 * _GBPS, 32 * _G, 2048 * _G, 8, {
             "peak_flops": "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense (SXM)",
             "hbm": "NVIDIA A100 datasheet: 80 GB HBM2e, 2039 GB/s (SXM)",
             "ici": "NVIDIA A100 datasheet: NVLink 600 GB/s (both directions) -> 300 GB/s in",
             "dcn": "NVIDIA DGX A100 user guide: 8 x 200 Gbit/s HDR InfiniBand, one per GPU",
             "host": "PCIe Gen4 x16: 32 GB/s per direction",
             "host_ram": "NVIDIA DGX A100 640GB: 2 TB system memory, 8 GPUs"}),
    Chip("NVIDIA H100", "NVIDIA H100 80GB HBM3", 1, 989 * _T, 3350 * _G, 450 * _G,
         400 * _GBPS, 64 * _G, 2048 * _G, 8, {
             "peak_flops": "NVIDIA H100 datasheet: 989 TFLOP/s bf16 dense (1979 with "
                           "sparsity), SXM",
             "hbm": "NVIDIA H100 datasheet: 80 GB HBM3, 3.35 TB/s (SXM)",
             "ici": "NVIDIA H100 datasheet: NVLink 900 GB/s (both directions) -> 450 GB/s in",
             "dcn": "NVIDIA DGX H100 user guide: 8 x 400 Gbit/s ConnectX-7, one per GPU",
             "host": "PCIe Gen5 x16: 64 GB/s per direction",
             "host_ram": "NVIDIA DGX H100: 2 TB system memory, 8 GPUs"}),
    Chip("NVIDIA H200", "NVIDIA H200 141GB HBM3e", 1, 989 * _T, 4800 * _G, 450 * _G, 400 * _GBPS,
         64 * _G, 2048 * _G, 8, {
             "peak_flops": "NVIDIA H200 datasheet: 989 TFLOP/s bf16 dense (SXM)",
             "hbm": "NVIDIA H200 datasheet: 141 GB HBM3e, 4.8 TB/s (SXM)",
             "ici": "NVIDIA H200 datasheet: NVLink 900 GB/s (both directions) -> 450 GB/s in",
             "dcn": "NVIDIA DGX H200: 8 x 400 Gbit/s ConnectX-7, one per GPU",
             "host": "PCIe Gen5 x16: 64 GB/s per direction",
             "host_ram": "NVIDIA DGX H200: 2 TB system memory, 8 GPUs"}),
)
_BY_KIND = {c.device_kind: c for c in CHIPS}


def chip(device_kind: str) -> Chip | None:
    """The table's row for a compile-only device's `device_kind`; None if not in the table."""
    return _BY_KIND.get(device_kind)


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
    return Estimate(compute_s=compute_s, hbm_s=hbm_s, ici_s=ici_s, dcn_s=dcn_s, host_s=host_s,
                    step_s_lower_bound=step, mfu_upper_bound=compute_s / step if step else 0.0,
                    chip=row.name, sources=dict(row.sources), **rate)
