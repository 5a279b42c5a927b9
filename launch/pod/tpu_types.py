"""Cloud TPU accelerator types ("v5p-128", "v5litepod-16", "v6e-64", "v4-32", "tpu7x-64") as
chips, topology and hosts: what a GKE node selector and a JobSet's pod count need.

The type's N counts TensorCores: 2 per chip on v4, v5p and tpu7x (Ironwood), which have 3-D
topologies; 1 on v5e ("v5litepod") and v6e, which have 2-D ones (so N is their chips).
Multi-host slices have 4 chips per host (tpu7x-standard-4t on Ironwood); a v5e / v6e slice of
up to 8 chips is one host. Generations, TensorCores per chip, topology dimensions and GKE
labels are the chip table's (`pallas_kernels.chips`), which parses the type name.
"""

from __future__ import annotations

import dataclasses
import math

from mla_moe.errors import InputError
from pallas_kernels.chips import parse_accelerator_type

CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class TpuType:
    """A TPU slice type (e.g. v5p-128): generation, chips, topology, GKE accelerator name."""

    name: str  # "v5p-128"
    generation: str  # "v5p"
    chips: int
    topology: str  # "4x4x4"
    gke_accelerator: str  # "tpu-v5p-slice"
    dims: int  # of the topology: 3 (v4, v5p, tpu7x) or 2 (v5e, v6e)

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
    """The slice type `name` ("v5p-128") as a TpuType (topology: the default for its size unless
    given)."""
    try:
        accelerator = parse_accelerator_type(name)
    except ValueError as e:
        raise InputError(f"--tpu={e}") from None
    row, chips = accelerator.chip, accelerator.chips
    dims = row.topology_dims
    topology = topology or default_topology(chips, dims)
    shape = topology.split("x")
    if (len(shape) != dims or not all(s.isdigit() for s in shape)
            or math.prod(map(int, shape)) != chips):
        raise InputError(f"--topology={topology!r} does not hold the {chips} chips of {name} "
                         f"({dims} dimensions, e.g. {default_topology(chips, dims)})")
    return TpuType(name=name, generation=accelerator.generation, chips=chips, topology=topology,
                   gke_accelerator=row.gke_accelerator, dims=dims)
