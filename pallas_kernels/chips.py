"""The chip table: every accelerator's published figures, in one place, each with its source.

One row per chip, keyed by jax's `device_kind` and by its compile-target name: the peak dense
bf16 (and fp8 where published) FLOP/s, HBM size and bandwidth, the ICI (NVLink on GPU), DCN
(the hosts' NICs) and host (PCIe) bandwidths, the scoped VMEM (TPU) or shared memory per block
(GPU) a kernel may use, how many devices jax makes of a chip, the host's RAM, and for TPUs the
libtpu topology name, the Cloud TPU accelerator type and the GKE node label. The roofline
(`mla_moe.train.roofline`), the logged MFU (`mla_moe.train.metrics`), the compile-only targets
(`pallas_kernels.targets`, `pallas_kernels.aot`), the libtpu flags (`mla_moe.train.tpu_flags`)
and the pod launcher (`launch.pod.tpu_types`) all read it from here.

It lives in `pallas_kernels`, not `mla_moe`, because `pallas_kernels` must import without
`mla_moe` and its compile targets need the table; `mla_moe` and `launch` already import
`pallas_kernels`. It imports nothing but the standard library.

Figures are whole-chip; bandwidths are bytes/s in one direction (a collective's bytes are what a
device receives over its inbound links, which carry half the published bidirectional figure).
`devices_per_chip` counts the devices a compile-only topology (libtpu, or a GPU target) makes
of one chip: TPU v4 and TPU7x (Ironwood) compile as one device per TensorCore, so two per chip.
A running TPU7x is also two devices per chip (its two dies); a running v4 is one (megacore).

    row = by_device_kind("TPU7x")
    row.per_device()["peak_flops"]  # 1153.5e12: half of the chip's 2307 TFLOP/s
    by_target("v5p").scoped_vmem_bytes  # 16 MiB
    parse_accelerator_type("tpu7x-64").chips  # 32: the type counts TensorCores

The rows are in `chips_tpu.py` and `chips_gpu.py`, the `Chip` dataclass in `chip.py`.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.chip import ROOFLINE_SOURCES, Chip
from pallas_kernels.chips_gpu import GPU_CHIPS
from pallas_kernels.chips_tpu import TPU_CHIPS

__all__ = ["ROOFLINE_SOURCES", "Chip", "CHIPS", "AcceleratorType", "by_device_kind", "by_target",
           "parse_accelerator_type"]

CHIPS: tuple[Chip, ...] = TPU_CHIPS + GPU_CHIPS

_BY_KIND = {c.device_kind: c for c in CHIPS}
_BY_TARGET = {c.target: c for c in CHIPS if c.target}
_BY_TYPE = {gen: c for c in CHIPS for gen in c.accelerator_types}
TPU_TARGETS = tuple(c.target for c in CHIPS if c.target and c.platform == "tpu")
GPU_TARGETS = tuple(c.target for c in CHIPS if c.target and c.platform == "gpu")
ACCELERATOR_TYPE_GENERATIONS = tuple(_BY_TYPE)


def by_device_kind(kind: str, *, family: bool = False) -> Chip | None:
    """The row of a jax `device_kind` ("TPU v5", "NVIDIA H100 80GB HBM3"); None if not in the
    table. With `family`, a kind the table does not hold matches the first row (in table order)
    with an alias in it, case-insensitively: "NVIDIA H100 PCIe" -> the H100 row."""
    row = _BY_KIND.get(kind)
    if row is not None or not family:
        return row
    lowered = kind.lower()
    return next((c for c in CHIPS if any(a.lower() in lowered for a in c.kind_aliases)), None)


def by_target(name: str) -> Chip | None:
    """The row of a compile-target chip name ("v5p", "tpu7x", "h100"); None if not in the
    table."""
    return _BY_TARGET.get(name)


@dataclasses.dataclass(frozen=True)
class AcceleratorType:
    """A Cloud TPU accelerator type "GEN-N" (gcloud's --accelerator-type, the TPU VM's
    TPU_ACCELERATOR_TYPE): "v5p-128", "v5litepod-16", "tpu7x-64"."""

    generation: str  # GEN as the type names it: "v5p", "v5litepod", "tpu7x"
    count: int  # N: TensorCores, which is chips where a chip has one (v5e, v6e)
    chip: Chip

    @property
    def chips(self) -> int:
        """Chips in the slice (at least one)."""
        return max(1, self.count // self.chip.tensorcores_per_chip)


def parse_accelerator_type(name: str) -> AcceleratorType:
    """The accelerator type `name` ("v5p-128"; case and surrounding blanks ignored). ValueError,
    starting with the name, where it is not GEN-N with a known GEN and a positive N."""
    gen, _, count = name.strip().lower().partition("-")
    if gen not in _BY_TYPE or not count.isdigit() or int(count) == 0:
        raise ValueError(
            f"{name!r}: expected an accelerator type GEN-N with GEN one of "
            f"{', '.join(ACCELERATOR_TYPE_GENERATIONS)}, e.g. v5p-128 or v6e-64"
        )
    return AcceleratorType(generation=gen, count=int(count), chip=_BY_TYPE[gen])
