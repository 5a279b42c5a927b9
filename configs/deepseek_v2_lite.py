"""DeepSeek-V2-Lite (15.7B total, 2.4B active), as published."""

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
    bos_token_id=None,
    eos_token_id=None,
    num_hidden_layers=3,
)


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            scoring_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_theta=10000.0,
            rope_scaling=dict(YARN),
            rope_interleave=True,
            max_position_embeddings=163840,
            bos_token_id=100000,
            eos_token_id=100001,
            aux_loss_alpha=0.001,
            dtype="bfloat16",
        )
    )


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Published V2-Lite; run settings for a pod slice (pure FSDP over every chip, dropless).

    `get_config("runlocal")`, i.e. `--config=configs/deepseek_v2_lite.py:runlocal`: the same model
    at toy sizes, two training steps on a CPU.
    """
    model = model_config()
    # Each layer's input lives in host memory between the forward and the backward; the rest
    # of a layer is recomputed (launch.train / launch.compile set the libtpu flags for it).
    model.remat_policy = "offload_layer_input"
    # Dropless by construction: mesh.expert = 1, no token leaves its shard; each shard gathers
    # the experts' weights over FSDP inside the layer and runs its own T*K assignments through
    # the grouped matmul (megablox on TPU). V2-Lite's 64 experts are 1.1 GB of bf16 weights
    # per layer: gathered at once.
    model.moe_dispatch = "auto"
    model.expert_gather_chunk = 0
    model.attention_impl = "auto"  # the Pallas kernels on TPU and GPU, XLA on CPU
    model.scan_layers = True  # one compiled layer per group, not 27
    return configs.published(
        __file__,
        variant,
        model,
        RUNLOCAL_SIZES,
        train=configs.published_train(
            steps=100_000,
            batch_size=512,
            seq_len=4096,
            learning_rate=4.2e-4,
            eval_every_steps=1000,
        ),
        checkpoint=dict(every_steps=1000, max_to_keep=3, keep_every_steps=10_000),
        log=dict(every_steps=10),
        mesh=dict(data=1, fsdp=-1, expert=1, tensor=1),
    )
