"""DeepSeek-V2 (236B total, 21B active), as published."""

import ml_collections

import configs

YARN = dict(
    type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=0.707,
    mscale_all_dim=0.707,
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
    expert_gather_chunk=8,
    bos_token_id=None,
    eos_token_id=None,
    num_hidden_layers=3,
    q_lora_rank=32,
)


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=102400,
            hidden_size=5120,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=60,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=160,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            n_group=8,
            topk_group=3,
            topk_method="group_limited_greedy",
            scoring_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            rope_theta=10000.0,
            rope_scaling=dict(YARN),
            rope_interleave=True,
            max_position_embeddings=163840,
            bos_token_id=100000,
            eos_token_id=100001,
            # The paper's balance coefficients (alpha_1..3) with D = 8 devices, M = 3.
            aux_loss_alpha=0.003,
            device_balance_alpha=0.05,
            comm_balance_alpha=0.02,
            expert_devices=8,
            device_limit=3,
            dtype="bfloat16",
        )
    )


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Published V2; run settings for a large pod (pure FSDP over every chip, dropless).

    `get_config("runlocal")`, i.e. `--config=configs/deepseek_v2.py:runlocal`: the same model
    at toy sizes, two training steps on a CPU.
    """
    model = model_config()
    # Each layer's input lives in host memory between the forward and the backward; the rest
    # of a layer is recomputed (launch.train / launch.compile set the libtpu flags for it).
    model.remat_policy = "offload_layer_input"
    # Dropless by construction: mesh.expert = 1, no token leaves its shard; each shard gathers
    # the experts' weights over FSDP inside the layer and runs its own T*K assignments through
    # the grouped matmul (megablox on TPU). V2's 160 experts are 7.5 GB of bf16 weights per
    # layer: 1.5 GB per chunk of 32.
    model.moe_dispatch = "auto"
    model.expert_gather_chunk = 32
    model.attention_impl = "auto"  # the Pallas kernels on TPU and GPU, XLA on CPU
    model.scan_layers = True  # one compiled layer per group: minutes, not hours, at 60 layers
    return configs.published(
        __file__,
        variant,
        model,
        RUNLOCAL_SIZES,
        train=configs.published_train(
            steps=500_000,
            batch_size=2304,
            seq_len=4096,
            learning_rate=2.4e-4,
            eval_every_steps=2000,
        ),
        checkpoint=dict(every_steps=1000, max_to_keep=3, keep_every_steps=20_000),
        log=dict(every_steps=10),
        mesh=dict(data=1, fsdp=-1, expert=1, tensor=1),
    )
