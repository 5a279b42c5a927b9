"""Backend selection shared by the Pallas kernels.

`implementation` accepted by every public kernel entry point:

  None / "auto"   "tpu" when compiling for TPU, "gpu" for a GPU (CUDA or ROCm) when this jax
                  still ships Pallas' Triton backend, otherwise "xla". The platform is that
                  of the mesh in effect (`jax.set_mesh`, also an abstract mesh of compile-only
                  devices), else `jax.default_backend()`: see `target_platform`.
  "xla"           the chunked pure-jnp reference (`*_reference`), no Pallas.
  "gpu"           the portable kernels lowered through Triton (triton.CompilerParams).
  "tpu"           the TPU kernels (Mosaic): K/V streamed along a grid axis, VMEM scratch.
  "interpret"     the GPU-layout kernel run by Pallas' generic interpreter (`interpret=True`).
  "tpu_interpret" the TPU-layout kernel run by the TPU interpreter (`pltpu.InterpretParams`),
                  which also simulates SMEM/VMEM placement.

Two kernel families share their masking and block arithmetic:
  portable (GPU, "interpret"): one program per query block loops over K/V with
    `lax.fori_loop`; no scratch, no backend primitives (`mla_attention_kernels.py`, the
    portable body in `latent_attention.py`).
  TPU ("tpu", "tpu_interpret"): K/V walk the innermost grid axis, the softmax statistics and
    accumulators live in VMEM scratch, so VMEM does not grow with the sequence
    (`mla_attention_tpu.py`, `latent_attention_tpu.py`).
Block sizes are chosen per device kind (`per_device`) from `target_device_kind()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "gpu", "tpu", "interpret", "tpu_interpret")

try:  # Triton lowering of Pallas; jax 0.11 deprecates it but still ships it.
    from jax.experimental.pallas import triton as _pl_triton
except ImportError:  # pragma: no cover - depends on the jax build
    _pl_triton = None

try:
    from jax.experimental.pallas import tpu as _pltpu
except ImportError:  # pragma: no cover - depends on the jax build
    _pltpu = None


@dataclasses.dataclass(frozen=True)
class KernelBackend:
    """How the kernels are laid out for one implementation.

    Attributes:
      name: one of "gpu", "tpu", "interpret", "tpu_interpret".
      head_major: the TPU kernels; per-head operands are transposed to [B, N, T, *] so that a
        block's two minor dims are (rows, head_dim), which Mosaic TPU tiles as (sublane, lane).
        The portable kernels keep [B, T, N, *] and squeeze N in the BlockSpec (a strided load,
        no copy).
      pow2_tiles: Triton needs every loaded tile dim to be a power of two (>= 16 for dots), so
        head dims are zero-padded up to one when they are not.
    """

    name: str

    @property
    def head_major(self) -> bool:
        """Whether the kernels take heads before tokens ([B, N, T, .]): the TPU kernels do."""
        return self.name in ("tpu", "tpu_interpret")

    @property
    def pow2_tiles(self) -> bool:
        """Whether tiles must be powers of two (Triton on GPU)."""
        return self.name == "gpu"

    def interpret(self) -> Any:
        """The `interpret` argument of `pallas_call` for this backend (False when compiled)."""
        if self.name == "interpret":
            return True
        if self.name == "tpu_interpret":
            return _require(_pltpu, "tpu").InterpretParams()
        return False

    def compiler_params(self, *, num_warps: int = 4, num_stages: int = 2) -> Any:
        """Triton's launch parameters for the portable kernels on GPU; None elsewhere."""
        if self.name == "gpu":
            return _require(_pl_triton, "gpu").CompilerParams(
                num_warps=num_warps, num_stages=num_stages
            )
        return None


def _require(module, name):
    if module is None:
        raise RuntimeError(f"implementation={name!r} needs a jax build with its Pallas backend")
    return module


