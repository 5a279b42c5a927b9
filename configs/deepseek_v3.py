"""DeepSeek-V3 (671B total, 37B active; plus one MTP module), as published."""

import ml_collections

import configs

YARN = dict(
    type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)

# `get_config("runlocal")`: the sizes that shrink; everything else stays as published.
RUNLOCAL_SIZES = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=16,
    bos_token_id=None,
    eos_token_id=None,
    num_hidden_layers=5,
    q_lora_rank=32,
    expert_gather_chunk=8,
)


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            first_k_dense_replace=3,
            moe_layer_freq=1,
            n_group=8,
            topk_group=4,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_theta=10000.0,
            rope_scaling=dict(YARN),
            rope_interleave=True,
            max_position_embeddings=163840,
            num_nextn_predict_layers=1,
            bos_token_id=0,
            eos_token_id=1,
            aux_loss_alpha=0.0,
            seq_balance_alpha=0.0001,
            expert_bias_update_rate=0.001,
            mtp_loss_weight=0.3,
            dtype="bfloat16",
        )
    )


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Published V3; run settings for a large pod (pure FSDP over every chip, dropless).

    `get_config("runlocal")`, i.e. `--config=configs/deepseek_v3.py:runlocal`: the same model
    at toy sizes, two training steps on a CPU.
    """
    model = model_config()
    # Each layer's input lives in host memory between the forward and the backward; everything
    # else in a layer is recomputed. At 6 x 8192 tokens per v5p chip the 61 layer inputs are
    # 43 GB: on the host (448 GB for 4 chips) instead of HBM. launch.train and launch.compile
    # set the libtpu flags the offload needs (mla_moe.train.tpu_flags).
    model.remat_policy = "offload_layer_input"
    # Dropless by construction: mesh.expert = 1, so no token leaves its shard; every shard
    # gathers the experts' weights over FSDP inside the layer, 32 experts at a time (2.8 GB of
    # bf16 weights, and their gradient before its reduce-scatter, instead of 22.5 GB), and
    # runs its own T*K assignments through megablox (TPU). Its buffers are the shard's own
    # rows, whatever the routing. The cost is the weights' traffic, which the large per-chip
    # batch amortises (`launch.compile`'s estimate shows the ICI term).
    model.moe_dispatch = "auto"
    model.expert_gather_chunk = 32
    model.attention_impl = "auto"  # the Pallas kernels on TPU and GPU, XLA on CPU
    model.scan_layers = True  # one compiled layer per group: minutes, not hours, at 61 layers
    return configs.published(
        __file__,
        variant,
        model,
        RUNLOCAL_SIZES,
        train=configs.published_train(
            steps=500_000,
            batch_size=15360,
            seq_len=4096,
            learning_rate=2.2e-4,
            eval_every_steps=2000,
        ),
        checkpoint=dict(every_steps=1000, max_to_keep=3, keep_every_steps=20_000),
        log=dict(every_steps=10),
        mesh=dict(data=1, fsdp=-1, expert=1, tensor=1),
    )
