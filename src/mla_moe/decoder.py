"""The DeepSeek-V2/V3 decoder: embedding, pre-norm MLA + FFN/MoE blocks, head, MTP modules.

Consecutive identical layers (the dense prefix, then the MoE layers) are stored stacked, one
leading layer axis per group, and run either with `jax.lax.scan` (`scan_layers=True`: one
traced layer body per group) or with a plain Python loop over slices; both give identical
results. `remat_policy` wraps each layer in `jax.checkpoint`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mla_moe import context_parallel
from mla_moe.cache import KVCache
from mla_moe.config import ModelConfig
from mla_moe.layers import RMSNorm, SwiGLU, dense, dtype_of, param
from mla_moe.mla import MLA
from mla_moe.moe import MoE, MoEStats
from mla_moe.router import Router
from mla_moe.sharding import constrain

ACT_BTD = ("batch", "length", "act_embed")  # logical names of the residual stream


def _offload(*names: str):
    """Saves the named values of a layer in host memory (`pinned_host`) instead of HBM: the
    forward copies them out as they are made, the backward copies them back ahead of use;
    everything else is recomputed, as under "full"."""
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=names,
        offload_src="device", offload_dst="pinned_host")


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    # Each layer's input [B, T, D] lives on the host between the forward and the backward
    # (at V3 size, 61 x 704 MB per chip at 49,152 tokens: 43 GB that HBM no longer holds).
    "offload_layer_input": _offload("layer_input"),
    # ... and the attention output too: the backward then skips recomputing the output
    # projection, for a second [B, T, D] per layer on the host.
    "offload_layer_input_attention_out": _offload("layer_input", "attention_out"),
}


def layer_groups(config: ModelConfig) -> list[tuple[bool, int]]:
    """Runs of consecutive identical layers: [(is_moe, count), ...]; each is one stacked group
    of `DeepSeekModel.groups`."""
    groups: list[tuple[bool, int]] = []
    for i in range(config.num_hidden_layers):
        moe = config.is_moe_layer(i)
        if groups and groups[-1][0] == moe:
            groups[-1] = (moe, groups[-1][1] + 1)
        else:
            groups.append((moe, 1))
    return groups


@flax.struct.dataclass
class ModelOutput:
    """What `DeepSeekModel.__call__` returns (a pytree)."""

    logits: jax.Array | None  # [B, T, vocab] float32; None when called with logits=False
    aux_loss: jax.Array  # scalar: weighted balance / z losses summed over MoE layers
    aux_losses: dict[str, jax.Array]  # unweighted, summed over MoE layers
    router: tuple[MoEStats, ...]  # per MoE layer (main layers, then MTP layers)
    hidden: jax.Array  # [B, T, D] last block's output (before the final norm)
    cache: KVCache | None = None
    mtp_logits: jax.Array | None = None  # [num_nextn_predict_layers, B, T, vocab] float32
    # V3.2 with indexer_loss=True: the indexer's KL (dsa_loss.py) averaged over the main
    # model's layers; None otherwise.
    indexer_loss: jax.Array | None = None
    # With logits=False instead: the head's inputs, in the compute dtype (see `head_weight`).
    normed_hidden: jax.Array | None = None  # [B, T, D] norm(hidden)
    mtp_normed_hidden: jax.Array | None = None  # [num_nextn_predict_layers, B, T, D]


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)) (a SwiGLU, or an `MoE`)."""

    def __init__(self, config: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
        c = config
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, config=c, rngs=rngs)
        self.attn = MLA(c, rngs=rngs)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, config=c, rngs=rngs)
        self.ffn = MoE(c, rngs=rngs) if moe else SwiGLU(c.intermediate_size, config=c, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None, cache_BSW=None,
                 lengths_B: jax.Array | None = None, form: str | None = None,
                 indexer_loss: bool = False):
        """(x_BTD out, the updated cache or None, the MoE's stats or None for a dense FFN,
        the V3.2 indexer's KL or None: see `MLA.attend`)."""
        with jax.named_scope("attention"):
            a_BTD, cache_BSW, kl = self.attn.attend(
                self.attn_norm(x_BTD), positions_BT, segment_ids_BT, cache_BSW, lengths_B, form,
                indexer_loss=indexer_loss)
        x_BTD = x_BTD + checkpoint_name(a_BTD, "attention_out")
        stats = None
        if isinstance(self.ffn, MoE):
            with jax.named_scope("moe"):
                out = self.ffn(self.ffn_norm(x_BTD))
            f_BTD, stats = out.y_BTD, out.stats
        else:
            with jax.named_scope("mlp"):
                f_BTD = self.ffn(self.ffn_norm(x_BTD))
        return constrain(x_BTD + f_BTD, ACT_BTD), cache_BSW, stats, kl


