"""Compile-only TPU and GPU devices, for compiling on a host that has neither.

libtpu compiles for a TPU topology it does not own, and the CUDA plugin for a GPU described by
a `stream_executor.GpuTargetConfigProto` (shipped here as package data, `gpu_targets/`). The
devices returned here cannot run anything; `jax.jit(f).lower(...).compile()` on shardings over
them runs the real compiler (XLA:TPU + Mosaic, XLA:GPU + Triton) and reports memory.

Target strings: "tpu:v5p:2x2x1" (libtpu topology names v4, v5e, v5p, v6e, tpu7x + chip grid) and
"gpu:h100:1x4x8" (partitions x hosts x GPUs per host). Start the process with
JAX_PLATFORMS=cpu: the CUDA plugin then does not look for a driver, nor libtpu for a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources
from typing import TYPE_CHECKING

from pallas_kernels import chips

if TYPE_CHECKING:
    import jax

# The compile targets are the chip table's rows with a target name. GPU: chip name -> its
# GpuTargetConfigProto file. H100 / H200 (sm_90a) are XLA's target specs; A100 (sm_80) is the
# H100 file with the A100-SXM4-80GB's published figures (SMs, shared memory, HBM, bandwidth, L2,
# clock). TPU: libtpu's topology names; tpu7x is Ironwood (device_kind "TPU7x"), which libtpu
# names "tpu7x", not "v7x" or "ironwood".
GPU_TARGETS = {c.target: c.gpu_target_config for c in chips.CHIPS if c.gpu_target_config}
TPU_GENERATIONS = chips.TPU_TARGETS


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target parsed from `platform:chip:topology` (e.g. `tpu:v5p:2x2x1`)."""

    platform: str  # "tpu" or "gpu"
    chip: str  # "v5p", "h100", ...
    topology: str  # "2x2x1" (TPU chip grid) or "1x4x8" (GPU partitions x hosts x per host)
    num_slices: int = 1

    def __str__(self) -> str:
        tail = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.platform}:{self.chip}:{self.topology}{tail}"


def parse_target(text: str, num_slices: int = 1) -> Target:
    """`"tpu:v5p:8x8x8"` or `"gpu:h100:1x4x8"` -> Target; ValueError naming what is wrong."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ("tpu", "gpu"):
        raise ValueError(f"target {text!r}: expected tpu:GEN:AxBxC (GEN one of "
                         f"{', '.join(TPU_GENERATIONS)}) or gpu:NAME:PxHxG (NAME one of "
                         f"{', '.join(GPU_TARGETS)})")
    platform, chip, topology = parts
    known = TPU_GENERATIONS if platform == "tpu" else tuple(GPU_TARGETS)
    if chip not in known:
        raise ValueError(f"target {text!r}: unknown {platform} {chip!r}; known: "
                         f"{', '.join(known)}")
    dims = topology.split("x")
    if not all(d.isdigit() and int(d) > 0 for d in dims) or (
            platform == "gpu" and len(dims) != 3):
        raise ValueError(f"target {text!r}: topology {topology!r} must be positive integers "
                         "joined by 'x'" + (" (partitions x hosts x GPUs per host)"
                                            if platform == "gpu" else ""))
    if num_slices < 1 or (num_slices > 1 and platform != "tpu"):
        raise ValueError(f"num_slices={num_slices}: must be >= 1, and > 1 only for TPU targets")
    return Target(platform, chip, topology, num_slices)


def gpu_target_config(chip: str) -> str:
    """The GpuTargetConfigProto text of a known GPU ("h100", "h200")."""
    name = GPU_TARGETS[chip]
    return resources.files("pallas_kernels").joinpath("gpu_targets", name).read_text()


@functools.cache
def devices(target: Target | str) -> tuple:
    """The compile-only devices of a target, in the topology's order."""
    from jax.experimental import topologies

    target = parse_target(target) if isinstance(target, str) else target
    if target.platform == "tpu":
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{target.chip}:{target.topology}",
            num_slices=target.num_slices)
    else:
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(target.chip),
            topology=target.topology)
    return tuple(desc.devices)


def hbm_bytes(device: jax.Device) -> int:
    """Per-device HBM of a (compile-only) TPU or GPU device, which such devices do not report:
    the chip table's `device_hbm_bytes`. One device per chip on v5e, v5p and v6e (the published
    per-chip figure; the compiler allows a little more, e.g. 95.74G on v5p); TPU v4 and TPU7x
    compile as two devices per chip, and their figure is the compiler's own limit; a GPU's is its
    target config's `device_memory_size`."""
    row = chips.by_device_kind(device.device_kind)
    if row is None or row.device_hbm_bytes is None:
        raise ValueError(f"no HBM size known for device kind {device.device_kind!r}")
    return row.device_hbm_bytes
