"""Ahead-of-time compilation of a run's train step (or its decode step) for a TPU slice or a
GPU cluster this host does not have: will it fit, and what does it communicate?

The train step is the trainer's own (`trainer.build`, the same jit, shardings and donation);
the state and the batch are ShapeDtypeStructs carrying the run's shardings, so nothing is
allocated and no data is read. The real compilers run (XLA:TPU + Mosaic from libtpu, XLA:GPU
+ Triton from the CUDA plugin) on compile-only devices (`pallas_kernels.targets`); the process
must run with JAX_PLATFORMS=cpu.

    devices = targets.devices("tpu:v5p:8x8x8")
    report, compiled = compile_train(config, devices, target="tpu:v5p:8x8x8")
    print(report.text()); report.fits

A compiler out-of-memory is a result (`fits=False`, with the required and available bytes),
not an exception. So is a step whose host-memory buffers (offloaded arguments, outputs and
temporaries) exceed the host's RAM (`limit_exceeded="host RAM"`).

Each report carries a roofline `estimate` (`roofline.estimate`): the step's compute, HBM,
ICI, DCN and host-transfer times per device at the chip's published rates, and the largest as
a lower bound on the step time. It is a lower bound from analysis, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import mla_moe
from mla_moe import counting, moe_parallel, sharding
from mla_moe.cache import init_cache
from mla_moe.generation import decode_step
from mla_moe.train import config as config_lib
from mla_moe.train import hlo_bound, roofline, trainer
from pallas_kernels import targets

if TYPE_CHECKING:
    import ml_collections

    from mla_moe.config import ModelConfig

GIB = 1 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# "Used 105.93G of 95.74G hbm" (XLA:TPU), "... 20.31M and limit 16.00M" (Mosaic VMEM).
_USED_OF = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) (\w+)")
_AND_LIMIT = re.compile(r"([\d.]+)([KMGT]?) and limit ([\d.]+)([KMGT]?)")
# "the total memory required for HLO temporaries (2.10T) exceeds available HBM (95.74G)"
_EXCEEDS = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available (\w+) \(([\d.]+)([KMGT]?)\)")


@dataclasses.dataclass
class Report:
    """What one ahead-of-time compile found; bytes are per device."""

    what: str  # "train" or "decode"
    target: str
    mesh: dict[str, int]
    device_kind: str
    num_devices: int
    batch_size: int  # global sequences
    seq_len: int  # train: sequence length; decode: cache length
    fits: bool
    # The compiler's peak: arguments + unaliased outputs + temporaries (required bytes when it
    # ran out of memory).
    per_device_bytes: int
    hbm_capacity_bytes: int  # the device's HBM, as the compiler allows it
    argument_bytes: int = 0  # parameters + optimizer state + batch (train)
    state_bytes: int = 0  # parameters + optimizer state alone, from the shardings
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    compile_s: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)
    # Across slices (multislice TPU targets): {"ALL_REDUCE/SUM": {count, bytes, ops}, ...}
    dcn_collectives: dict = dataclasses.field(default_factory=dict)
    model_flops_per_step: float = 0.0
    out_of_memory: str = ""  # the compiler's message when it ran out of memory
    # Host memory the step's buffers live in (memory_analysis' host_* sizes: arguments +
    # unaliased outputs + temporaries), against the host's RAM per device (the chip table's
    # host RAM / devices per host; 0 where the table has no row).
    host_bytes: int = 0
    host_ram_bytes: int = 0
    limit_exceeded: str = ""  # "HBM", "host RAM" or both ("HBM and host RAM") when not fits
    # True when no routed assignment can be dropped by construction (`is_dropless`).
    dropless: bool = True
    # HBM traffic per device per step, a lower bound from the optimized HLO
    # (`hlo_traffic.hbm_bytes`: HBM-resident operands and results, loop bodies once per
    # iteration), and the compiler's own "bytes accessed" (loop bodies once; None on GPU).
    hbm_traffic_bytes: float | None = None
    compiler_bytes_accessed_once: float | None = None
    # The Pallas kernels' HBM operands and results once each: left out of the bound above.
    kernel_bytes: float = 0.0
    # Collective bytes per device per step within a slice (NVLink on GPU) and across slices or
    # hosts (DCN; a GPU host's NICs), as `hlo_bound.measure` splits them.
    ici_bytes: float = 0.0
    dcn_bytes: float = 0.0
    estimate: dict = dataclasses.field(default_factory=dict)  # roofline.Estimate.to_json()

    @property
    def tokens_per_device(self) -> float:
        """Tokens (train) or sequences (decode) each device holds per step."""
        tokens = self.batch_size * (self.seq_len if self.what == "train" else 1)
        return tokens / self.num_devices

    def to_json(self) -> dict:
        """The report's fields plus the derived ones, for `--json`."""
        d = dataclasses.asdict(self)
        d["tokens_per_device"] = self.tokens_per_device
        d["peak_fraction_of_hbm"] = self.per_device_bytes / self.hbm_capacity_bytes
        return d

    def text(self) -> str:
        """The report as lines for a terminal."""
        mesh = " x ".join(f"{a}={n}" for a, n in self.mesh.items())
        head = (f"{self.what} step for {self.target} ({self.num_devices} x {self.device_kind}), "
                f"mesh {mesh}")
        if self.what == "train":
            shape = (f"batch {self.batch_size} x {self.seq_len} "
                     f"({self.tokens_per_device:,.0f} tokens per device)")
        else:
            shape = (f"batch {self.batch_size}, cache {self.seq_len} tokens "
                     f"({self.tokens_per_device:g} sequences per device)")
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        verdict = "fits" if self.fits else "DOES NOT FIT"
        hbm_verdict = "DOES NOT FIT" if "HBM" in self.limit_exceeded else "fits"
        lines = [head, shape]
        if self.out_of_memory:
            lines.append(f"per device: the compiler ran out of memory: needs "
                         f"{g(self.per_device_bytes)} of {g(self.hbm_capacity_bytes)} -> {verdict}")
            lines.append(f"  {self.out_of_memory.splitlines()[0][:300]}")
        else:
            lines.append(
                f"per device: state {g(self.state_bytes)} | arguments {g(self.argument_bytes)}"
                f" | temporaries {g(self.temp_bytes)} | peak {g(self.per_device_bytes)} of "
                f"{g(self.hbm_capacity_bytes)} HBM "
                f"({100 * self.per_device_bytes / self.hbm_capacity_bytes:.1f}%)"
                f" -> {hbm_verdict}")
            if self.host_bytes or self.host_ram_bytes:
                ram = f" of {g(self.host_ram_bytes)} host RAM" if self.host_ram_bytes else ""
                lines.append(f"host memory per device: {g(self.host_bytes)}{ram}")
            if not self.fits:
                lines.append(f"DOES NOT FIT: exceeds {self.limit_exceeded}")
        lines.append(f"compile: {self.compile_s:.1f} s")
        if self.collectives:
            lines.append("collectives per step, per device (GiB received over links; the "
                         "full arrays' GiB):")
            lines.append(f"  {'kind':<20}{'ops':>6}{'runs':>8}{'GiB':>10}{'arrays':>10}")
            for kind, row in self.collectives.items():
                if row["ops"]:
                    lines.append(f"  {kind:<20}{row['ops']:>6}{row['count']:>8}"
                                 f"{row['bytes'] / GIB:>10.3f}{row['array_bytes'] / GIB:>10.3f}")
        if self.dcn_collectives:
            lines.append("across slices (DCN), per step, per device:")
            for kind, row in self.dcn_collectives.items():
                lines.append(f"  {kind:<20}{row['ops']:>6}{row['count']:>8}"
                             f"{row['bytes'] / GIB:>10.3f}")
        lines.append(f"model FLOPs per step: {self.model_flops_per_step:.3e} "
                     f"({self.model_flops_per_step / self.num_devices:.3e} per device)")
        lines.append("MoE: dropless (no token can be dropped)" if self.dropless else
                     "MoE: tokens past an expert shard's capacity are DROPPED")
        if self.hbm_traffic_bytes is not None:
            once = ("" if self.compiler_bytes_accessed_once is None else
                    f"; the compiler's count, loop bodies once: "
                    f"{g(self.compiler_bytes_accessed_once)}")
            lines.append(f"HBM traffic per step, per device (lower bound): "
                         f"{g(self.hbm_traffic_bytes)}{once}")
            if self.kernel_bytes:
                lines.append(f"  left out: the Pallas kernels' operands and results, "
                             f"{g(self.kernel_bytes)} once each")
        if self.estimate:
            lines.extend(roofline.Estimate(**{k: v for k, v in self.estimate.items()
                                              if k != "kind"}).text())
        return "\n".join(lines)


