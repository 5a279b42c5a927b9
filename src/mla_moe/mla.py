"""Multi-head Latent Attention (DeepSeek-V2/V3), naive and absorbed forms behind one module.

`MLA.naive` / `MLA.absorbed` say how keys and values come from the latent; each takes the
attention itself as a function (XLA in attention.py, or a Pallas kernel per shard), and
`_self_attention` / `_cached_attention` pick it. How the cache stores an entry (bf16 or FP8)
and how new entries are written in place is cache.py's.

Legend: see layers.py. Weight layout ([in, ..., out], einsum-ready):
  wq_DNA or (wq_a_DQ, q_norm, wq_b_QNA)   A = H + R (nope first, then rope, per head)
  wkv_a_DL  L = C + R (latent first, then the shared rope key)
  wk_b_CNH, wv_b_CNV (the two halves of HF's kv_b_proj), wo_NVD
The V3.2 indexer's arrays use indexer.py's own letters: n its heads, d its head dim
(q_BTnd, w_BTn, k_BSd).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe import attention as attn
from mla_moe import context_parallel, dsa_blocked, dsa_loss, sharding
from mla_moe import indexer as dsa
from mla_moe.cache import IndexKeyCodec, LatentCodec, write_entries
from mla_moe.config import ModelConfig
from mla_moe.layers import RMSNorm, dense, param, rms_norm, weight
from mla_moe.rope import apply_rope, softmax_scale
from mla_moe.sharding import PER_HEAD, PER_TOKEN, constrain
from pallas_kernels.dispatch import target_platform

# The q/kv latent norms use a hard-coded eps in the reference and in HF.
LATENT_NORM_EPS = 1e-6


def _kernel_implementation(config: ModelConfig) -> str | None:
    """The `implementation` to pass to pallas_kernels, or None to use the XLA path here."""
    impl = config.attention_impl
    # Under context parallelism too: the kernel holds the whole sequence's per-head keys and
    # values on each shard ([B, S, N, H + V], one layer at a time), where the XLA key-block
    # loop holds one block's; but the loop writes every block's scores to HBM. V3 at
    # 128 x 131072 on v5p:8x8x8, context 4: 79.8 GiB and a 85.8 s compute-bound step with the
    # kernel, 78.1 GiB and a 1142 s HBM-bound one with the loop (bench/RESULTS.md).
    if impl == "auto":
        return "auto" if target_platform() in ("tpu", "gpu") else None
    return {"pallas": "auto", "interpret": "interpret", "tpu_interpret": "tpu_interpret"}.get(impl)


# The Pallas kernels run per shard (`sharding.per_shard`): the compiler cannot partition a
# pallas_call (Mosaic refuses outright). Batch and heads are split as the rules say; the
# sequences stay whole on every shard, since attention needs every key.
def _naive_kernel(implementation: str, sm_scale: float, segment_ids_BT: jax.Array | None):
    """The naive form's causal attention on the Pallas kernel, per shard:
    attend(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV) -> o_BTNV."""
    import pallas_kernels  # the second package of this repository

    def kernel(q_nope, q_pe, k_nope, k_pe, v, *seg):
        return pallas_kernels.mla_attention(
            q_nope, q_pe, k_nope, k_pe, v, sm_scale=sm_scale, causal=True,
            segment_ids=seg[0] if seg else None, implementation=implementation)

    segs = () if segment_ids_BT is None else (segment_ids_BT,)

    def attend(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV):
        return sharding.per_shard(
            kernel, (q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, *segs),
            (PER_HEAD, PER_HEAD, PER_HEAD, PER_TOKEN, PER_HEAD) + (("batch", None),) * len(segs),
            PER_HEAD, out_shapes=q_nope_BTNH.shape)

    return attend


def _absorbed_cache_kernel(implementation: str, sm_scale: float, kv_BSL: jax.Array,
                           lengths_B: jax.Array):
    """The absorbed form's attention over a cache that already holds the T new entries (at
    slots lengths_B .. lengths_B + T - 1), on the Pallas kernel, per shard:
    attend(q_latent_BTNC, q_pe_BTNR) -> o_latent_BTNC."""
    import pallas_kernels

    def attend(q_latent_BTNC, q_pe_BTNR):
        t = q_latent_BTNC.shape[1]

        def kernel(q_latent, q_pe, kv, lengths):  # kv: the whole entry [B, S, C + R]
            return pallas_kernels.latent_attention_cache(
                q_latent, q_pe, kv, lengths_B=lengths + t, sm_scale=sm_scale, causal=True,
                implementation=implementation)

        return sharding.per_shard(kernel, (q_latent_BTNC, q_pe_BTNR, kv_BSL, lengths_B),
                                  (PER_HEAD, PER_HEAD, PER_TOKEN, ("batch",)), PER_HEAD,
                                  out_shapes=q_latent_BTNC.shape)

    return attend


def _sparse_cache_kernel(implementation: str, sm_scale: float, kv_BSL: jax.Array,
                         idx_BTK: jax.Array):
    """V3.2's absorbed attention over the K cache slots `idx_BTK` names per query (< 0: none),
    on the Pallas kernel, per shard: attend(q_latent_BTNC, q_pe_BTNR) -> o_latent_BTNC.
    On TPU the kernel reads the cache in its own tiling (`sparse_latent_attention_tpu.
    cache_layout`); held in XLA's default layout the cache is relaid out first, a copy."""
    import pallas_kernels

    def attend(q_latent_BTNC, q_pe_BTNR):
        def kernel(q_latent, q_pe, kv, idx):
            return pallas_kernels.sparse_latent_attention_cache(
                q_latent, q_pe, kv, idx, sm_scale=sm_scale, implementation=implementation)

        return sharding.per_shard(kernel, (q_latent_BTNC, q_pe_BTNR, kv_BSL, idx_BTK),
                                  (PER_HEAD, PER_HEAD, PER_TOKEN, ("batch", None, None)), PER_HEAD,
                                  out_shapes=q_latent_BTNC.shape)

    return attend


