"""The chip table: every row has the figures its platform needs, each with a source; lookups by
device kind, target name and accelerator type; the compile-only devices and GPU target configs
agree with it; and what the roofline, the logged MFU, the targets and the launchers read from it.
"""

import re
import types

import pytest

from launch.pod import tpu_types
from mla_moe.train import metrics, roofline, tpu_flags
from pallas_kernels import aot, chips, targets

GIB = 1 << 30
MIB = 1 << 20
TPU_ROWS = [c for c in chips.CHIPS if c.platform == "tpu"]
GPU_ROWS = [c for c in chips.CHIPS if c.platform == "gpu"]

# The dense bf16 peaks the logged MFU used before the table: a running device of each kind
# still gets them.
LOGGED_PEAKS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L4": 121e12,
    "B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def test_every_chip_has_the_fields_it_needs():
    assert len({c.name for c in chips.CHIPS}) == len(chips.CHIPS)
    assert len({c.device_kind for c in chips.CHIPS}) == len(chips.CHIPS)
    for row in chips.CHIPS:
        assert {"peak_flops", "hbm", "ici", "dcn", "host", "host_ram"} <= set(row.sources), row
        assert all(isinstance(v, str) and v for v in row.sources.values()), row.name
        assert row.chip_hbm_bytes > 0 and row.host_ram_per_chip > 0, row.name
        assert row.kind_aliases, row.name
        # Every optional figure the row has names its source.
        needs = {
            "fp8": row.chip_peak_fp8_flops,
            "devices": row.devices_per_chip > 1,
            "hbm_device": row.device_hbm_bytes,
            "vmem": row.scoped_vmem_bytes,
            "shared_memory": row.shared_memory_per_block,
            "gke": row.gke_accelerator,
            "tensorcores": row.tensorcores_per_chip,
        }
        assert {k for k, v in needs.items() if v} <= set(row.sources), row.name
        if row.chip_peak_fp8_flops:
            assert row.chip_peak_fp8_flops >= row.chip_peak_flops, row.name
    for row in TPU_ROWS:
        assert row.target and row.device_hbm_bytes and row.scoped_vmem_bytes, row.name
        assert row.tensorcores_per_chip in (1, 2) and row.topology_dims in (2, 3), row.name
        assert row.accelerator_types and row.gke_accelerator, row.name
        assert row.shared_memory_per_block is None and row.gpu_target_config is None
        # A compile-only device holds at most its share of the chip's HBM.
        assert row.device_hbm_bytes <= row.chip_hbm_bytes / row.devices_per_chip, row.name
    for row in GPU_ROWS:
        assert row.shared_memory_per_block and row.devices_per_chip == 1, row.name
        assert row.scoped_vmem_bytes is None and not row.accelerator_types, row.name
        assert bool(row.target) == bool(row.gpu_target_config) == bool(row.device_hbm_bytes)


def test_a_row_names_the_field_that_is_wrong():
    with pytest.raises(ValueError, match="chips_per_host=0 must be >= 1"):
        chips.Chip("x", "x", 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1, 0, {})
    with pytest.raises(ValueError, match="chip_hbm_bandwidth=0.0 must be > 0"):
        chips.Chip("x", "x", 1, 1.0, 0.0, 1.0, 1.0, 1.0, 1, 1, {})
    with pytest.raises(ValueError, match="accelerator_types need"):
        chips.Chip("x", "x", 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1, 1, {}, accelerator_types=("x",))


def test_lookup_by_device_kind_and_by_target_name():
    ironwood = chips.by_device_kind("TPU7x")
    assert ironwood is chips.by_target("tpu7x") and ironwood.name == "TPU7x (Ironwood)"
    assert ironwood.chip_peak_flops == 2307e12 and ironwood.chip_peak_fp8_flops == 4614e12
    assert ironwood.chip_hbm_bytes == 192 * GIB and ironwood.gke_accelerator == "tpu7x"
    for row in chips.CHIPS:
        assert chips.by_device_kind(row.device_kind) is row
        assert chips.by_device_kind(row.device_kind, family=True) is row
        for alias in row.kind_aliases:  # no earlier row claims a later row's family
            assert chips.by_device_kind(alias, family=True) is row, alias
        if row.target:
            assert chips.by_target(row.target) is row
    # A kind the table does not hold is found by family only when asked.
    assert chips.by_device_kind("NVIDIA H100 PCIe") is None
    assert chips.by_device_kind("NVIDIA H100 PCIe", family=True).name == "NVIDIA H100"
    assert chips.by_device_kind("nvidia a100-sxm4-40gb", family=True).name == "NVIDIA A100"
    assert chips.by_device_kind("TPU v5e", family=True).name == "TPU v5e"
    assert chips.by_device_kind("cpu", family=True) is None and chips.by_target("v9") is None


def test_the_targets_and_kernel_limits_come_from_the_table():
    assert targets.TPU_GENERATIONS == ("v4", "v5e", "v5p", "v6e", "tpu7x")
    assert targets.GPU_TARGETS == {
        "a100": "a100_sxm_80.txtpb",
        "h100": "h100_sxm.txtpb",
        "h200": "h200_sxm.txtpb",
    }
    kinds = ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU7x")
    assert [aot.vmem_limit_bytes(k) for k in kinds] == [16 * MIB] * 3 + [32 * MIB] * 2
    with pytest.raises(KeyError):
        aot.vmem_limit_bytes("NVIDIA H100 80GB HBM3")
    with pytest.raises(KeyError):
        aot.shared_memory_limit_bytes("b200")  # no compile target
    hbm = {
        "TPU v4": int(15.25 * GIB),
        "TPU v5 lite": 16 * GIB,
        "TPU v5": 95 * GIB,
        "TPU v6 lite": 32 * GIB,
        "TPU7x": int(94.75 * GIB),
    }
    for kind, nbytes in hbm.items():
        assert targets.hbm_bytes(types.SimpleNamespace(device_kind=kind)) == nbytes
    with pytest.raises(ValueError, match="no HBM size known"):
        targets.hbm_bytes(types.SimpleNamespace(device_kind="NVIDIA L4"))


