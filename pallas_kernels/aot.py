"""Compile the kernels for a TPU or GPU target from any host, and read what they need on chip.

`compile_mla_attention` / `compile_latent_attention` / `compile_sparse_latent_attention`
compile forward + backward (training) or the (dense or sparse) decode step for a target of
`pallas_kernels.targets` at given shapes (bf16, DeepSeek head dims by default), with the mesh
of the target's first device in effect, so `implementation="auto"` picks the target's
kernel exactly as a model would. Nothing runs.

What each kernel needs on chip:
  TPU  `tpu_vmem_bytes(compiled)`: the scoped VMEM that Mosaic assigned to each kernel, from
       the compiled HLO's `scoped_memory_configs`.
  GPU  the shared memory of each Triton kernel, which XLA:GPU logs (without the kernel's
       name) when its `xtile_compiler` module logs at level 2: `gpu_compile_log` runs each
       compile in a subprocess with that logging on and parses the sizes.
Limits, from the chip table (`pallas_kernels.chips`): `vmem_limit_bytes(device_kind)` (the
compiler's scoped default) and `shared_memory_limit_bytes(chip)` (the per-block opt-in maximum
of the target config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import chips, targets
from pallas_kernels.latent_attention import latent_attention_cache
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.sparse_latent_attention import BlockSizes as SparseBlockSizes
from pallas_kernels.sparse_latent_attention import sparse_latent_attention_cache
from pallas_kernels.sparse_latent_attention_tpu import cache_layout as sparse_cache_layout

MLA_DIMS = dict(h=128, r=64, v=128)  # DeepSeek-V2/V3 head dims
LATENT_DIMS = dict(n=128, c=512, r=64)  # DeepSeek-V3: 128 heads over a 512 + 64 latent
SPARSE_TOPK = 2048  # DeepSeek-V3.2's index_topk


def vmem_limit_bytes(device_kind: str) -> int:
    """XLA:TPU's default scoped VMEM limit per kernel for a device kind ("TPU v5", ...), from
    the chip table."""
    row = chips.by_device_kind(device_kind)
    if row is None or row.scoped_vmem_bytes is None:
        raise KeyError(f"no scoped VMEM limit known for device kind {device_kind!r}")
    return row.scoped_vmem_bytes


def shared_memory_limit_bytes(chip: str) -> int:
    """The opt-in shared memory per block of a GPU target ("h100", ...), from the chip table
    (its target config's `shared_memory_per_block_optin`)."""
    row = chips.by_target(chip)
    if row is None or row.shared_memory_per_block is None:
        raise KeyError(f"no shared memory per block known for GPU target {chip!r}")
    return row.shared_memory_per_block


def _one_device_mesh(target):
    device = targets.devices(target)[0]
    return jax.sharding.Mesh(np.array([device]), ("x",))


def _compile(target, fn, shapes):
    mesh = _one_device_mesh(target)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=replicated) for shape, dtype in shapes]
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


def compile_mla_attention(target: str, *, b: int, t: int, n: int, segments: bool = False,
                          dtype: jnp.dtype = jnp.bfloat16, h: int = MLA_DIMS["h"],
                          r: int = MLA_DIMS["r"], v: int = MLA_DIMS["v"]) -> jax.stages.Compiled:
    """Forward + backward of causal `mla_attention` (T = S) compiled for `target`."""

    def fwd_bwd(q_nope, q_pe, k_nope, k_pe, v_, seg):
        def attend(*a):
            return mla_attention(*a, sm_scale=0.1, causal=True,
                                 segment_ids=seg if segments else None)

        out, vjp = jax.vjp(attend, q_nope, q_pe, k_nope, k_pe, v_)
        return out, vjp(out)

    return _compile(target, fwd_bwd, [((b, t, n, h), dtype), ((b, t, n, r), dtype),
                                      ((b, t, n, h), dtype), ((b, t, r), dtype),
                                      ((b, t, n, v), dtype), ((b, t), jnp.int32)])


def compile_latent_attention(target: str, *, b: int, t: int, s: int,
                             dtype: jnp.dtype = jnp.bfloat16, n: int = LATENT_DIMS["n"],
                             c: int = LATENT_DIMS["c"],
                             r: int = LATENT_DIMS["r"]) -> jax.stages.Compiled:
    """One absorbed decode step (`latent_attention_cache`: T queries over the model's packed
    [B, S, C + R] cache) for `target`."""

    def decode(q_latent, q_pe, cache, lengths):
        return latent_attention_cache(q_latent, q_pe, cache, lengths_B=lengths, sm_scale=0.1)

    return _compile(target, decode, [((b, t, n, c), dtype), ((b, t, n, r), dtype),
                                     ((b, s, c + r), dtype), ((b,), jnp.int32)])