class MLA(nnx.Module):
    """Multi-head Latent Attention: x [B, T, D] -> (out [B, T, D], the updated cache or None).

    Reads hidden_size, num_attention_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
    qk_rope_head_dim, v_head_dim, rope_theta / rope_scaling, attention_impl,
    decode_attention, initializer_range, param_dtype. Standalone:

        mla = MLA(config, rngs=nnx.Rngs(0))
        out_BTD, _ = mla(x_BTD)  # causal self-attention, positions 0..T-1
        out_BTD, cache_BSW = mla(x_BTD, cache_BSW=cache.latents[0], lengths_B=cache.lengths_B)
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
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
        self.wkv_a_DL = param(rngs, (d, k), ("embed", "kv_lora"), dtype=pd, stddev=std)
        self.kv_norm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, config=c, rngs=rngs,
                               axis="kv_lora")
        self.wk_b_CNH = param(rngs, (c.kv_lora_rank, n, c.qk_nope_head_dim),
                              ("kv_lora", "heads", "kv"), dtype=pd, stddev=std)
        self.wv_b_CNV = param(rngs, (c.kv_lora_rank, n, c.v_head_dim),
                              ("kv_lora", "heads", "kv"), dtype=pd, stddev=std)
        self.wo_NVD = param(rngs, (n, c.v_head_dim, d), ("heads", "kv", "embed"), dtype=pd,
                            stddev=std)
        self.indexer = dsa.Indexer(c, rngs=rngs) if c.has_indexer else None

    # --- projections -------------------------------------------------------------------------
    def query_latent(self, x_BTD: jax.Array) -> jax.Array:
        """The normed query latent cq [B, T, Q] (q LoRA only; the V3.2 indexer reads it too)."""
        return self.q_norm(dense(x_BTD, weight(self.wq_a_DQ, x_BTD.dtype)))

    def queries(self, x_BTD: jax.Array, positions_BT: jax.Array,
                cq_BTQ: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(q_nope [B, T, N, H], q_pe [B, T, N, R] roped at `positions_BT`); cq_BTQ: the
        query latent when already computed."""
        c, dt = self.config, x_BTD.dtype
        if c.q_lora_rank is None:
            q_BTNA = dense(x_BTD, weight(self.wq_DNA, dt))
        else:
            cq_BTQ = self.query_latent(x_BTD) if cq_BTQ is None else cq_BTQ
            q_BTNA = dense(cq_BTQ, weight(self.wq_b_QNA, dt))
        q_nope_BTNH = q_BTNA[..., : c.qk_nope_head_dim]
        q_pe_BTNR = apply_rope(q_BTNA[..., c.qk_nope_head_dim :], positions_BT, c)
        return q_nope_BTNH, q_pe_BTNR

    def latent(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """The per-token cache entry [c_KV (normed); k_pe (roped)]: [B, T, C + R]."""
        c, dt = self.config, x_BTD.dtype
        kv_BTL = dense(x_BTD, weight(self.wkv_a_DL, dt))
        c_BTC = rms_norm(kv_BTL[..., : c.kv_lora_rank], self.kv_norm.weight[...], LATENT_NORM_EPS)
        k_pe_BTR = apply_rope(kv_BTL[..., c.kv_lora_rank :], positions_BT, c)
        return jnp.concatenate([c_BTC, k_pe_BTR], axis=-1)

    # --- the two forms: how keys and values are formed from the latent -----------------------
    def naive(self, q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, kv_BSL: jax.Array,
              attend: Callable[..., jax.Array]) -> jax.Array:
        """Per-head keys and values decompressed from the latent kv_BSL, then
        attend(q_nope, q_pe, k_nope_BSNH, k_pe_BSR, v_BSNV) -> o [B, T, N, V]."""
        c, dt = self.config, q_nope_BTNH.dtype
        c_BSC, k_pe_BSR = kv_BSL[..., : c.kv_lora_rank], kv_BSL[..., c.kv_lora_rank :]
        k_nope_BSNH = dense(c_BSC, weight(self.wk_b_CNH, dt))
        v_BSNV = dense(c_BSC, weight(self.wv_b_CNV, dt))
        return attend(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV)

    def absorbed(self, q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array,
                 attend: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        """W_UK folded into the query, attend(q_latent_BTNC, q_pe) -> o_latent_BTNC over the
        latent directly, then W_UV: o [B, T, N, V]."""
        dt = q_nope_BTNH.dtype
        q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, weight(self.wk_b_CNH, dt))
        o_latent_BTNC = attend(q_latent_BTNC, q_pe_BTNR)
        return jnp.einsum("BTNC,CNV->BTNV", o_latent_BTNC, weight(self.wv_b_CNV, dt))

    # --- attention without and with a cache --------------------------------------------------
    def _self_attention(self, q_nope_BTNH, q_pe_BTNR, kv_BTL, segment_ids_BT, form,
                        selected_BTS=None):
        """Causal attention of the T tokens over themselves (index order), per segment; with
        `selected_BTS` (the V3.2 indexer's choice, within the causal mask) over those keys.

        A `dsa_blocked.Selection` (long sequences, see `_select`) runs the blocked sparse
        attention of dsa_blocked.py: XLA, absorbed form whatever `form` says, a query block at
        a time. Dense attention (V3, and V3.2's dense warm-up) keeps the Pallas kernel when
        `attention_impl` asks for it. On a mesh with `context` > 1 the tokens are in the zigzag
        layout and attention runs over the gathered latent (context_parallel.py), naive form
        whatever `form` says, on the Pallas kernel when `attention_impl` asks for it (given
        the queries' sequence indices), else on XLA (V3.2's selection there:
        `_context_indexed_attention`)."""
        c = self.config
        scale, kernel = softmax_scale(c), _kernel_implementation(c)
        b, t = kv_BTL.shape[:2]
        if context_parallel.context_size() > 1:  # T split over `context`, zigzag layout
            return context_parallel.gathered_latent_attention(
                q_nope_BTNH, q_pe_BTNR, kv_BTL, segment_ids_BT, self.wk_b_CNH[...],
                self.wv_b_CNV[...], scale, implementation=kernel)
        if isinstance(selected_BTS, dsa_blocked.Selection):
            return dsa_blocked.attention(
                q_nope_BTNH, q_pe_BTNR, kv_BTL, self.wk_b_CNH[...], self.wv_b_CNV[...],
                selected_BTS, scale, c.index_block_q)
        if form == "naive" and kernel and selected_BTS is None:
            return self.naive(q_nope_BTNH, q_pe_BTNR, kv_BTL,
                              _naive_kernel(kernel, scale, segment_ids_BT))
        mask_BTS = attn.causal_segment_mask(segment_ids_BT, b, t)
        if selected_BTS is not None:
            mask_BTS = mask_BTS & selected_BTS
        if form == "naive":
            return self.naive(q_nope_BTNH, q_pe_BTNR, kv_BTL,
                              lambda *qkv: attn.naive_attention(*qkv, mask_BTS, scale))
        return self.absorbed(q_nope_BTNH, q_pe_BTNR, lambda q, q_pe: attn.absorbed_attention(
            q, q_pe, [(kv_BTL, mask_BTS)], scale))

    def _cached_attention(self, q_nope_BTNH, q_pe_BTNR, latent_BTL, cache_BSW, lengths_B,
                          form, selected_BTS=None):
        """Attention of the T new tokens over the cache's first lengths_B slots and themselves
        (token t at slot lengths_B + t); with `selected_BTS` (the V3.2 indexer's choice over
        the S slots, within the causal mask) over those slots only: the pair (mask [B, T, S],
        indices [B, T, K]), the XLA paths masking, the kernel gathering the K slots
        (pallas_kernels.sparse_latent_attention_cache). Returns (o [B, T, N, V], the cache
        with the new entries written)."""
        c = self.config
        scale, kernel = softmax_scale(c), _kernel_implementation(c)
        idx_BTK = None
        if selected_BTS is not None:
            selected_BTS, idx_BTK = selected_BTS
        codec = LatentCodec.of(cache_BSW, c.kv_lora_rank, q_nope_BTNH.dtype)
        new_BTW = codec.write(latent_BTL)
        b, t = latent_BTL.shape[:2]
        s = cache_BSW.shape[1]
        if form == "absorbed" and not kernel:
            # Attends over the cache as it was plus the new entries (as stored), then writes
            # them: the whole-cache read neither waits for nor copies the updated cache.
            old_mask_BTS = jnp.broadcast_to(
                jnp.arange(s)[None, None, :] < lengths_B[:, None, None], (b, t, s))
            new_mask_BTT = attn.causal_segment_mask(None, b, t)
            if selected_BTS is not None:  # slot lengths_B + j holds new token j
                old_mask_BTS = old_mask_BTS & selected_BTS
                new_slots_BTT = jnp.broadcast_to(
                    lengths_B[:, None, None] + jnp.arange(t)[None, None, :], (b, t, t))
                new_mask_BTT = new_mask_BTT & jnp.take_along_axis(
                    selected_BTS, jnp.minimum(new_slots_BTT, s - 1), axis=-1)
            segments = [(codec.read(cache_BSW), old_mask_BTS),
                        (codec.read(new_BTW), new_mask_BTT)]
            o_BTNV = self.absorbed(q_nope_BTNH, q_pe_BTNR, lambda q, q_pe: (
                attn.absorbed_attention(q, q_pe, segments, scale)))
            return o_BTNV, write_entries(cache_BSW, new_BTW, lengths_B, after=o_BTNV)
        cache_BSW = write_entries(cache_BSW, new_BTW, lengths_B)
        kv_BSL = codec.read(cache_BSW)
        if form == "absorbed":
            attend = (_absorbed_cache_kernel(kernel, scale, kv_BSL, lengths_B) if idx_BTK is None
                      else _sparse_cache_kernel(kernel, scale, kv_BSL, idx_BTK))
            return self.absorbed(q_nope_BTNH, q_pe_BTNR, attend), cache_BSW
        mask_BTS = attn.cache_mask(lengths_B[:, None] + jnp.arange(t)[None, :], s)
        if selected_BTS is not None:
            mask_BTS = mask_BTS & selected_BTS
        return self.naive(q_nope_BTNH, q_pe_BTNR, kv_BSL,
                          lambda *qkv: attn.naive_attention(*qkv, mask_BTS, scale)), cache_BSW

    # --- the V3.2 indexer --------------------------------------------------------------------
    def _select(self, x_BTD, cq_BTQ, positions_BT, segment_ids_BT, keys_BSW, lengths_B,
                want_loss):
        """The indexer's part of a V3.2 layer: (the selected keys or None for dense attention,
        the indexer's inputs for its loss or None, the updated key cache or None).

        keys_BSW: the layer's indexer-key cache (None without a cache). Without a cache and
        with T <= index_topk every visible key is selected, and the indexer is skipped unless
        its loss is wanted. The selection is a [B, T, S] mask or, without a cache and with
        T > index_dense_max_len, a `dsa_blocked.Selection` of indices (no [B, T, S] array)."""
        c, idx = self.config, self.indexer
        b, t = x_BTD.shape[:2]
        # The indexer reads its inputs detached: its loss trains it alone, and the selection
        # is discrete (no gradient flows through it either way).
        x_BTD, cq_BTQ = jax.lax.stop_gradient(x_BTD), jax.lax.stop_gradient(cq_BTQ)
        if keys_BSW is None:
            if t <= c.index_topk and not want_loss:
                return None, None, None
            k_BSd = idx.keys(x_BTD, positions_BT)
            if t > c.index_dense_max_len:
                q_BTnd, w_BTn = idx.queries(cq_BTQ, positions_BT), idx.weights(x_BTD)
                return dsa_blocked.select(c, q_BTnd, w_BTn, k_BSd, segment_ids_BT,
                                          want_loss) + (None,)
            visible_BTS = attn.causal_segment_mask(segment_ids_BT, b, t)
        else:
            key_codec = IndexKeyCodec.of(keys_BSW, x_BTD.dtype)
            keys_BSW = write_entries(keys_BSW, key_codec.write(idx.keys(x_BTD, positions_BT)),
                                     lengths_B)
            k_BSd = key_codec.read(keys_BSW)
            visible_BTS = attn.cache_mask(lengths_B[:, None] + jnp.arange(t)[None, :],
                                          keys_BSW.shape[1])
        q_BTnd, w_BTn = idx.queries(cq_BTQ, positions_BT), idx.weights(x_BTD)
        idx_BTK = dsa.top_k(dsa.index_scores(q_BTnd, w_BTn, k_BSd), visible_BTS, c.index_topk)
        selected_BTS = visible_BTS & dsa.selection_mask(idx_BTK, k_BSd.shape[1])
        if c.index_attention == "dense":
            selected_BTS = None
        loss_inputs = None
        if want_loss:
            loss_inputs = (q_BTnd, w_BTn, k_BSd, visible_BTS, selected_BTS)
        if keys_BSW is not None and selected_BTS is not None:  # the kernel attends by index
            selected_BTS = (selected_BTS, idx_BTK)
        return selected_BTS, loss_inputs, keys_BSW

    # --- forward -----------------------------------------------------------------------------
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache_BSW: jax.Array | tuple[jax.Array, jax.Array] | None = None,
        lengths_B: jax.Array | None = None,
        form: str | None = None,
    ) -> tuple[jax.Array, jax.Array | tuple[jax.Array, jax.Array] | None]:
        """Attention output [B, T, D] and the updated cache layer (or None).

        Without a cache: causal self-attention over the T tokens (index order), isolated per
        segment. With a cache ([B, S, W], see cache.py; for a V3.2 model the pair (latents,
        indexer keys [B, S, W'] as stored)) and `lengths_B`: the T tokens are written at slots
        lengths_B + t (in place) and attend to every slot <= their own (V3.2: to the
        indexer's top-k of those).
        positions_BT: rope positions (default 0..T-1, or lengths_B + t with a cache).
        form: "naive" or "absorbed" (default: naive without a cache, the config's
        `decode_attention` with one).
        """
        out_BTD, cache_BSW, _ = self.attend(x_BTD, positions_BT, segment_ids_BT, cache_BSW,
                                            lengths_B, form)
        return out_BTD, cache_BSW

    def attend(self, x_BTD, positions_BT=None, segment_ids_BT=None, cache_BSW=None,
               lengths_B=None, form=None, *, indexer_loss: bool = False):
        """`__call__`, returning also the V3.2 indexer's KL loss (a scalar, averaged over the
        tokens; dsa_loss.py) when `indexer_loss` (without a cache), else None."""
        c = self.config
        b, t = x_BTD.shape[:2]
        form = form or ("naive" if cache_BSW is None else c.decode_attention)
        if form not in ("naive", "absorbed"):
            raise ValueError(f"form must be 'naive' or 'absorbed', got {form!r}")
        if indexer_loss and (self.indexer is None or cache_BSW is not None):
            raise ValueError("indexer_loss needs a V3.2 layer (index_n_heads > 0) and no cache")
        context = context_parallel.context_size()
        if context > 1 and cache_BSW is not None:
            raise NotImplementedError("mesh.context > 1 supports attention without a cache only")
        if positions_BT is None:
            start_B = jnp.zeros((b,), jnp.int32) if cache_BSW is None else lengths_B
            positions_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        cq_BTQ = None if c.q_lora_rank is None else self.query_latent(x_BTD)
        q_nope_BTNH, q_pe_BTNR = self.queries(x_BTD, positions_BT, cq_BTQ)
        latent_BTL = self.latent(x_BTD, positions_BT)
        if self.indexer is not None and context > 1:
            o_BTNV, loss = self._context_indexed_attention(
                x_BTD, cq_BTQ, positions_BT, segment_ids_BT, q_nope_BTNH, q_pe_BTNR, latent_BTL,
                indexer_loss)
            return self._output(o_BTNV, x_BTD.dtype), None, loss
        selected_BTS, loss_inputs, keys_BSW = None, None, None
        if self.indexer is not None:
            if cache_BSW is not None:
                if not isinstance(cache_BSW, tuple):
                    raise ValueError("a V3.2 layer's cache is the pair (latents, indexer keys)")
                cache_BSW, keys_BSW = cache_BSW
            selected_BTS, loss_inputs, keys_BSW = self._select(
                x_BTD, cq_BTQ, positions_BT, segment_ids_BT, keys_BSW, lengths_B, indexer_loss)
        if cache_BSW is None:
            o_BTNV = self._self_attention(q_nope_BTNH, q_pe_BTNR, latent_BTL, segment_ids_BT,
                                          form, selected_BTS)
        else:
            o_BTNV, cache_BSW = self._cached_attention(q_nope_BTNH, q_pe_BTNR, latent_BTL,
                                                       cache_BSW, lengths_B, form, selected_BTS)
            if keys_BSW is not None:
                cache_BSW = (cache_BSW, keys_BSW)
        loss = None
        if loss_inputs is not None:
            loss = self._indexer_loss(q_nope_BTNH, q_pe_BTNR, latent_BTL, loss_inputs)
        return self._output(o_BTNV, x_BTD.dtype), cache_BSW, loss

    def _output(self, o_BTNV: jax.Array, dt) -> jax.Array:
        """The heads' outputs projected back: [B, T, D]."""
        o_BTNV = constrain(o_BTNV, ("batch", "length", "act_heads", None))  # heads over tensor
        return dense(o_BTNV.astype(dt), weight(self.wo_NVD, dt), contract=2)

    def _context_indexed_attention(self, x_BTD, cq_BTQ, positions_BT, segment_ids_BT,
                                   q_nope_BTNH, q_pe_BTNR, latent_BTL, want_loss):
        """A V3.2 layer without a cache on a context mesh (T split over `context`, zigzag
        layout): (o [B, T, N, V], the indexer's KL averaged over the tokens or None). The
        indexer's keys are gathered with the latent, and each shard's queries select and attend
        over the whole sequence (`context_parallel.indexed_latent_attention`, the blocked
        functions of dsa_blocked.py). With T <= index_topk every visible key is selected:
        the dense attention, as on one device."""
        c, sg = self.config, jax.lax.stop_gradient
        sparse = c.index_attention == "sparse" and x_BTD.shape[1] > c.index_topk
        if not (sparse or want_loss):
            return self._self_attention(q_nope_BTNH, q_pe_BTNR, latent_BTL, segment_ids_BT,
                                        "naive"), None
        x_BTD, cq_BTQ = sg(x_BTD), sg(cq_BTQ)  # the indexer trains on its loss alone
        indexer_BT = (self.indexer.queries(cq_BTQ, positions_BT), self.indexer.weights(x_BTD),
                      self.indexer.keys(x_BTD, positions_BT))
        out = context_parallel.indexed_latent_attention(
            q_nope_BTNH, q_pe_BTNR, latent_BTL, segment_ids_BT, self.wk_b_CNH[...],
            self.wv_b_CNV[...], softmax_scale(c), indexer_BT, c, sparse=sparse,
            want_loss=want_loss, implementation=_kernel_implementation(c))
        return out.o_BTNV, None if out.kl_BT is None else jnp.mean(out.kl_BT)

    def _indexer_loss(self, q_nope_BTNH, q_pe_BTNR, latent_BTL, loss_inputs):
        """KL(p || softmax(I)) over the keys the main attention saw, p its probabilities
        summed over heads (dsa_loss.py, or dsa_blocked.py for long sequences); no gradient
        reaches anything but the indexer."""
        c, sg = self.config, jax.lax.stop_gradient
        if isinstance(loss_inputs, dsa_blocked.LossInputs):
            return dsa_blocked.indexer_loss(q_nope_BTNH, q_pe_BTNR, latent_BTL,
                                            sg(self.wk_b_CNH[...]), loss_inputs,
                                            softmax_scale(c), c.index_block_q, c.index_block_k)
        q_BTnd, w_BTn, k_BSd, visible_BTS, selected_BTS = loss_inputs
        mask_BTS = visible_BTS if selected_BTS is None else selected_BTS
        q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", sg(q_nope_BTNH),
                                   sg(self.wk_b_CNH[...]).astype(q_nope_BTNH.dtype))
        target_BTS = dsa_loss.attention_target(q_latent_BTNC, sg(q_pe_BTNR), sg(latent_BTL),
                                               mask_BTS, softmax_scale(c))
        return dsa_loss.indexer_kl(q_BTnd, w_BTn, k_BSd, target_BTS, mask_BTS)
