"""The TPU rows of the chip table (`pallas_kernels.chips`), each figure with its source."""

from __future__ import annotations

from pallas_kernels.chip import GBPS, GIB, MIB, Chip, G, T

_GCP = "cloud.google.com TPU {} docs"
_GCP_7X = "cloud.google.com TPU7x docs (comparison table)"
_GKE = "GKE TPU docs: node label cloud.google.com/gke-tpu-accelerator={}"
_ASSUMED_PCIE4 = (
    "not published; assumed PCIe Gen4 x16, 32 GB/s per direction (an optimistic "
    "rate keeps the bound a lower bound)"
)
_SCOPED_VMEM = (
    "XLA:TPU's default scoped VMEM limit per kernel (the limit its out-of-memory errors name)"
)
_ONE_DEVICE = "one compile-only device per chip"

TPU_CHIPS: tuple[Chip, ...] = (
    Chip(
        name="TPU v4",
        device_kind="TPU v4",
        devices_per_chip=2,
        chip_peak_flops=275 * T,
        chip_hbm_bandwidth=1200 * G,
        chip_ici_bandwidth=300 * G,
        chip_dcn_bandwidth=50 * GBPS,
        chip_host_bandwidth=16 * G,
        host_ram_bytes=407 * G,
        chips_per_host=4,
        sources={
            "peak_flops": _GCP.format("v4") + ": 275 TFLOP/s bf16 per chip",
            "hbm": _GCP.format("v4") + ": 32 GiB HBM2, 1200 GB/s per chip",
            "ici": "TPU v4 paper (Jouppi et al., ISCA 2023): 6 ICI links per chip at 400 "
            "Gbit/s per direction -> 300 GB/s inbound",
            "dcn": "not published per chip; assumed v5p's 50 Gbit/s per chip",
            "host": "PCIe Gen3 x16 per chip (TPU v4 paper): 16 GB/s per direction",
            "host_ram": _GCP.format("v4") + ": a v4 TPU VM has 4 chips, 407 GB RAM",
            "devices": "libtpu compile-only 'v4:2x2x1' gives 8 devices (2 TensorCores per "
            "chip, 15.25G HBM each by the compiler): per-device = half a chip",
            "hbm_device": "the compiler: 'exceeds available HBM (15.25G)' on v4:2x2x1",
            "vmem": _SCOPED_VMEM,
            "tensorcores": _GCP.format("v4") + ": 2 TensorCores per chip; v4-N counts them",
            "gke": _GKE.format("tpu-v4-podslice"),
        },
        chip_hbm_bytes=32 * GIB,
        kind_aliases=("TPU v4",),
        target="v4",
        device_hbm_bytes=int(15.25 * GIB),
        scoped_vmem_bytes=16 * MIB,
        tensorcores_per_chip=2,
        accelerator_types=("v4",),
        topology_dims=3,
        gke_accelerator="tpu-v4-podslice",
    ),
    Chip(
        name="TPU v5e",
        device_kind="TPU v5 lite",
        devices_per_chip=1,
        chip_peak_flops=197 * T,
        chip_hbm_bandwidth=819 * G,
        chip_ici_bandwidth=200 * G,
        chip_dcn_bandwidth=25 * GBPS,
        chip_host_bandwidth=32 * G,
        host_ram_bytes=512 * GIB,
        chips_per_host=8,
        sources={
            "peak_flops": _GCP.format("v5e") + ": 197 TFLOP/s bf16 per chip",
            "hbm": _GCP.format("v5e") + ": 16 GB HBM2, 819 GB/s per chip",
            "ici": _GCP.format("v5e") + ": 400 GB/s bidirectional ICI per chip -> 200 GB/s inbound",
            "dcn": _GCP.format("v5e") + ": 2 x 100 Gbit/s NICs per 8-chip host -> 25 Gbit/s "
            "per chip",
            "host": _ASSUMED_PCIE4,
            "host_ram": _GCP.format("v5e") + ": 512 GiB DRAM per 8-chip host",
            "hbm_device": _ONE_DEVICE + ": the published 16 GiB",
            "vmem": _SCOPED_VMEM,
            "tensorcores": _GCP.format("v5e") + ": 1 TensorCore per chip; v5litepod-N counts chips",
            "gke": _GKE.format("tpu-v5-lite-podslice"),
        },
        chip_hbm_bytes=16 * GIB,
        kind_aliases=("TPU v5 lite", "TPU v5e"),
        target="v5e",
        device_hbm_bytes=16 * GIB,
        scoped_vmem_bytes=16 * MIB,
        tensorcores_per_chip=1,
        accelerator_types=("v5litepod", "v5e"),
        topology_dims=2,
        gke_accelerator="tpu-v5-lite-podslice",
    ),
    Chip(
        name="TPU v5p",
        device_kind="TPU v5",
        devices_per_chip=1,
        chip_peak_flops=459 * T,
        chip_hbm_bandwidth=2765 * G,
        chip_ici_bandwidth=600 * G,
        chip_dcn_bandwidth=50 * GBPS,
        chip_host_bandwidth=32 * G,
        host_ram_bytes=448 * G,
        chips_per_host=4,
        sources={
            "peak_flops": _GCP.format("v5p") + ": 459 TFLOP/s bf16 per chip",
            "fp8": _GCP_7X + ": 459 TFLOP/s FP8 per chip (no faster than bf16)",
            "hbm": _GCP.format("v5p") + ": 95 GiB HBM2e, 2765 GB/s per chip",
            "ici": _GCP.format("v5p") + ": 1200 GB/s bidirectional ICI per chip (4800 Gbit/s "
            "per direction) -> 600 GB/s inbound",
            "dcn": _GCP.format("v5p") + ": 50 Gbit/s DCN per chip",
            "host": _ASSUMED_PCIE4,
            "host_ram": _GCP.format("v5p") + ": 448 GB RAM per 4-chip VM",
            "hbm_device": _ONE_DEVICE + " (megacore): the published 95 GiB (the compiler "
            "allows 95.74G)",
            "vmem": _SCOPED_VMEM,
            "tensorcores": _GCP_7X + ": 2 TensorCores per chip; v5p-N counts them",
            "gke": _GKE.format("tpu-v5p-slice"),
        },
        chip_peak_fp8_flops=459 * T,
        chip_hbm_bytes=95 * GIB,
        kind_aliases=("TPU v5p", "TPU v5"),
        target="v5p",
        device_hbm_bytes=95 * GIB,
        scoped_vmem_bytes=16 * MIB,
        tensorcores_per_chip=2,
        accelerator_types=("v5p",),
        topology_dims=3,
        gke_accelerator="tpu-v5p-slice",
    ),
    Chip(
        name="TPU v6e",
        device_kind="TPU v6 lite",
        devices_per_chip=1,
        chip_peak_flops=918 * T,
        chip_hbm_bandwidth=1640 * G,
        chip_ici_bandwidth=400 * G,
        chip_dcn_bandwidth=100 * GBPS,
        chip_host_bandwidth=32 * G,
        host_ram_bytes=1536 * GIB,
        chips_per_host=8,
        sources={
            "peak_flops": _GCP.format("v6e") + ": 918 TFLOP/s bf16 per chip",
            "fp8": _GCP_7X + ": 918 TFLOP/s FP8 per chip (no faster than bf16)",
            "hbm": _GCP.format("v6e") + ": 32 GB HBM, 1640 GB/s per chip",
            "ici": _GCP.format("v6e") + ": 800 GB/s bidirectional ICI per chip -> 400 GB/s inbound",
            "dcn": _GCP.format("v6e") + ": 4 x 200 Gbit/s NICs per 8-chip host -> 100 Gbit/s "
            "per chip",
            "host": _ASSUMED_PCIE4,
            "host_ram": _GCP.format("v6e") + ": 1536 GiB DRAM per 8-chip host",
            "hbm_device": _ONE_DEVICE + ": the published 32 GiB",
            "vmem": _SCOPED_VMEM,
            "tensorcores": _GCP_7X + ": 1 TensorCore per chip; v6e-N counts chips",
            "gke": _GKE.format("tpu-v6e-slice"),
        },
        chip_peak_fp8_flops=918 * T,
        chip_hbm_bytes=32 * GIB,
        kind_aliases=("TPU v6 lite", "TPU v6e"),
        target="v6e",
        device_hbm_bytes=32 * GIB,
        scoped_vmem_bytes=32 * MIB,
        tensorcores_per_chip=1,
        accelerator_types=("v6e",),
        topology_dims=2,
        gke_accelerator="tpu-v6e-slice",
    ),
    Chip(
        name="TPU7x (Ironwood)",
        device_kind="TPU7x",
        devices_per_chip=2,
        chip_peak_flops=2307 * T,
        chip_hbm_bandwidth=7380 * G,
        chip_ici_bandwidth=600 * G,
        chip_dcn_bandwidth=100 * GBPS,
        chip_host_bandwidth=64 * G,
        host_ram_bytes=960 * G,
        chips_per_host=4,
        sources={
            "peak_flops": _GCP.format("TPU7x") + ": 2307 TFLOP/s bf16 per chip (4614 FP8)",
            "fp8": _GCP.format("TPU7x") + ": 4614 TFLOP/s FP8 per chip",
            "hbm": _GCP.format("TPU7x") + ": 192 GiB HBM, 7380 GB/s per chip",
            "ici": "Google Ironwood announcement: 1.2 TB/s bidirectional ICI per chip -> 600 "
            "GB/s inbound",
            "dcn": "GKE Ironwood docs: 2 NICs per 4-chip VM; NIC rate not published, assumed "
            "200 Gbit/s each -> 100 Gbit/s per chip",
            "host": "not published; assumed PCIe Gen5 x16, 64 GB/s per direction",
            "host_ram": _GCP.format("TPU7x") + ": 960 GB RAM per 4-chip VM",
            "devices": "libtpu compile-only 'tpu7x:2x2x1' gives 8 devices (2 TensorCores per "
            "chip, 94.75G HBM each by the compiler): per-device = half a chip",
            "hbm_device": "the compiler: 'exceeds available HBM (94.75G)' on tpu7x:2x2x1",
            "vmem": _SCOPED_VMEM,
            "tensorcores": _GCP.format("TPU7x") + ": 2 TensorCores per chip (dual chiplet, "
            "one jax device each); tpu7x-N counts them (tpu7x-8 is 2x2x1, 4 chips)",
            "gke": _GKE.format("tpu7x") + " (machine type tpu7x-standard-4t: 4 chips per VM)",
        },
        chip_peak_fp8_flops=4614 * T,
        chip_hbm_bytes=192 * GIB,
        kind_aliases=("TPU7x",),
        target="tpu7x",
        device_hbm_bytes=int(94.75 * GIB),
        scoped_vmem_bytes=32 * MIB,
        tensorcores_per_chip=2,
        accelerator_types=("tpu7x",),
        topology_dims=3,
        gke_accelerator="tpu7x",
    ),
)