def _stacked_layers(config: ModelConfig, moe: bool, count: int, rngs: nnx.Rngs) -> DecoderLayer:
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return DecoderLayer(config, moe, rngs=rngs)

    return make(rngs)


class MTPBlock(nnx.Module):
    """V3 multi-token prediction module k: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h)])."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        c = config
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps, config=c, rngs=rngs)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps, config=c, rngs=rngs)
        # Input order is [embedding; hidden], as the released weights and engines use.
        self.eh_proj_2DD = param(rngs, (2 * c.hidden_size, c.hidden_size), (None, "embed"),
                                 dtype=c.param_dtype, stddev=c.initializer_range)
        self.layer = DecoderLayer(c, c.is_moe_layer(layer_idx), rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, config=c, rngs=rngs)

    def __call__(self, h_BTD: jax.Array, emb_BTD: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None, cache_BSW=None,
                 lengths_B: jax.Array | None = None, form: str | None = None):
        """The block over h_BTD (the previous depth's hidden) and emb_BTD (the shifted
        tokens' embedding); returns what `DecoderLayer` returns."""
        x_BT2D = jnp.concatenate([self.enorm(emb_BTD), self.hnorm(h_BTD)], axis=-1)
        x_BTD = dense(x_BT2D, self.eh_proj_2DD[...].astype(h_BTD.dtype))
        return self.layer(x_BTD, positions_BT, segment_ids_BT, cache_BSW, lengths_B, form)


def _slice(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


class DeepSeekModel(nnx.Module):
    """DeepSeek-V2/V3 causal LM. Call it on int tokens [B, T]; see `__call__`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        std, pd = c.initializer_range, c.param_dtype
        self.embed_UD = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                              dtype=pd, stddev=std)
        self.groups = nnx.List(
            [_stacked_layers(c, moe, n, rngs) for moe, n in layer_groups(c)]
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, config=c, rngs=rngs)
        if c.tie_word_embeddings:
            self.head_DU = None
        else:
            self.head_DU = param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                                 dtype=pd, stddev=std)
        self.mtp = nnx.List(
            [MTPBlock(c, c.num_hidden_layers + k, rngs=rngs)
             for k in range(c.num_nextn_predict_layers)]
        )

    # --- pieces ------------------------------------------------------------------------------
    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        """Embedding lookup [B, T] -> [B, T, D] in the compute dtype."""
        x_BTD = jnp.take(self.embed_UD[...], tokens_BT, axis=0).astype(dtype_of(self.config.dtype))
        return constrain(x_BTD, ACT_BTD)

    def head_weight(self) -> jax.Array:
        """The output head w_DU [D, vocab] in the parameter dtype (the embedding's transpose
        when tied)."""
        return self.embed_UD[...].T if self.head_DU is None else self.head_DU[...]

    def logits(self, h_BTD: jax.Array, norm: RMSNorm | None = None) -> jax.Array:
        """OutHead: head(norm(h)) in float32 (norm defaults to the final norm)."""
        x_BTD = (norm or self.norm)(h_BTD)
        w_DU = self.head_weight()
        return dense(x_BTD, w_DU.astype(x_BTD.dtype), preferred_element_type=jnp.float32)

    def unstacked(self) -> DeepSeekModel:
        """The same model for inference, each layer group split into per-layer modules (one
        copy of the weights, made once). A decode step then reads every layer's weights in
        place; with stacked groups each step would first copy each layer's weights out of the
        stacked arrays. Place the model on its mesh before unstacking; training expects the
        stacked model."""
        model = nnx.merge(*nnx.split(self))  # a new module tree over the same arrays
        groups = []
        for group in model.groups:
            if isinstance(group, nnx.List):
                groups.append(group)
                continue
            graphdef, state = nnx.split(group)
            n = jax.tree.leaves(state)[0].shape[0]
            groups.append(nnx.List([nnx.merge(graphdef, _slice(state, i)) for i in range(n)]))
        model.groups = nnx.List(groups)
        return model

    def _run_group(self, group, first, x_BTD, positions_BT, segment_ids_BT, cache_group,
                   lengths_B, form, indexer_loss=False):
        """Runs the layers first, first + 1, ... of one group, each under the name scope
        `layer_<index>` (`layers_<first>_<last>` for a scan), which profiles show."""
        c = self.config
        if isinstance(group, nnx.List):  # unstacked (see `unstacked`)
            n = len(group)

            def run_layer(i, x, cache_l):
                return group[i](x, positions_BT, segment_ids_BT, cache_l, lengths_B, form,
                                indexer_loss)
        else:
            graphdef, state = nnx.split(group)

            def body(x, layer_state, cache_l):
                layer = nnx.merge(graphdef, layer_state)
                x = checkpoint_name(x, "layer_input")
                return layer(x, positions_BT, segment_ids_BT, cache_l, lengths_B, form,
                             indexer_loss)

            n = jax.tree.leaves(state)[0].shape[0]
            scan = c.scan_layers and cache_group is None
            if c.remat_policy != "none":
                # A one-layer group's scan is inlined, and then the recomputation can merge
                # with the forward (CSE) when not fenced off: the layer keeps its forward
                # values and the weights it gathered (V2-Lite's first, dense, layer).
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[c.remat_policy],
                                      prevent_cse=not (scan and n == 1))
            if scan:
                def step(x, layer_state):
                    x, _, stats, kl = body(x, layer_state, None)
                    return x, (stats, kl)

                with jax.named_scope(f"layers_{first}_{first + n - 1}"):
                    x_BTD, (stats, kls) = jax.lax.scan(step, x_BTD, state)
                kls = [None] * n if kls is None else [kls[i] for i in range(n)]
                return x_BTD, None, [_slice(stats, i) for i in range(n)], kls

            def run_layer(i, x, cache_l):
                return body(x, _slice(state, i), cache_l)

        # With a cache, one traced layer per layer: each layer's own [B, S, W] cache array is
        # read and updated in place (scanning would slice it out of a stacked array and back).
        caches, stats, kls = [], [], []
        for i in range(n):
            cache_l = None if cache_group is None else cache_group[i]
            with jax.named_scope(f"layer_{first + i}"):
                x_BTD, cache_l, s, kl = run_layer(i, x_BTD, cache_l)
            caches.append(cache_l)
            stats.append(s)
            kls.append(kl)
        return x_BTD, (None if cache_group is None else tuple(caches)), stats, kls

    # --- forward -----------------------------------------------------------------------------
    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        attention_form: str | None = None,
        inputs_embeds_BTD: jax.Array | None = None,
        logits: bool = True,
        indexer_loss: bool = False,
    ) -> ModelOutput:
        """Forward pass.

        tokens_BT: int [B, T]. positions_BT: rope positions (default 0..T-1, or continuing
        from `cache.lengths_B`). segment_ids_BT: packed documents; tokens attend only within
        their segment (training / prefill without cache). cache: a `KVCache`; the T tokens
        are appended to it and the updated cache is returned in the output.
        attention_form: "naive" or "absorbed" (default: naive without a cache, the config's
        `decode_attention` with one). inputs_embeds_BTD: use these instead of looking up
        `tokens_BT` for the main model (the MTP modules still embed the tokens).
        logits: False returns the head's inputs (`normed_hidden`, `mtp_normed_hidden`) instead
        of the logits, for a loss that applies the head itself a chunk at a time
        (`losses.chunked_cross_entropy`). indexer_loss: also the V3.2 indexer's KL
        (`ModelOutput.indexer_loss`; training, without a cache).
        """
        b, t = tokens_BT.shape
        if cache is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids_BT is not supported together with a cache")
        lengths_B = None if cache is None else cache.lengths_B
        if positions_BT is None:
            start = jnp.zeros((b,), jnp.int32) if cache is None else lengths_B
            positions_BT = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        with jax.named_scope("embed"):
            x_BTD = self.embed(tokens_BT) if inputs_embeds_BTD is None else inputs_embeds_BTD
        if indexer_loss and not self.config.has_indexer:
            raise ValueError("indexer_loss=True needs a V3.2 config (index_n_heads > 0)")
        router_stats: list[MoEStats] = []
        new_layers, kls = [], []
        first = 0
        for group, (_, n) in zip(self.groups, layer_groups(self.config), strict=True):
            cache_group = None if cache is None else tuple(
                cache.layer(i) for i in range(first, first + n))
            x_BTD, cache_group, stats, group_kls = self._run_group(
                group, first, x_BTD, positions_BT, segment_ids_BT, cache_group, lengths_B,
                attention_form, indexer_loss,
            )
            new_layers.extend(cache_group or ())
            router_stats.extend(s for s in stats if s is not None)
            kls.extend(k for k in group_kls if k is not None)
            first += n
        h_BTD = x_BTD
        # logits=False: each head's input (its norm of the hidden) in place of its logits.
        head = self.logits if logits else lambda h, norm=None: (norm or self.norm)(h)
        with jax.named_scope("head"):
            main_out = head(h_BTD)

        mtp_out = None
        if self.mtp and cache is None:
            per_module, h_k = [], h_BTD
            for k, block in enumerate(self.mtp, start=1):
                # Module k sees token i+k at position i (zeros past the end; masked in the loss).
                shifted_BT = context_parallel.shift_left(tokens_BT, k)
                with jax.named_scope(f"mtp_{k}"):
                    h_k, _, stats, _ = block(h_k, self.embed(shifted_BT), positions_BT,
                                          segment_ids_BT)
                    per_module.append(head(h_k, block.norm))
                if stats is not None:
                    router_stats.append(stats)
            mtp_out = jnp.stack(per_module)

        aux_loss = sum((s.aux_loss for s in router_stats), jnp.zeros((), jnp.float32))
        aux_losses: dict[str, jax.Array] = {}
        for s in router_stats:
            for name, value in s.losses.items():
                aux_losses[name] = aux_losses.get(name, 0.0) + value
        new_cache = None
        if cache is not None:
            keyed = bool(cache.index_keys)
            new_cache = KVCache(
                latents=tuple(layer[0] if keyed else layer for layer in new_layers),
                lengths_B=lengths_B + t,
                index_keys=tuple(layer[1] for layer in new_layers) if keyed else ())
        heads = (dict(logits=main_out, mtp_logits=mtp_out) if logits else
                 dict(logits=None, normed_hidden=main_out, mtp_normed_hidden=mtp_out))
        return ModelOutput(
            aux_loss=aux_loss, aux_losses=aux_losses, router=tuple(router_stats), hidden=h_BTD,
            cache=new_cache, indexer_loss=sum(kls) / len(kls) if kls else None, **heads,
        )

    # --- expert bias ---------------------------------------------------------------------------
    def moe_routers(self) -> list[tuple[Router, int | None]]:
        """(router, index in its stacked group or None) for every MoE layer, in the order of
        `ModelOutput.router`; on an `unstacked` model every index is None."""
        out: list[tuple[Router, int | None]] = []
        for group in self.groups:
            if isinstance(group, nnx.List):  # unstacked: one module per layer
                out.extend((layer.ffn.router, None) for layer in group
                           if isinstance(layer.ffn, MoE))
            elif isinstance(group.ffn, MoE):
                n = group.ffn.router.w_DE.shape[0]
                out.extend((group.ffn.router, i) for i in range(n))
        for block in self.mtp:
            if isinstance(block.layer.ffn, MoE):
                out.append((block.layer.ffn.router, None))
        return out