def _state_bytes(spec_tree) -> int:
    """Bytes per device of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(spec_tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def out_of_memory(error: Exception) -> tuple[int, int, str] | None:
    """(required bytes, available bytes, memory space) of a compiler RESOURCE_EXHAUSTED error;
    None for any other error."""
    msg = str(error)
    if "RESOURCE_EXHAUSTED" not in msg:
        return None
    m = _USED_OF.search(msg)
    if m:
        return _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4)), m.group(5)
    m = _EXCEEDS.search(msg)
    if m:
        return _bytes(*m.group(1, 2)), _bytes(*m.group(4, 5)), m.group(3).lower()
    m = _AND_LIMIT.search(msg)
    if m:
        return _bytes(*m.group(1, 2)), _bytes(*m.group(3, 4)), "vmem"
    return 0, 0, "unknown"


def _compile(lowerable, args, report: Report):
    """Lowers and compiles; fills the memory, time and collectives of `report`."""
    t0 = time.perf_counter()
    try:
        compiled = lowerable.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - only an out-of-memory is a result
        oom = out_of_memory(e)
        if oom is None:
            raise
        report.compile_s = time.perf_counter() - t0
        report.fits = False
        report.limit_exceeded = "HBM" if oom[2] == "hbm" else oom[2]
        report.per_device_bytes = oom[0]
        if oom[2] != "hbm" and oom[1]:
            report.out_of_memory = f"{oom[2]}: {oom[1]} bytes available. " + str(e)
        else:
            report.hbm_capacity_bytes = oom[1] or report.hbm_capacity_bytes
            report.out_of_memory = str(e)
        return None
    report.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    report.argument_bytes = mem.argument_size_in_bytes
    report.output_bytes = mem.output_size_in_bytes
    report.alias_bytes = mem.alias_size_in_bytes
    report.temp_bytes = mem.temp_size_in_bytes
    # What the executable holds at once: its arguments, the outputs not aliased to (donated)
    # arguments, and the temporaries block, allocated whole. XLA's heap-simulated peak can be
    # lower than that sum (it does not count the block's fragmentation); take the larger.
    held = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    report.per_device_bytes = max(held, getattr(mem, "peak_memory_in_bytes", 0) or 0)
    report.host_bytes = (mem.host_argument_size_in_bytes + mem.host_output_size_in_bytes
                         - mem.host_alias_size_in_bytes + mem.host_temp_size_in_bytes)
    check_fits(report)
    bound = hlo_bound.measure(compiled.as_text(), chip=roofline.chip(report.device_kind),
                              flops_per_device=report.model_flops_per_step / report.num_devices,
                              host_bytes=report.host_bytes)
    report.collectives, report.dcn_collectives = bound.collectives, bound.dcn_collectives
    report.ici_bytes, report.dcn_bytes = bound.ici_bytes, bound.dcn_bytes
    report.hbm_traffic_bytes, report.kernel_bytes = bound.hbm_traffic_bytes, bound.kernel_bytes
    report.compiler_bytes_accessed_once = compiler_bytes_accessed(compiled)
    report.estimate = bound.estimate
    return compiled


def compiler_bytes_accessed(compiled) -> float | None:
    """The compiler's own "bytes accessed" of an executable (a loop body counted once); None
    where it has no cost analysis (GPU)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None


