"""The roofline lower bound of any compiled program, read from its optimized HLO text: the HBM
bytes it must move (`hlo_traffic`), the bytes its collectives must bring to each device
(`hlo_collectives`), and the time terms at the chip's published rates (`roofline`).

    bound = measure(compiled.as_text(), chip=roofline.chip("TPU v5"), flops_per_device=1.4e16)
    bound.hbm_traffic_bytes, bound.estimate["step_s_lower_bound"]

`launch.compile` reports our own step this way and `bench/hlo_bound.py` any saved module (a
MaxText program, say), so both are read with the same rules. What the bound includes: every
instruction's HBM operands and results (loop bodies once per iteration), the collectives' link
bytes, the DCN transfers of multislice programs, and, on GPU clusters, what must enter each
host over its NICs. What it excludes: the Pallas kernels' own HBM traffic, which depends on
their grids and data (`kernel_bytes` gives their operands and results once each, beside the
bound), latency, launch and synchronisation costs, imperfect overlap of the terms.
"""

from __future__ import annotations

import dataclasses

from mla_moe.train import hlo_collectives, hlo_traffic, roofline
from mla_moe.train.hlo_text import Module
from pallas_kernels.chip import Chip


@dataclasses.dataclass
class Bound:
    """What `measure` reads of one module; bytes are per device per step."""

    num_devices: int
    hbm_traffic_bytes: float  # the HBM walk, loop bodies once per iteration
    hbm_traffic_bytes_once: float  # the same walk, loop bodies once (for the compiler's count)
    kernel_bytes: float  # Pallas kernels' HBM operands and results once each: not in the bound
    collectives: dict  # hlo_collectives.collectives(): per kind {count, ops, bytes, ...}
    dcn_collectives: dict  # hlo_collectives.dcn_collectives(): multislice transfers
    ici_bytes: float  # collective bytes within a slice (NVLink within a host on GPU)
    dcn_bytes: float  # across slices (TPU) or into a host over its NICs, per NIC (GPU)
    estimate: dict  # roofline.Estimate.to_json(); {} without a chip row

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def measure(hlo_text: str, *, chip: Chip | None, flops_per_device: float,
            host_bytes: float = 0.0, devices_per_host: int = 0,
            module: Module | None = None) -> Bound:
    """The bound of one compiled module on `chip` (None: bytes only, no time terms).

    devices_per_host: GPUs per host of a GPU cluster (default: the chip's); a module on more
    devices than that has its cross-host share over the network, as `hlo_collectives` counts
    it. host_bytes: what the step moves to and from host memory per device (the host term)."""
    module = module or Module(hlo_text)
    devices = hlo_collectives.num_devices(hlo_text)
    per_host = 0
    if chip is not None and chip.platform == "gpu":
        per_host = devices_per_host or chip.devices_per_host
    table = hlo_collectives.collectives(hlo_text, module=module,
                                        devices_per_host=per_host if devices > per_host else 0)
    dcn = hlo_collectives.dcn_collectives(hlo_text, module=module)
    link = sum(r["bytes"] for r in table.values())
    network = sum(r.get("network_bytes", 0.0) for r in table.values())
    ici_bytes = link - network
    dcn_bytes = network + sum(r["bytes"] for r in dcn.values())
    traffic = hlo_traffic.hbm_bytes(hlo_text, module=module)
    estimate = {}
    if chip is not None:
        estimate = roofline.estimate(
            chip, flops=flops_per_device, bytes_accessed=traffic["per_step"],
            ici_bytes=ici_bytes, dcn_bytes=dcn_bytes, host_bytes=host_bytes).to_json()
    return Bound(num_devices=devices, hbm_traffic_bytes=traffic["per_step"],
                 hbm_traffic_bytes_once=traffic["once"],
                 kernel_bytes=hlo_traffic.kernel_bytes(hlo_text, module=module),
                 collectives=table, dcn_collectives=dcn,
                 ici_bytes=ici_bytes, dcn_bytes=dcn_bytes, estimate=estimate)
