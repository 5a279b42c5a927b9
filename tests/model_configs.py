"""Small ModelConfigs shared by the model tests."""

from mla_moe import ModelConfig

YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=32, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def small_config(**changes) -> ModelConfig:
    """V3-style: q LoRA, sigmoid noaux_tc with groups, a dense first layer, MTP off."""
    base = dict(
        vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4,
        topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_scaling=dict(YARN), max_position_embeddings=256,
        initializer_range=0.2, aux_loss_alpha=0.01, seq_balance_alpha=0.01,
        router_z_loss_coef=0.001, bos_token_id=None, eos_token_id=None,
    )
    base.update(changes)
    return ModelConfig(**base)