def check_fits(report: Report) -> None:
    """Sets `fits` and `limit_exceeded` from the report's per-device bytes: the compiler's peak
    against HBM, and the host memory of the devices on one host against that host's RAM."""
    row = roofline.chip(report.device_kind)
    report.host_ram_bytes = int(row.host_ram_per_device) if row else 0
    exceeded = []
    if report.per_device_bytes > report.hbm_capacity_bytes:
        exceeded.append("HBM")
    on_host = min(report.num_devices, row.devices_per_host) if row else 0
    if row and report.host_bytes * on_host > row.host_ram_bytes:
        exceeded.append("host RAM")
    report.fits, report.limit_exceeded = not exceeded, " and ".join(exceeded)


def _new_report(what, target, mesh, batch_size, seq_len) -> Report:
    device = mesh.devices.flat[0]
    return Report(what=what, target=target, mesh=dict(mesh.shape), device_kind=device.device_kind,
                  num_devices=mesh.size, batch_size=batch_size, seq_len=seq_len, fits=False,
                  per_device_bytes=0, hbm_capacity_bytes=targets.hbm_bytes(device))


def compile_train(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                  target: str = "") -> tuple[Report, object]:
    """Compiles `config`'s train step for `devices`. Returns (report, compiled executable or
    None when the compiler ran out of memory)."""
    t = config.train
    with trainer.run_mesh(config, devices) as (cfg, mesh):
        config_lib.check_batch(config, sharding.data_parallel_size(mesh), 1)
        built = trainer.build(config, mesh)
        state = built.state_spec()
        batch = built.batch_spec(t.batch_size, t.seq_len)
        report = _new_report("train", target, mesh, t.batch_size, t.seq_len)
        report.state_bytes = _state_bytes(state)
        report.dropless = moe_parallel.is_dropless(cfg, sharding.mesh_axis_size("expert", mesh),
                                                   mesh.devices.flat[0].platform)
        report.model_flops_per_step = (mla_moe.flops_per_token(cfg, t.seq_len)
                                       * t.batch_size * t.seq_len)
        fault_step = jax.ShapeDtypeStruct((), jnp.int32)
        compiled = _compile(built.step_fn, (state, batch, fault_step), report)
    return report, compiled


