"""Multi-head Latent Attention (DeepSeek-V2/V3), naive and absorbed forms behind one module.

Legend: see layers.py. Weight layout ([in, ..., out], einsum-ready):
  wq_DNA or (wq_a_DQ, q_norm, wq_b_QNA)   A = H + R (nope first, then rope, per head)
  wkv_a_DK  K = C + R (latent first, then the shared rope key)
  wk_b_CNH, wv_b_CNV (the two halves of HF's kv_b_proj), wo_NVD
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe import attention as attn
from mla_moe import fp8_cache, sharding
from mla_moe.config import ModelConfig
from mla_moe.layers import RMSNorm, dense, param, rms_norm
from mla_moe.rope import apply_rope, softmax_scale
from mla_moe.sharding import constrain
from pallas_kernels.dispatch import target_platform

# The q/kv latent norms use a hard-coded eps in the reference and in HF.
LATENT_NORM_EPS = 1e-6


def _kernel_implementation(config: ModelConfig) -> str | None:
    """The `implementation` to pass to pallas_kernels, or None to use the XLA path here."""
    impl = config.attention_impl
    if impl == "auto":
        return "auto" if target_platform() in ("tpu", "gpu") else None
    return {"pallas": "auto", "interpret": "interpret", "tpu_interpret": "tpu_interpret"}.get(impl)


def _on_shards(fn, args, arg_names, out_names):
    """`fn(*args)` per shard of the mesh in effect (`jax.shard_map`), or directly without one.

    Pallas kernels cannot be partitioned by the compiler (Mosaic refuses outright). Each
    argument is split by its logical names, e.g. ("batch", None, "act_heads", None): batch
    and heads over the axes the rules give them, everything else whole on every shard. The
    sequence dims are always whole, since attention needs every key. Mesh axes that carry
    neither see the kernel's inputs replicated."""
    mesh = sharding.active_mesh()
    if mesh is None:
        return fn(*args)
    in_specs = tuple(sharding.logical_to_spec(names, x.shape, mesh, strict=False)
                     for x, names in zip(args, arg_names, strict=True))
    out_spec = sharding.logical_to_spec(out_names, args[0].shape[:-1] + (1,), mesh,
                                        strict=False)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                         check_vma=False)(*args)


_HEADS = ("batch", None, "act_heads", None)  # [B, T, N, *] per-head kernel operands
_SHARED = ("batch", None, None)  # [B, S, *] one row per token for all heads


def _after(x, dep):
    """`x` unchanged, with a data dependency on `dep`: adds 0 x dep[0...0] with a NaN made 0,
    which is 0 for every value. It orders the in-place cache write after the attention has
    read the cache, so XLA does not copy the whole cache (an optimization_barrier does not
    give XLA that ordering)."""
    zero = jnp.nan_to_num(dep.reshape(-1)[0].astype(jnp.float32) * 0.0, nan=0.0)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x | zero.astype(x.dtype)
    return x + zero.astype(x.dtype)


