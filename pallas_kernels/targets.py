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

if TYPE_CHECKING:
    import jax

# H100 / H200 (sm_90a) from XLA's target specs; A100 (sm_80) is the H100 file with the
# A100-SXM4-80GB's published figures (SMs, shared memory, HBM, bandwidth, L2, clock).
GPU_TARGETS = {"a100": "a100_sxm_80.txtpb", "h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}
# tpu7x: Ironwood (device_kind "TPU7x"); libtpu names it "tpu7x", not "v7x" or "ironwood".
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e", "tpu7x")

_GIB = 1 << 30
# HBM per compile-only device (they report no memory of their own). One device per chip on v5e,
# v5p and v6e (the published per-chip figure; the compiler allows a little more, e.g. 95.74G on
# v5p). TPU v4 and TPU7x compile as two devices per chip, one per TensorCore: their figure is
# the compiler's own limit from an out-of-memory verdict ("exceeds available HBM (15.25G)" on
# v4:2x2x1, "(94.75G)" on tpu7x:2x2x1), against the published 32 GiB and 192 GiB per chip.
_TPU_HBM_BYTES = {"TPU v4": int(15.25 * _GIB), "TPU v5 lite": 16 * _GIB, "TPU v5": 95 * _GIB,
                  "TPU v6 lite": 32 * _GIB, "TPU7x": int(94.75 * _GIB)}


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
    """Per-device HBM of a (compile-only) TPU or GPU device."""
    kind = device.device_kind
    if kind in _TPU_HBM_BYTES:
        return _TPU_HBM_BYTES[kind]
    for chip in GPU_TARGETS:
        config = gpu_target_config(chip)
        if f'name: "{kind}"' in config:
            line = next(x for x in config.splitlines() if "device_memory_size:" in x)
            return int(line.split(":")[1])
    raise ValueError(f"no HBM size known for device kind {kind!r}")
