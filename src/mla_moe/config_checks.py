"""The checks `ModelConfig` runs at construction, one function per topic, and the values its
string fields accept.

Each bad value raises `ValueError` naming the field. Topics run in a fixed order (sizes,
attention, MTP, MoE, DSA, execution), so a config with several bad fields names the first.
"""

from __future__ import annotations

import math

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
MOE_IMPLS = ("dropless", "capacity")
MOE_DISPATCHES = ("auto", "all_to_all", "ragged_all_to_all", "allgather")
ATTENTION_IMPLS = ("xla", "pallas", "auto", "interpret", "tpu_interpret")
DECODE_FORMS = ("absorbed", "naive")
REMAT_POLICIES = (
    "none",
    "full",
    "dots",
    "dots_no_batch",
    "save_attention_out",
    "offload_layer_input",
    "offload_layer_input_attention_out",
)
DTYPES = ("float32", "bfloat16", "float16")
INDEX_ATTENTIONS = ("sparse", "dense")


def check_model_config(c) -> None:
    """Raises `ValueError` naming the first bad field of `c`, the `ModelConfig` being
    constructed (not imported here: config.py imports this module)."""
    _check_sizes(c)
    _check_attention(c)
    _check_mtp(c)
    _check_moe(c)
    _check_dsa(c)
    _check_execution(c)


def _positive(c, name: str, allow_none: bool = False) -> None:
    v = getattr(c, name)
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _one_of(c, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(c, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(c, name)!r}")


def _non_negative(c, *names: str) -> None:
    for name in names:
        if getattr(c, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(c, name)}")


def _check_sizes(c) -> None:
    """The decoder's sizes and layer layout."""
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "max_position_embeddings",
        "moe_layer_freq",
    ):
        _positive(c, name)
    if not 0 <= c.first_k_dense_replace <= c.num_hidden_layers:
        raise ValueError(
            f"first_k_dense_replace must be in [0, num_hidden_layers={c.num_hidden_layers}],"
            f" got {c.first_k_dense_replace}"
        )
    if not c.rms_norm_eps > 0:
        raise ValueError(f"rms_norm_eps must be > 0, got {c.rms_norm_eps}")


