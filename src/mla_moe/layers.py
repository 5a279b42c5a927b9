"""Small building blocks: parameter creation with logical axes, RMSNorm, SwiGLU.

Legend, the one for the whole library (array names end in these letters, e.g. `x_BTD`), one
meaning per letter:

  B batch                         E experts (local ones inside an expert-parallel shard)
  T query length (tokens)         K experts per token (top-k)
  S key length / cache slots      G expert groups
  D model dim                     J groups kept per token (topk_group)
  N heads                         F ffn hidden
  H qk head dim without rope      X expert capacity (buffer rows per expert)
  R rope dim                      M token-expert assignments (T * K)
  A qk head dim with rope (H + R) P expert-parallel shards
  V value head dim                I MTP modules (depth)
  C kv latent rank                U vocabulary
  L latent cache width (C + R)    W a cache slot as stored (L values, or FP8's packed bytes)
  Q q latent rank                 Z FP8 scale blocks of a cache slot
  Y query rows of the latent kernel (T * N, all heads sharing one key stream)
  O pieces an axis is cut into (grouped-matmul blocks, key chunks, cache splits)

Inside a kernel, T and S are also the query and key lengths of one block, and 1 a kept unit
axis (`m_T1`). A lowercase letter is local to one module and defined in its docstring.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe.config import ModelConfig
from mla_moe.sharding.axes import gathered
from pallas_kernels.dispatch import target_platform


def dtype_of(name: str) -> jnp.dtype:
    """The jnp dtype named by a config string ("float32", "bfloat16", ...)."""
    return jnp.dtype(name)


def _fast_key(key: jax.Array) -> jax.Array:
    """The same stream of keys re-wrapped for XLA's RngBitGenerator: threefry's unrolled
    kernel costs seconds of compilation per weight shape on CPU, RBG a fraction of that."""
    data = jax.random.key_data(key).reshape(-1)
    return jax.random.wrap_key_data(jnp.concatenate([data, data[::-1] ^ 0x5BD1E995]),
                                    impl="rbg")


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    dtype: str,
    stddev: float | None = None,
    value: float | None = None,
) -> nnx.Param:
    """A parameter drawn from N(0, stddev) (or filled with `value`), tagged with logical axes.

    The logical axis names are mapped to mesh axes by the sharding rules; they are metadata
    only until a mesh is in use.
    """
    assert len(shape) == len(axes), (shape, axes)
    if value is not None:
        init = jnp.full(shape, value, dtype_of(dtype))
    else:
        init = stddev * jax.random.normal(_fast_key(rngs.params()), shape, dtype_of(dtype))
    return nnx.Param(init, out_sharding=axes, eager_sharding=False)


def weight(v: nnx.Variable, dtype) -> jax.Array:
    """Parameter `v` as the layer's products use it: cast to the compute `dtype`, then
    gathered over the mesh axes that only store it (`sharding.gathered`, by its logical
    names)."""
    names = v.get_metadata().get("out_sharding")
    w = v[...].astype(dtype)
    if not isinstance(names, (tuple, list)):
        return w
    # A layer of a stacked group is a slice of it: its names still start with "layers".
    return gathered(w, tuple(names)[len(names) - w.ndim:])


def dense(x: jax.Array, w: jax.Array, contract: int = 1, **dot_kwargs) -> jax.Array:
    """x [..., I...] times w [I..., O...] -> [..., O...], contracting the last `contract` axes
    of x with the first `contract` of w: `dense(x_BTD, w_DF)` is einsum 'BTD,DF->BTF' and
    `dense(o_BTNV, w_NVD, 2)` is 'BTNV,NVD->BTD'.

    The token axes of x are merged into one, so that the weight gradient contracts a single
    axis: with the two axes B and T, XLA:CPU's dot canonicalisation copied a transposed
    [B*T, O] operand, the largest copies of the CPU train step (bench/profile_cpu.py). On CPU
    the product is one [tokens, I] x [I, O] matrix product (merging minor axes is free in
    row-major layouts; with several output axes, jax's gradient would again transpose an
    activation). On TPU and GPU only the major token axes are merged: merging minor axes
    such as N and H relayouts the tiled arrays there (a backend choice made only here)."""
    inner = w.shape[:contract]
    lead = x.shape[: x.ndim - contract]
    if x.shape[len(lead):] != inner:
        raise ValueError(f"dense: x {x.shape} does not end with w's leading {inner}")
    if target_platform() == "cpu":
        k = math.prod(inner)
        y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), **dot_kwargs)
    else:
        y = jnp.tensordot(x.reshape(-1, *inner), w, axes=contract, **dot_kwargs)
    return y.reshape(*lead, *w.shape[contract:])


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF-exact RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned [dim] scale (initialised to 1); see `rms_norm`."""

    def __init__(self, dim: int, eps: float, *, config: ModelConfig, rngs: nnx.Rngs,
                 axis: str = "norm"):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis,), dtype=config.param_dtype, value=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(self, hidden: int, *, config: ModelConfig, rngs: nnx.Rngs):
        d, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
        self.gate_DF = param(rngs, (d, hidden), ("embed", "mlp"), dtype=pd, stddev=std)
        self.up_DF = param(rngs, (d, hidden), ("embed", "mlp"), dtype=pd, stddev=std)
        self.down_FD = param(rngs, (hidden, d), ("mlp", "embed"), dtype=pd, stddev=std)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dt = x_BTD.dtype
        g_BTF = dense(x_BTD, weight(self.gate_DF, dt))
        u_BTF = dense(x_BTD, weight(self.up_DF, dt))
        return dense(jax.nn.silu(g_BTF) * u_BTF, weight(self.down_FD, dt))