@pytest.mark.parametrize("row", [c for c in GPU_ROWS if c.target], ids=lambda c: c.target)
def test_gpu_rows_match_their_target_configs(row):
    config = targets.gpu_target_config(row.target)
    field = lambda name: int(re.search(rf"{name}:\s*(\d+)", config).group(1))  # noqa: E731
    assert f'name: "{row.device_kind}"' in config
    assert field("device_memory_size") == row.device_hbm_bytes
    assert field("shared_memory_per_block_optin") == row.shared_memory_per_block
    assert aot.shared_memory_limit_bytes(row.target) == row.shared_memory_per_block


@pytest.mark.parametrize("row", TPU_ROWS, ids=lambda c: c.target)
def test_compile_only_tpu_devices_agree_with_the_table(row):
    """libtpu's topology of 4 chips is 4 x devices_per_chip devices of the row's kind."""
    grid = "2x2x1" if row.topology_dims == 3 else "2x2"
    devices = targets.devices(f"tpu:{row.target}:{grid}")
    assert len(devices) == 4 * row.devices_per_chip
    assert chips.by_device_kind(devices[0].device_kind) is row
    assert targets.hbm_bytes(devices[0]) == row.device_hbm_bytes
    assert aot.vmem_limit_bytes(devices[0].device_kind) == row.scoped_vmem_bytes


def test_accelerator_types():
    t = chips.parse_accelerator_type("tpu7x-64")
    assert (t.generation, t.count, t.chips, t.chip.target) == ("tpu7x", 64, 32, "tpu7x")
    t = chips.parse_accelerator_type(" V5P-128 ")
    assert (t.generation, t.chips, t.chip.name) == ("v5p", 64, "TPU v5p")
    assert chips.parse_accelerator_type("v5litepod-16").chips == 16
    assert chips.parse_accelerator_type("v5e-16").chip is chips.by_target("v5e")
    for bad in ("v9-8", "v5p-0", "v5p", "tpu7x-x", "", "-8"):
        with pytest.raises(ValueError, match=re.escape(f"{bad!r}: expected an accelerator type")):
            chips.parse_accelerator_type(bad)


@pytest.mark.parametrize("gen", chips.ACCELERATOR_TYPE_GENERATIONS)
def test_one_parser_for_the_launchers_and_the_libtpu_flags(gen):
    row = chips.parse_accelerator_type(f"{gen}-8").chip
    assert tpu_flags.generation_from_env({"TPU_ACCELERATOR_TYPE": f"{gen}-8"}) == row.target
    tpu = tpu_types.parse(f"{gen}-{16 * row.tensorcores_per_chip}")
    assert tpu.chips == 16 and tpu.gke_accelerator == row.gke_accelerator
    assert tpu.dims == row.topology_dims and tpu.generation == gen


def test_ironwood_slices():
    tpu = tpu_types.parse("tpu7x-8")
    assert (tpu.chips, tpu.topology, tpu.hosts, tpu.chips_per_host) == (4, "2x2x1", 1, 4)
    assert tpu.gke_accelerator == "tpu7x"
    tpu = tpu_types.parse("tpu7x-256", "4x4x8")
    assert (tpu.chips, tpu.hosts) == (128, 32)


def _device(kind: str, cores: tuple[int, ...] | None = None):
    """A stand-in for a jax device of `kind`; `cores`: the TensorCore index of each device of
    its client (a TPU), None for a device without one (a GPU)."""
    if cores is None:
        return types.SimpleNamespace(device_kind=kind)
    peers = [types.SimpleNamespace(core_on_chip=c) for c in cores]
    client = types.SimpleNamespace(devices=lambda: peers)
    return types.SimpleNamespace(device_kind=kind, core_on_chip=0, client=client)


@pytest.mark.parametrize("kind", LOGGED_PEAKS)
def test_logged_peaks_of_running_devices_are_kept(kind):
    device = _device(kind, (0, 0) if kind.startswith("TPU") else None)  # v4, v5p: megacore
    peak, source = metrics.peak_flops_per_device(device=device)
    assert peak == LOGGED_PEAKS[kind] and source == f"{kind} spec"


def test_ironwood_peak_is_per_device_as_the_roofline_counts_it():
    per_device = roofline.chip("TPU7x").per_device()["peak_flops"]
    assert per_device == 2307e12 / 2
    # A running Ironwood chip is two devices (TensorCores 0 and 1), as compiled.
    running = _device("TPU7x", (0, 1, 0, 1))
    assert metrics.peak_flops_per_device(device=running) == (
        per_device,
        "TPU7x spec, 1/2 of a chip",
    )
    assert metrics.peak_flops_per_device(device=_device("TPU7x"))[0] == per_device
    compiled = targets.devices("tpu:tpu7x:2x2x1")[0]
    assert metrics.peak_flops_per_device(device=compiled)[0] == per_device
    # v4 compiled for a topology is two devices per chip too, as the roofline counts it.
    v4 = targets.devices("tpu:v4:2x2x1")[0]
    v4_per_device = roofline.chip("TPU v4").per_device()["peak_flops"]
    assert metrics.peak_flops_per_device(device=v4)[0] == v4_per_device == 275e12 / 2
    assert metrics.peak_flops_per_device(5.0, compiled) == (5e12, "config")
