"""Cloud TPU accelerator types ("v5p-128", "v5litepod-16", "v6e-64", "v4-32") as chips,
topology and hosts: what a GKE node selector and a JobSet's pod count need.

v4 and v5p types count TensorCores (2 per chip) and have 3-D topologies; v5e ("v5litepod") and
v6e count chips and have 2-D ones. Multi-host slices have 4 chips per host; a v5e / v6e slice
of up to 8 chips is one host.
"""

from __future__ import annotations

import dataclasses
import math

from mla_moe.errors import InputError

# generation -> (GKE accelerator label, TensorCores per chip counted in the type, topology dims)
_GENERATIONS = {
    "v4": ("tpu-v4-podslice", 2, 3),
    "v5p": ("tpu-v5p-slice", 2, 3),
    "v5litepod": ("tpu-v5-lite-podslice", 1, 2),
    "v5e": ("tpu-v5-lite-podslice", 1, 2),
    "v6e": ("tpu-v6e-slice", 1, 2),
}
CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class TpuType:
    """A TPU slice type (e.g. v5p-128): generation, chips, topology, GKE accelerator name."""

    name: str  # "v5p-128"
    generation: str  # "v5p"
    chips: int
    topology: str  # "4x4x4"
    gke_accelerator: str  # "tpu-v5p-slice"
    dims: int  # of the topology: 3 (v4, v5p) or 2 (v5e, v6e)

    @property
    def chips_per_host(self) -> int:
        """Chips on one host: all of a small 2-D slice, else CHIPS_PER_HOST."""
        if self.dims == 2 and self.chips <= 8:
            return self.chips
        return min(self.chips, CHIPS_PER_HOST)

    @property
    def hosts(self) -> int:
        """Hosts in the slice."""
        return self.chips // self.chips_per_host


def default_topology(chips: int, dims: int) -> str:
    """The usual topology of a slice: start from 2x2x1 (3-D) or 1x1 (2-D) and double the
    smallest dimension (the last among equals) until it holds `chips`: 64 -> 4x4x4, 128 ->
    4x4x8; 16 -> 4x4, 32 -> 4x8."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(k for k, v in enumerate(shape) if v == smallest)
        shape[i] *= 2
    return "x".join(map(str, shape))


def parse(name: str, topology: str = "") -> TpuType:
    """"v5p-128" -> TpuType (topology: the default for its size unless given)."""
    gen, _, count = name.partition("-")
    if gen not in _GENERATIONS or not count.isdigit() or int(count) == 0:
        raise InputError(f"--tpu={name!r}: expected an accelerator type GEN-N with GEN one of "
                         f"{', '.join(_GENERATIONS)}, e.g. v5p-128 or v6e-64")
    label, per_chip, dims = _GENERATIONS[gen]
    chips = max(1, int(count) // per_chip)
    topology = topology or default_topology(chips, dims)
    shape = topology.split("x")
    if (len(shape) != dims or not all(s.isdigit() for s in shape)
            or math.prod(map(int, shape)) != chips):
        raise InputError(f"--topology={topology!r} does not hold the {chips} chips of {name} "
                         f"({dims} dimensions, e.g. {default_topology(chips, dims)})")
    return TpuType(name=name, generation=gen, chips=chips, topology=topology,
                   gke_accelerator=label, dims=dims)