def _check_attention(c) -> None:
    """MLA's heads and latent ranks, rope, and the attention implementations."""
    for name in (
        "num_attention_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    ):
        _positive(c, name)
    _positive(c, "q_lora_rank", allow_none=True)
    if c.qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim must be even, got {c.qk_rope_head_dim}")
    if not c.rope_theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {c.rope_theta}")
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        if not rs.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {rs.factor}")
        if rs.original_max_position_embeddings <= 0:
            raise ValueError(
                "rope_scaling.original_max_position_embeddings must be > 0, got "
                f"{rs.original_max_position_embeddings}"
            )
    _one_of(c, "attention_impl", ATTENTION_IMPLS)
    _one_of(c, "decode_attention", DECODE_FORMS)


def _check_mtp(c) -> None:
    """Multi-token prediction: its depth and loss weight."""
    if c.num_nextn_predict_layers < 0:
        raise ValueError(f"num_nextn_predict_layers must be >= 0, got {c.num_nextn_predict_layers}")
    _non_negative(c, "mtp_loss_weight")


def _check_moe(c) -> None:
    """Experts, routing, the balance objectives and the MoE's execution."""
    if c.n_routed_experts is not None:
        _check_experts(c)
    _one_of(c, "topk_method", TOPK_METHODS)
    _one_of(c, "scoring_func", SCORING_FUNCS)
    _one_of(c, "moe_impl", MOE_IMPLS)
    _one_of(c, "moe_dispatch", MOE_DISPATCHES)
    if not c.capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {c.capacity_factor}")
    if (
        not isinstance(c.expert_gather_chunk, int)
        or c.expert_gather_chunk < 0
        or (
            c.n_routed_experts
            and c.expert_gather_chunk
            and c.n_routed_experts % c.expert_gather_chunk
        )
    ):
        raise ValueError(
            f"expert_gather_chunk must be 0 or an integer >= 1 dividing n_routed_experts="
            f"{c.n_routed_experts}, got {c.expert_gather_chunk!r}"
        )
    if c.dispatch_capacity_factor is not None and not c.dispatch_capacity_factor > 0:
        raise ValueError(
            f"dispatch_capacity_factor must be > 0 or None, got {c.dispatch_capacity_factor}"
        )
    if not (c.routed_scaling_factor > 0 and math.isfinite(c.routed_scaling_factor)):
        raise ValueError(
            f"routed_scaling_factor must be a positive number, got {c.routed_scaling_factor}"
        )
    _non_negative(
        c,
        "aux_loss_alpha",
        "device_balance_alpha",
        "comm_balance_alpha",
        "seq_balance_alpha",
        "router_z_loss_coef",
        "expert_bias_update_rate",
    )


def _check_experts(c) -> None:
    """The routed experts' counts, groups and expert-parallel devices."""
    for name in (
        "n_routed_experts",
        "moe_intermediate_size",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
    ):
        _positive(c, name)
    if c.n_shared_experts < 0:
        raise ValueError(f"n_shared_experts must be >= 0, got {c.n_shared_experts}")
    if c.num_experts_per_tok > c.n_routed_experts:
        raise ValueError(
            f"num_experts_per_tok={c.num_experts_per_tok} exceeds "
            f"n_routed_experts={c.n_routed_experts}"
        )
    if c.n_routed_experts % c.n_group:
        raise ValueError(
            f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_group}"
        )
    if c.topk_group > c.n_group:
        raise ValueError(f"topk_group={c.topk_group} exceeds n_group={c.n_group}")
    per_group = c.n_routed_experts // c.n_group
    if c.topk_method == "noaux_tc" and per_group < 2:
        raise ValueError(
            "n_group: noaux_tc scores each group by its top-2 experts, so each group "
            f"needs >= 2 experts, got {per_group}"
        )
    grouped = c.topk_method != "greedy"
    if grouped and c.topk_group * per_group < c.num_experts_per_tok:
        raise ValueError(
            f"topk_group={c.topk_group} groups of {per_group} experts cannot hold "
            f"num_experts_per_tok={c.num_experts_per_tok}"
        )
    for name in ("expert_devices", "device_limit"):
        _positive(c, name, allow_none=True)
    if c.n_routed_experts % c.num_expert_devices:
        raise ValueError(
            f"expert_devices={c.num_expert_devices} does not divide "
            f"n_routed_experts={c.n_routed_experts}"
        )
    if c.num_device_limit > c.num_expert_devices:
        raise ValueError(
            f"device_limit={c.num_device_limit} exceeds expert_devices={c.num_expert_devices}"
        )


def _check_dsa(c) -> None:
    """The V3.2 lightning indexer (DeepSeek Sparse Attention) and its blocking."""
    _one_of(c, "index_attention", INDEX_ATTENTIONS)
    if not isinstance(c.index_n_heads, int) or c.index_n_heads < 0:
        raise ValueError(
            f"index_n_heads must be 0 (no indexer) or a positive integer, got {c.index_n_heads!r}"
        )
    if not c.index_n_heads:
        return
    for name in ("index_head_dim", "index_topk", "index_block_q", "index_block_k"):
        _positive(c, name)
    if (
        not isinstance(c.index_dense_max_len, int)
        or isinstance(c.index_dense_max_len, bool)
        or c.index_dense_max_len < 0
    ):
        raise ValueError(
            f"index_dense_max_len must be an integer >= 0, got {c.index_dense_max_len!r}"
        )
    if c.q_lora_rank is None:
        raise ValueError(
            "q_lora_rank: the V3.2 indexer (index_n_heads > 0) reads the "
            "MLA's query latent, so q_lora_rank must be set"
        )
    if c.index_head_dim < c.qk_rope_head_dim:
        raise ValueError(
            f"index_head_dim={c.index_head_dim} must be >= qk_rope_head_dim="
            f"{c.qk_rope_head_dim} (its first qk_rope_head_dim dims are roped)"
        )


def _check_execution(c) -> None:
    """Dtypes, rematerialisation and the layer scan."""
    _one_of(c, "dtype", DTYPES)
    _one_of(c, "param_dtype", DTYPES)
    _one_of(c, "remat_policy", REMAT_POLICIES)
    if c.scan_layers and c.moe_layer_freq != 1 and c.n_routed_experts:
        raise ValueError(
            "scan_layers needs runs of identical layers: moe_layer_freq must be 1, got "
            f"{c.moe_layer_freq}"
        )