def _target_device():
    """The abstract device of the mesh in effect, or None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not mesh.shape:
        return None
    return getattr(mesh, "abstract_device", None)


def target_platform() -> str:
    """The platform the program being traced is compiled for: "tpu", "gpu" or "cpu".

    Read from the devices of the mesh in effect (so a CPU host compiling ahead of time for a
    TPU or GPU mesh builds the TPU or GPU program), else from `jax.default_backend()`."""
    device = _target_device()
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def target_device_kind() -> str:
    """`device_kind` of the devices compiled for ("TPU v5", "NVIDIA H100 80GB HBM3", ...)."""
    device = _target_device()
    return device.device_kind if device is not None else jax.devices()[0].device_kind


def resolve(implementation: str | None) -> str:
    """Maps None/"auto" to a concrete implementation name and validates the rest."""
    if implementation in (None, "auto"):
        backend = target_platform()
        if backend == "tpu":
            return "tpu"
        if backend == "gpu" and _pl_triton is not None:
            return "gpu"
        return "xla"  # CPU, or a jax without Pallas' Triton backend
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}; expected None, 'auto' or one of {IMPLEMENTATIONS}"
        )
    return implementation


def per_device(table: dict[str, Any], device_kind: str | None) -> Any:
    """The entry of `table` for the longest key that starts `device_kind` ("TPU v5 lite",
    "NVIDIA H100 80GB HBM3"); the "" entry is the default."""
    kind = device_kind or ""
    return table[max((k for k in table if kind.startswith(k)), key=len)]


def default_blocks(implementation: str | None, device_kind: str | None,
                   tpu_blocks: dict[str, Any], gpu_blocks: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """A kernel's `BlockSizes` fields for an implementation: its `tpu_blocks` / `gpu_blocks`
    entry (`per_device`) for the device compiled for (`device_kind`; None: the target's), {}
    (the dataclass defaults) for the other implementations."""
    impl = resolve(implementation)
    table = (tpu_blocks if impl in ("tpu", "tpu_interpret")
             else gpu_blocks if impl == "gpu" else None)
    if table is None:
        return {}
    if impl in ("tpu", "gpu") and device_kind is None:
        device_kind = target_device_kind()
    return per_device(table, device_kind)


def check_block_sizes(blocks: Any) -> None:
    """Validates a kernel's `BlockSizes` dataclass: every field a positive int (a field whose
    default is None may also be None), every `block_*` field a multiple of 8."""
    for field in dataclasses.fields(blocks):
        value = getattr(blocks, field.name)
        optional = field.default is None
        if value is None and optional:
            continue
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"BlockSizes.{field.name}={value!r} must be "
                             f"{'None or ' if optional else ''}a positive int")
        if field.name.startswith("block_") and value % 8:
            raise ValueError(f"BlockSizes.{field.name}={value} must be a multiple of 8")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def fit_block(block: int, n: int) -> int:
    """Shrinks a block that would overrun a short sequence; keeps it a power of two >= 16
    (or the original block when smaller), so padding stays below 2x and Triton tiles stay
    valid."""
    return min(block, max(16, next_pow2(n)))


def check_named_shapes(**arrays: jax.Array) -> None:
    """Checks arrays whose names end in their dims (`k_pe_BSR`): each has as many dims as
    letters, and a letter has one size everywhere. Errors name both arrays and the dim."""
    seen: dict[str, tuple[int, str]] = {}
    for name, x in arrays.items():
        letters = name.rsplit("_", 1)[1]
        if x.ndim != len(letters):
            raise ValueError(f"{name} must have {len(letters)} dims [{','.join(letters)}], "
                             f"got shape {x.shape}")
        for letter, size in zip(letters, x.shape):
            want, first = seen.setdefault(letter, (size, name))
            if size != want:
                raise ValueError(f"{name} has {letter}={size} but {first} has {letter}={want}")


def kernel_dot(a: jax.Array, b: jax.Array, dimension_numbers: Any) -> jax.Array:
    """`lax.dot_general` with f32 accumulation for kernel bodies. Narrow (bf16) operands get
    the default precision explicitly: a process-wide `jax_default_matmul_precision="highest"`
    would otherwise ask Mosaic for an fp32 contraction of bf16 operands, which it rejects."""
    from jax import lax

    precision = None if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dimension_numbers, precision=precision,
                           preferred_element_type=jnp.float32)


def online_softmax_step(
    m_T1: jax.Array, l_T1: jax.Array, s_TS: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One KV chunk of an online softmax over the last axis: returns (m_new, alpha, p, l_new)
    where the running accumulator is rescaled by alpha and p are the chunk's unnormalised
    probabilities. Rows that have seen only -inf keep m = -inf and contribute nothing.
    m, l: [..., T, 1]; s: [..., T, S], the chunk's S keys (T: any query rows, e.g. B N T or Y)."""
    m_new = jnp.maximum(m_T1, jnp.max(s_TS, axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_T1 - m_safe)
    p_TS = jnp.exp(s_TS - m_safe)
    return m_new, alpha, p_TS, alpha * l_T1 + jnp.sum(p_TS, axis=-1, keepdims=True)
