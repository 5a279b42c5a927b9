"""Meshes that span slices: TPU slices joined by the data-center network (DCN), or the hosts of
a GPU / CPU cluster.

Within a slice devices talk over ICI, fast; between slices over DCN, an order of magnitude
slower. So only the axes whose traffic is light per step cross slices: `mesh.dcn_data` (data
parallelism: one gradient all-reduce per step) and `mesh.dcn_fsdp` (FSDP across slices: weight
gathers and gradient reduce-scatters, for models whose state does not fit one slice). The
mesh's `data` axis is then `mesh.data x mesh.dcn_data` devices long, slice-major: devices
`0..data-1` of the axis are slice 0's.

The granules a DCN axis spans are TPU slices (the devices' `slice_index`); devices without
slices (GPUs, CPUs) count each process as one granule, as a GPU node is one.

    dcn = dcn_shape(config.mesh)              # {"data": 2, "fsdp": 1}
    granules = check_granules(dcn, devices)   # raises unless the devices form 2 granules
    devices_4d = hybrid_devices(sizes, dcn, devices, granules)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DCN_FIELDS = {"data": "dcn_data", "fsdp": "dcn_fsdp"}


def dcn_shape(mesh_cfg: Mapping[str, Any]) -> dict[str, int]:
    """{"data": mesh.dcn_data, "fsdp": mesh.dcn_fsdp}, each a positive integer (default 1)."""
    out = {}
    for axis, field in DCN_FIELDS.items():
        v = (mesh_cfg.get(field, 1) if isinstance(mesh_cfg, Mapping)
             else getattr(mesh_cfg, field, 1))
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"mesh.{field} must be a positive integer, got {v!r}")
        out[axis] = v
    return out


def slice_count(devices: Sequence) -> int:
    """How many TPU slices `devices` span (1 for devices without a slice index)."""
    return len({getattr(d, "slice_index", None) or 0 for d in devices})


def check_granules(dcn: Mapping[str, int], devices: Sequence) -> str | None:
    """What the DCN axes span: "slices", "processes", or None for a single-slice mesh.

    The product of the `dcn_*` sizes must equal the number of TPU slices (for devices without
    slices: of processes, when it is above 1); a mismatch is a ValueError naming both numbers.
    """
    want = math.prod(dcn.values())
    fields = " x ".join(f"mesh.{DCN_FIELDS[a]}={n}" for a, n in dcn.items())
    slices = slice_count(devices)
    if slices > 1 or want == 1:
        if want != slices:
            raise ValueError(
                f"{fields} spans {want} slice{'s' * (want > 1)}, but the devices form {slices} "
                f"slice{'s' * (slices > 1)}: set the dcn_* sizes so their product is {slices}")
        return None if slices == 1 else "slices"
    processes = len({d.process_index for d in devices})
    if want != processes:
        raise ValueError(
            f"{fields} spans {want} slices, but the devices form 1 slice "
            f"({processes} process{'es' * (processes > 1)}): set the dcn_* sizes to 1 (or their "
            "product to the number of slices or processes)")
    return "processes"


def hybrid_devices(sizes: Mapping[str, int], dcn: Mapping[str, int], devices: Sequence,
                   granules: str) -> np.ndarray:
    """The [data, fsdp, expert, tensor] device array: each slice's devices laid out over its
    ICI topology (`mesh_utils.create_hybrid_device_mesh`), slices stacked along the DCN axes.
    `sizes` are the whole mesh's axis sizes (DCN sizes included), in the mesh's axis order."""
    from jax.experimental import mesh_utils

    axes = tuple(sizes)
    dcn_shape_ = tuple(dcn.get(a, 1) for a in axes)
    ici_shape = tuple(sizes[a] // n for a, n in zip(axes, dcn_shape_))
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape_, devices, process_is_granule=granules == "processes")