def compile_sparse_latent_attention(target: str, *, b: int, t: int, s: int,
                                    k: int = SPARSE_TOPK, dtype: jnp.dtype = jnp.bfloat16,
                                    n: int = LATENT_DIMS["n"], c: int = LATENT_DIMS["c"],
                                    r: int = LATENT_DIMS["r"],
                                    vmem_limit_bytes: int | None = None) -> jax.stages.Compiled:
    """One sparse decode step (`sparse_latent_attention_cache`: T queries, K slots each, over
    the packed [B, S, C + R] cache) for `target`. On TPU the cache argument is held in the
    kernel's `cache_layout`, as a model keeping its cache that way would pass it (in XLA's
    default layout it would be relaid out first); `vmem_limit_bytes` sets Mosaic's scoped
    limit (TPU7x reports the whole limit as the kernel's VMEM, so compiling under a lower one
    is how to bound what it needs)."""
    mesh = _one_device_mesh(target)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    block_sizes = None
    cache_format = replicated
    if target.startswith("tpu"):
        from jax.experimental.layout import Format

        cache_format = Format(sparse_cache_layout(dtype), replicated)
        if vmem_limit_bytes is not None:
            kind = mesh.devices.flat[0].device_kind
            block_sizes = dataclasses.replace(SparseBlockSizes.get_default("tpu", kind),
                                              vmem_limit_bytes=vmem_limit_bytes)

    def decode(q_latent, q_pe, cache, indices):
        return sparse_latent_attention_cache(q_latent, q_pe, cache, indices, sm_scale=0.1,
                                             block_sizes=block_sizes)

    args = [jax.ShapeDtypeStruct(shape, dt, sharding=replicated)
            for shape, dt in [((b, t, n, c), dtype), ((b, t, n, r), dtype),
                              ((b, s, c + r), dtype), ((b, t, k), jnp.int32)]]
    with jax.set_mesh(mesh):
        return jax.jit(decode, in_shardings=(replicated, replicated, cache_format, replicated)
                       ).lower(*args).compile()


def tpu_vmem_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
    """{kernel name: scoped VMEM bytes} of the Mosaic kernels in a compiled TPU program.

    Read from each kernel's `used_scoped_memory_configs` (what Mosaic allocated), not its
    `scoped_memory_configs`: on TPU7x the latter holds the whole scoped limit (32 MiB) for
    every kernel (libtpu 0.0.42 and 0.0.50; empty on v4-v6e)."""
    out = {}
    for line in compiled.as_text().splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name = re.search(r"%([\w.-]+) = ", line).group(1).split(".")[0]
        used = re.search(r'used_scoped_memory_configs\\?":\[([^\]]*)\]', line)
        sizes = [int(x) for x in re.findall(r'"size\\?":\\?"(\d+)',
                                            used.group(1) if used else line)]
        out[name] = max(out.get(name, 0), *sizes, 0)
    return out


def gpu_shared_memory_bytes(log: str) -> list[int]:
    """Shared memory bytes of each Triton kernel compiled, from a compile log (in the order
    the compiler's threads finished them; see `gpu_compile_log`)."""
    return [int(x) for x in re.findall(r"Shared memory usage: (\d+) B", log)]


def gpu_compile_log(calls: list[dict]) -> list[dict]:
    """Compiles each call for a GPU in a fresh process with XLA:GPU's kernel log on.

    calls: dicts of `run_call`'s arguments (kind "mla", "latent" or "sparse", target, shape
      kwargs).
    Returns, per call, {"ok": bool, "error": str, "shared_memory": [bytes per kernel]}.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0",
               TF_CPP_VMODULE="xtile_compiler=2")
    results = []
    for call in calls:
        proc = subprocess.run([sys.executable, "-m", "pallas_kernels.aot", json.dumps(call)],
                              env=env, capture_output=True, text=True, check=False)
        tail = proc.stdout.strip().splitlines()
        status = json.loads(tail[-1]) if tail else {"ok": False, "error": proc.stderr[-2000:]}
        status["shared_memory"] = gpu_shared_memory_bytes(proc.stderr)
        results.append(status)
    return results


def run_call(kind: str, target: str, **shape: int) -> dict:
    """Compiles one kernel call; a compiler rejection is a result ({"ok": False, ...})."""
    compile_fn = {"mla": compile_mla_attention, "latent": compile_latent_attention,
                  "sparse": compile_sparse_latent_attention}[kind]
    try:
        compiled = compile_fn(target, **shape)
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is what is reported
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    memory = compiled.memory_analysis()
    out = {"ok": True, "error": "", "argument_bytes": memory.argument_size_in_bytes,
           "temp_bytes": memory.temp_size_in_bytes}
    if target.startswith("tpu"):
        out["vmem"] = tpu_vmem_bytes(compiled)
    return out


if __name__ == "__main__":  # one compile per process: `gpu_compile_log` reads its log
    print(json.dumps(run_call(**json.loads(sys.argv[1]))))
