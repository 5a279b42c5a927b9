"""Exact parameter and FLOP counts from a config (no arrays are built)."""

from __future__ import annotations

from mla_moe.config import ModelConfig


def _attention_params(c: ModelConfig) -> int:
    n, d = c.num_attention_heads, c.hidden_size
    if c.q_lora_rank is None:
        q = d * n * c.qk_head_dim
    else:
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * c.qk_head_dim
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)
    o = n * c.v_head_dim * d
    return q + kv + o + _indexer_params(c)


def _indexer_params(c: ModelConfig) -> int:
    """V3.2's lightning indexer: wq_b, wk, the key LayerNorm (weight and bias), weights_proj
    (13.96M per layer at V3.2 size)."""
    if not c.has_indexer:
        return 0
    hi, di = c.index_n_heads, c.index_head_dim
    return c.q_lora_rank * hi * di + c.hidden_size * di + 2 * di + c.hidden_size * hi


def _ffn_params(c: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active) FFN parameters of one layer."""
    d = c.hidden_size
    if not moe:
        p = 3 * d * c.intermediate_size
        return p, p
    expert = 3 * d * c.moe_intermediate_size
    shared = c.n_shared_experts * expert
    router = d * c.n_routed_experts
    total = c.n_routed_experts * expert + shared + router
    active = c.num_experts_per_tok * expert + shared + router
    return total, active


def _layer_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    attn = _attention_params(c) + 2 * c.hidden_size  # + the two block norms
    total, active = _ffn_params(c, c.is_moe_layer(layer_idx))
    return attn + total, attn + active


def param_count(config: ModelConfig, *, include_mtp: bool = False) -> tuple[int, int]:
    """(total, active-per-token) parameters of the main model.

    Total counts embedding, head (once if tied), every block and the final norm. Active counts
    what a token computes with: the routed top-k and shared experts, attention, norms and the
    head, but not the embedding table (a lookup, as in the published 2.4B / 21B / 37B).
    MTP modules are excluded unless `include_mtp`.
    """
    c = config
    emb = c.vocab_size * c.hidden_size
    head = emb if not c.tie_word_embeddings else 0
    total = emb + head + c.hidden_size
    active = c.vocab_size * c.hidden_size + c.hidden_size
    for i in range(c.num_hidden_layers):
        t, a = _layer_params(c, i)
        total += t
        active += a
    if include_mtp:
        for k in range(c.num_nextn_predict_layers):
            extra = 2 * c.hidden_size * c.hidden_size + 3 * c.hidden_size
            t, a = _layer_params(c, c.num_hidden_layers + k)
            total += t + extra
            active += a + extra
    return total, active


def matmul_params_per_token(config: ModelConfig) -> int:
    """Active parameters that take part in a matmul for each token: every block's projections
    (routed top-k + shared experts + router) and the unembedding; not the embedding lookup or
    the norms."""
    c = config
    n = 0
    for i in range(c.num_hidden_layers):
        _, ffn_active = _ffn_params(c, c.is_moe_layer(i))
        norms = c.kv_lora_rank + (c.q_lora_rank or 0) + (2 * c.index_head_dim
                                                          if c.has_indexer else 0)
        n += _attention_params(c) - norms + ffn_active
    return n + c.vocab_size * c.hidden_size


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token.

    Convention (MaxText / Megatron): 6 x matmul parameters active per token, plus causal
    attention 3 * seq_len * N * (H + R + V) per layer (2 flops per multiply-add, x3 for
    backward, /2 for the causal mask). V3.2 (sparse): the main attention over the keys each
    query selects, min(t + 1, index_topk) on average over t, plus the indexer's causal scores
    over every key, 3 * seq_len * Hi * Di (with its KL's backward). MTP modules are not counted.
    """
    c = config
    keys = seq_len / 2  # causal: the mean number of keys a query sees
    indexer = 0.0
    if c.has_indexer:
        k = min(c.index_topk, seq_len)
        if c.index_attention == "sparse":  # t + 1 <= k keys for t < k, then k
            keys = (k * (k + 1) / 2 + (seq_len - k) * k) / seq_len
        indexer = 3.0 * seq_len * c.index_n_heads * c.index_head_dim
    attention = 6.0 * keys * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    return 6.0 * matmul_params_per_token(c) + (attention + indexer) * c.num_hidden_layers
