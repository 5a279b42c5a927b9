"""Training metrics: the stdout progress line, `metrics.jsonl`, TensorBoard, and MFU.

MFU = model FLOPs per step / step time / (peak FLOP/s per device x devices), with model FLOPs
from `mla_moe.flops_per_token` (6 x active matmul params + causal attention, per token). The
peak of a known accelerator is its chip's published dense bf16 figure (`pallas_kernels.chips`)
over the devices jax makes of the chip (two on TPU7x, one per die); on CPU (and unknown devices)
it is a large float32 matmul timed once on this machine.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mla_moe import paths
from pallas_kernels import chips


def measure_matmul_flops(n: int = 1024, repeats: int = 5,
                         dtype: jnp.dtype = jnp.float32) -> float:
    """FLOP/s of an n x n x n matmul on the default device (median of `repeats`)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def peak_flops_per_device(override_tflops: float = 0.0,
                          device: jax.Device | None = None) -> tuple[float, str]:
    """(FLOP/s, where the figure came from) for `device` (the run's: `mesh.devices.flat[0]`;
    default this host's first device). Only a device that can run is timed; the peak of a
    compile-only device of an unknown kind is an error rather than this host's matmul."""
    if override_tflops and override_tflops > 0:
        return override_tflops * 1e12, "config"
    device = jax.devices()[0] if device is None else device
    kind = device.device_kind
    row = chips.by_device_kind(kind, family=True)
    if row is not None:
        n = _devices_per_chip(device, row)
        return row.chip_peak_flops / n, f"{kind} spec" + (f", 1/{n} of a chip" if n > 1 else "")
    if device not in jax.devices():
        raise ValueError(f"no peak FLOP/s known for {kind!r}; set log.peak_tflops")
    return measure_matmul_flops(), f"measured f32 matmul on {kind}"


def _devices_per_chip(device: jax.Device, row: chips.Chip) -> int:
    """How many devices jax makes of `device`'s chip: one per TensorCore where each is its own
    device (TPU7x; v4 compiled for a topology), one where the chip's cores run as one (a v4 or
    v5p that runs: megacore) and on GPUs. Read from the TensorCore index of the devices of
    `device`'s client; the table's compile-only count for a device without one."""
    if getattr(device, "core_on_chip", None) is None:
        return row.devices_per_chip
    try:
        peers = device.client.devices()
    except AttributeError:
        return row.devices_per_chip
    return 1 + max(d.core_on_chip for d in peers)


def _scalars(metrics: dict) -> dict[str, float]:
    """Expands per-layer vectors into `name/i` scalars."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = a.item() if a.dtype != np.bool_ else bool(a)
        else:
            for i, x in enumerate(a.reshape(-1)):
                out[f"{k}/{i}"] = x.item()
    return out


class MetricWriter:
    """Writes logged steps to metrics.jsonl and the workdir's TensorBoard events file
    (`events.EventsFile`); only process 0 writes (`enabled`). Each row carries `time`, the
    wall-clock time it was written (Unix seconds)."""

    def __init__(self, workdir, enabled: bool, tensorboard: bool = True):
        workdir = paths.resolve(workdir)  # local or gs://
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from mla_moe.train.events import EventsFile

                self._tb = EventsFile(workdir / "tensorboard")
            except ImportError:  # optional dependency
                print("tensorboardX not installed: no TensorBoard events", file=sys.stderr)

    def steps(self) -> list[int]:
        """The steps of the rows in metrics.jsonl (of this process's writer; [] elsewhere)."""
        if not self.enabled or not self.path.exists():
            return []
        out = []
        for ln in self.path.read_text().splitlines():
            try:
                out.append(int(json.loads(ln)["step"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by a hard kill
        return out

    def truncate_after(self, step: int) -> None:
        """Drops records past `step` (written by a run stopped before it saved them), from
        metrics.jsonl and the TensorBoard events."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.truncate_after(step)
        if not self.path.exists():
            return
        lines = [ln + "\n" for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= step:
                    kept.append(ln)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a hard kill
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def write(self, step: int, metrics: dict) -> dict:
        """Appends the scalars of `metrics` at `step` to metrics.jsonl (and TensorBoard) on the
        writing process; returns the record either way."""
        now = time.time()
        record = {"step": int(step), "time": round(now, 3), **_scalars(metrics)}
        if not self.enabled:
            return record
        line = json.dumps(record) + "\n"
        if paths.is_url(self.path):  # object stores have no append: rewrite the object
            before = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(before + line)
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            scalars = {k: v for k, v in record.items() if k not in ("step", "time")}
            self._tb.write(step, scalars, now)
        return record

    def close(self) -> None:
        """Nothing to release: every write is complete when it returns."""


def duration(seconds: float) -> str:
    """`seconds` as the console shows a duration: 42s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(record: dict, total_steps: int, elapsed_s: float | None = None,
                  eta_s: float | None = None) -> str:
    """The one-line console summary of a metrics record ("step 10/150 | loss ... | ..."),
    ending with the time since the run started and the estimated time to its last step."""
    parts = [f"step {record['step']:>6d}/{total_steps}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    parts += [
        f"ppl {record.get('ppl', float('nan')):.2f}",
        f"lr {record['lr']:.2e}",
        f"gnorm {record['grad_norm']:.3g}",
    ]
    if "indexer_loss" in record:  # V3.2 DSA training
        parts.append(f"indexer KL {record['indexer_loss']:.4f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        parts.append(f"{record['step_time_s'] * 1e3:.0f} ms/step")
    if "mfu" in record:
        parts.append(f"MFU {record['mfu'] * 100:.1f}%")
    if "aux_loss" in record:
        parts.append(f"aux {record['aux_loss']:.2e}")
    worst = worst_expert_load(record)
    if worst is not None:
        parts.append(f"expert load max/mean {worst[1]:.2f} (MoE layer {worst[0]})")
    if elapsed_s is not None:
        parts.append(f"{duration(elapsed_s)} elapsed")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return " | ".join(parts)


def worst_expert_load(record: dict) -> tuple[int, float] | None:
    """(MoE layer index, its busiest expert's tokens over the mean) for the least balanced
    layer of a logged record. 1.0 is perfect balance; E/K (4.0 for top-4 of 16 experts) means
    every token of the layer picks that expert. None without MoE layers."""
    ratios = []
    i = 0
    while f"expert_load_max/{i}" in record and f"expert_load_mean/{i}" in record:
        ratios.append(record[f"expert_load_max/{i}"] / max(record[f"expert_load_mean/{i}"], 1e-9))
        i += 1
    if not ratios:
        return None
    layer = int(np.argmax(ratios))
    return layer, ratios[layer]