class MLA(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        d, n, std, pd = c.hidden_size, c.num_attention_heads, c.initializer_range, c.param_dtype
        a = c.qk_head_dim
        if c.q_lora_rank is None:
            self.wq_DNA = param(rngs, (d, n, a), ("embed", "heads", "kv"), dtype=pd, stddev=std)
        else:
            q = c.q_lora_rank
            self.wq_a_DQ = param(rngs, (d, q), ("embed", "q_lora"), dtype=pd, stddev=std)
            self.q_norm = RMSNorm(q, LATENT_NORM_EPS, config=c, rngs=rngs, axis="q_lora")
            self.wq_b_QNA = param(rngs, (q, n, a), ("q_lora", "heads", "kv"), dtype=pd,
                                  stddev=std)
        k = c.kv_lora_rank + c.qk_rope_head_dim
        self.wkv_a_DK = param(rngs, (d, k), ("embed", "kv_lora"), dtype=pd, stddev=std)
        self.kv_norm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, config=c, rngs=rngs,
                               axis="kv_lora")
        self.wk_b_CNH = param(rngs, (c.kv_lora_rank, n, c.qk_nope_head_dim),
                              ("kv_lora", "heads", "kv"), dtype=pd, stddev=std)
        self.wv_b_CNV = param(rngs, (c.kv_lora_rank, n, c.v_head_dim),
                              ("kv_lora", "heads", "kv"), dtype=pd, stddev=std)
        self.wo_NVD = param(rngs, (n, c.v_head_dim, d), ("heads", "kv", "embed"), dtype=pd,
                            stddev=std)

    # --- projections -------------------------------------------------------------------------
    def queries(self, x_BTD, positions_BT):
        c, dt = self.config, x_BTD.dtype
        if c.q_lora_rank is None:
            q_BTNA = dense(x_BTD, self.wq_DNA[...].astype(dt))
        else:
            cq_BTQ = self.q_norm(dense(x_BTD, self.wq_a_DQ[...].astype(dt)))
            q_BTNA = dense(cq_BTQ, self.wq_b_QNA[...].astype(dt))
        q_nope_BTNH = q_BTNA[..., : c.qk_nope_head_dim]
        q_pe_BTNR = apply_rope(q_BTNA[..., c.qk_nope_head_dim :], positions_BT, c)
        return q_nope_BTNH, q_pe_BTNR

    def latent(self, x_BTD, positions_BT):
        """The per-token cache entry [c_KV (normed); k_pe (roped)]: [B, T, C + R]."""
        c, dt = self.config, x_BTD.dtype
        kv_BTK = dense(x_BTD, self.wkv_a_DK[...].astype(dt))
        c_BTC = rms_norm(kv_BTK[..., : c.kv_lora_rank], self.kv_norm.weight[...], LATENT_NORM_EPS)
        k_pe_BTR = apply_rope(kv_BTK[..., c.kv_lora_rank :], positions_BT, c)
        return jnp.concatenate([c_BTC, k_pe_BTR], axis=-1)

    # --- forward -----------------------------------------------------------------------------
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache_BSK: jax.Array | None = None,
        lengths_B: jax.Array | None = None,
        form: str | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Attention output [B, T, D] and the updated cache layer (or None).

        Without a cache: causal self-attention over the T tokens (index order), isolated per
        segment. With a cache ([B, S, C + R]) and `lengths_B`: the T tokens are written at
        slots lengths_B + t (in place) and attend to every slot <= their own.
        """
        c = self.config
        dt = x_BTD.dtype
        scale = softmax_scale(c)
        q_nope_BTNH, q_pe_BTNR = self.queries(x_BTD, positions_BT)
        latent_BTK = self.latent(x_BTD, positions_BT)
        b, t = x_BTD.shape[:2]
        kernel = _kernel_implementation(c)
        wk_b, wv_b = self.wk_b_CNH[...].astype(dt), self.wv_b_CNV[...].astype(dt)
        form = form or ("naive" if cache_BSK is None else c.decode_attention)
        # With a cache, the absorbed XLA path attends over the cache as it was plus the new
        # entries (as stored) and writes them after the attention: the whole-cache read then
        # neither waits for nor copies the updated cache. The other paths write first.
        write_after = cache_BSK is not None and form == "absorbed" and not kernel
        if cache_BSK is None:
            kv_BSK, mask_BTS = latent_BTK, attn.causal_segment_mask(segment_ids_BT, b, t)
            segments = [(kv_BSK, mask_BTS)]
        else:
            packed = cache_BSK.dtype == jnp.uint8  # FP8 latent cache, see fp8_cache.py

            def read(w):  # stored entries -> the compute dtype
                return fp8_cache.unpack(w, c.kv_lora_rank, dt) if packed else w.astype(dt)

            new_BTW = (fp8_cache.pack(latent_BTK, c.kv_lora_rank) if packed
                       else latent_BTK.astype(cache_BSK.dtype))

            def write(w_BSW):
                """Row b's T entries at slots lengths_B[b] + t, in place on the donated cache
                (one dynamic_update_slice per row)."""
                for i in range(b):
                    w_BSW = jax.lax.dynamic_update_slice(w_BSW, new_BTW[i : i + 1],
                                                         (i, lengths_B[i], 0))
                return w_BSW

            s = cache_BSK.shape[1]
            if write_after:
                old_mask_BTS = jnp.broadcast_to(
                    jnp.arange(s)[None, None, :] < lengths_B[:, None, None], (b, t, s))
                segments = [(read(cache_BSK), old_mask_BTS),
                            (read(new_BTW), attn.causal_segment_mask(None, b, t))]
            else:
                cache_BSK = write(cache_BSK)
                kv_BSK = read(cache_BSK)
                mask_BTS = attn.cache_mask(lengths_B[:, None] + jnp.arange(t)[None, :], s)

        if form == "naive":
            c_BSC, k_pe_BSR = kv_BSK[..., : c.kv_lora_rank], kv_BSK[..., c.kv_lora_rank :]
            k_nope_BSNH = dense(c_BSC, wk_b)
            v_BSNV = dense(c_BSC, wv_b)
            if cache_BSK is None and kernel:
                import pallas_kernels  # the second package of this repository

                def attend(q_nope, q_pe, k_nope, k_pe, v, *seg):
                    return pallas_kernels.mla_attention(
                        q_nope, q_pe, k_nope, k_pe, v, sm_scale=scale, causal=True,
                        segment_ids=seg[0] if seg else None, implementation=kernel)

                segs = () if segment_ids_BT is None else (segment_ids_BT,)
                o_BTNV = _on_shards(
                    attend, (q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, *segs),
                    (_HEADS, _HEADS, _HEADS, _SHARED, _HEADS) + (("batch", None),) * len(segs),
                    _HEADS)
            else:
                o_BTNV = attn.naive_attention(
                    q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, mask_BTS, scale
                )
        elif form == "absorbed":
            q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, wk_b)
            if cache_BSK is not None and kernel:
                import pallas_kernels

                def attend(q_latent, q_pe, kv, lengths):  # kv: the packed [B, S, C + R]
                    return pallas_kernels.latent_attention_cache(
                        q_latent, q_pe, kv, lengths_B=lengths + t, sm_scale=scale,
                        causal=True, implementation=kernel)

                o_latent_BTNC = _on_shards(
                    attend, (q_latent_BTNC, q_pe_BTNR, kv_BSK, lengths_B),
                    (_HEADS, _HEADS, _SHARED, ("batch",)), _HEADS)
            else:
                o_latent_BTNC = attn.absorbed_attention(q_latent_BTNC, q_pe_BTNR, segments,
                                                        scale)
            o_BTNV = jnp.einsum("BTNC,CNV->BTNV", o_latent_BTNC, wv_b)
        else:
            raise ValueError(f"form must be 'naive' or 'absorbed', got {form!r}")
        if write_after:
            new_BTW = _after(new_BTW, o_latent_BTNC)
            cache_BSK = write(cache_BSK)
        o_BTNV = constrain(o_BTNV, ("batch", "length", "act_heads", None))  # heads over tensor
        out_BTD = dense(o_BTNV.astype(dt), self.wo_NVD[...].astype(dt), contract=2)
        return out_BTD, cache_BSK

