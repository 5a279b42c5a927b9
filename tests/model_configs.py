"""Small ModelConfigs shared by the model tests."""

from configs import tiny
from mla_moe import ModelConfig

YARN = dict(
    type="yarn",
    factor=40.0,
    original_max_position_embeddings=32,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)


def small_config(**changes) -> ModelConfig:
    """The tiny model's layout (configs/tiny.py: q LoRA, sigmoid noaux_tc over 4 groups, a shared
    expert, a dense first layer) at test sizes, the value head dim unlike the qk one; with YaRN
    and every balance loss on, MTP and the expert-bias update off. `changes` go on top."""
    base = tiny.model_config(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        n_routed_experts=8,
        num_experts_per_tok=2,
        rope_scaling=dict(YARN),
        max_position_embeddings=256,
        num_nextn_predict_layers=0,
        initializer_range=0.2,
        aux_loss_alpha=0.01,
        seq_balance_alpha=0.01,
        router_z_loss_coef=0.001,
        expert_bias_update_rate=0.0,
    )
    return ModelConfig(**{**base.to_dict(), **changes})