def decode_flops_per_token(cfg: ModelConfig, cache_length: int) -> float:
    """Forward FLOPs of one decoded token: 2 x matmul parameters, plus absorbed attention over
    a full cache (scores over C + R and values over C, per head and layer)."""
    attention = 2 * cache_length * cfg.num_attention_heads * (
        2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return 2.0 * counting.matmul_params_per_token(cfg) + attention * cfg.num_hidden_layers


def compile_decode(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                   cache_length: int = 0, batch: int = 0,
                   target: str = "") -> tuple[Report, object]:
    """Compiles one absorbed decode step (one new token per sequence, weights in the compute
    dtype, the latent cache at `cache_length`, default `max_position_embeddings`) for
    `devices`. batch: sequences (default: one per batch shard). Returns (report, compiled)."""
    with trainer.run_mesh(config, devices) as (cfg, mesh):
        cfg = cfg.replace(param_dtype=cfg.dtype)  # served weights: bf16, no optimizer
        cache_length = cache_length or cfg.max_position_embeddings
        batch = batch or sharding.data_parallel_size(mesh)
        model = sharding.abstract_model(lambda: mla_moe.DeepSeekModel(cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(model)
        state_sh = sharding.state_shardings(abstract_state, mesh)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract_state, state_sh)
        cache = jax.eval_shape(lambda: init_cache(cfg, batch, cache_length))
        cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             cache, sharding.cache_shardings(cache, mesh))
        tokens_sh = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
            ("batch", None), (batch, 1), mesh, strict=False))
        tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tokens_sh)
        report = _new_report("decode", target, mesh, batch, cache_length)
        report.state_bytes = _state_bytes(state)
        report.dropless = moe_parallel.is_dropless(cfg, sharding.mesh_axis_size("expert", mesh),
                                                   mesh.devices.flat[0].platform)
        report.model_flops_per_step = decode_flops_per_token(cfg, cache_length) * batch
        step = _DecodeStep(graphdef)
        compiled = _compile(step, (state, tokens, cache), report)
    return report, compiled


@dataclasses.dataclass(frozen=True)
class _DecodeStep:
    """`decode_step` with the model's graphdef bound, lowerable like a jitted function."""

    graphdef: object

    def lower(self, state, tokens_BT, cache):
        return decode_step.lower(self.graphdef, state, tokens_BT, cache, form="absorbed")


def save(compiled: jax.stages.Compiled, path: str) -> None:
    """Serializes a compiled executable (with its argument trees) to `path`."""
    import pickle

    from jax.experimental import serialize_executable

    payload = serialize_executable.serialize(compiled)
    with open(path, "wb") as f:
        pickle.dump(payload, f)
