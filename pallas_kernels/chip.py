"""One chip's published figures: the `Chip` row of the chip table (`pallas_kernels.chips`),
and the units its rows are written in. Imports nothing but the standard library."""

from __future__ import annotations

import dataclasses

G = 1e9
T = 1e12
GIB = 1 << 30
MIB = 1 << 20
GBPS = 1e9 / 8  # bytes/s in one Gbit/s

# An "hbm_device" source "the compiler: ..." quotes XLA's out-of-memory error for a program over
# the limit: the HBM a compile-only device is given, which it does not report otherwise.
# The figures of the roofline; `sources` holds more (what the other fields rest on).
ROOFLINE_SOURCES = ("peak_flops", "hbm", "ici", "dcn", "host", "host_ram", "devices")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's published figures (whole chip), and how many compile-only devices it is.

    The first eleven fields are what the roofline needs and are positional; the rest are
    optional (None where the figure does not apply: scoped VMEM on a GPU, a GKE TPU label on a
    chip that is not a TPU). Bandwidths in bytes/s, one direction; `sources` names, per figure,
    where it comes from."""

    name: str
    device_kind: str  # jax's `device_kind`
    devices_per_chip: int  # compile-only devices per chip (see the module's docstring)
    chip_peak_flops: float  # dense bf16
    chip_hbm_bandwidth: float
    chip_ici_bandwidth: float  # inbound: half the bidirectional figure (NVLink on GPU)
    chip_dcn_bandwidth: float  # this chip's share of its host's NICs
    chip_host_bandwidth: float  # host <-> device (PCIe), one direction
    host_ram_bytes: int  # per host
    chips_per_host: int
    sources: dict[str, str]
    chip_peak_fp8_flops: float | None = None  # dense, where published
    chip_hbm_bytes: int | None = None  # as published (GiB for Google, GB for NVIDIA)
    # Substrings of device kinds that name this chip's family ("H100" in "NVIDIA H100 PCIe"),
    # for `by_device_kind(kind, family=True)`.
    kind_aliases: tuple[str, ...] = ()
    target: str | None = None  # `pallas_kernels.targets` name: libtpu topology or GPU target
    device_hbm_bytes: int | None = None  # HBM per compile-only device, as the compiler sees it
    scoped_vmem_bytes: int | None = None  # TPU: the compiler's default scoped VMEM per kernel
    shared_memory_per_block: int | None = None  # GPU: the opt-in maximum per thread block
    gpu_target_config: str | None = None  # GpuTargetConfigProto file in `gpu_targets/`
    tensorcores_per_chip: int | None = None  # TPU; what an accelerator type's N counts
    accelerator_types: tuple[str, ...] = ()  # TPU: GEN of Cloud TPU types "GEN-N"
    topology_dims: int | None = None  # TPU: 3 (AxBxC) or 2 (AxB)
    gke_accelerator: str | None = None  # GKE node label value

    def __post_init__(self):
        for field in ("devices_per_chip", "chips_per_host"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field}={getattr(self, field)} must be >= 1")
        for field in (
            "chip_peak_flops",
            "chip_hbm_bandwidth",
            "chip_ici_bandwidth",
            "chip_dcn_bandwidth",
            "chip_host_bandwidth",
            "host_ram_bytes",
        ):
            if not getattr(self, field) > 0:
                raise ValueError(f"{self.name}: {field}={getattr(self, field)} must be > 0")
        if self.accelerator_types and (
            not self.tensorcores_per_chip
            or self.topology_dims not in (2, 3)
            or not self.gke_accelerator
        ):
            raise ValueError(
                f"{self.name}: accelerator_types need tensorcores_per_chip, topology_dims (2 or "
                "3) and gke_accelerator"
            )
        if self.gpu_target_config and not self.target:
            raise ValueError(f"{self.name}: gpu_target_config needs a target name")

    @property
    def platform(self) -> str:
        """Either "tpu" or "gpu"."""
        return "tpu" if self.device_kind.startswith("TPU") else "gpu"

    @property
    def devices_per_host(self) -> int:
        return self.chips_per_host * self.devices_per_chip

    @property
    def host_ram_per_chip(self) -> float:
        return self.host_ram_bytes / self.chips_per_host

    @property
    def host_ram_per_device(self) -> float:
        return self.host_ram_bytes / self.devices_per_host

    def per_device(self) -> dict[str, float]:
        """The figures one compile-only device has: the chip's over `devices_per_chip`."""
        n = self.devices_per_chip
        return {
            "peak_flops": self.chip_peak_flops / n,
            "hbm_bandwidth": self.chip_hbm_bandwidth / n,
            "ici_bandwidth": self.chip_ici_bandwidth / n,
            "dcn_bandwidth": self.chip_dcn_bandwidth / n,
            "host_bandwidth": self.chip_host_bandwidth / n,
        }


