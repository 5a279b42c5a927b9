"""DeepSeek-V3 (671B total, 37B active; plus one MTP module), as published."""

import ml_collections

YARN = dict(
    type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
    beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
)

# `get_config("runlocal")`: the sizes that shrink; everything else stays as published.
RUNLOCAL_SIZES = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=16, bos_token_id=None, eos_token_id=None,
    num_hidden_layers=5, q_lora_rank=32,
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
    """Published V3; run settings for a large pod (64-way expert parallelism as in the paper).

    `get_config("runlocal")`, i.e. `--config=configs/deepseek_v3.py:runlocal`: the same model
    at toy sizes, two training steps on a CPU.
    """
    from mla_moe.train.config import run_config, runlocal_config

    model = model_config()
    # Per layer, only its input survives the forward pass ("full"). "save_attention_out" (V2,
    # V2-Lite) also keeps each layer's attention output, [tokens, 7168] bf16 per layer: 6.3 GiB
    # per chip at 2 x 4096 tokens over the 58 MoE layers, 93% of a v5p's HBM in all. Recomputing it
    # costs only the output projection once more: the backward recomputes the attention's
    # inside (projections, the kernel's forward) under either policy, to differentiate it.
    # That is 2 x 128 x 128 x 7168 FLOPs per token per layer, 14.3 GFLOPs per token over 61
    # layers: 5.7% of the model FLOPs (6N + attention, 250 GFLOPs per token at 4096), 4.5% of
    # what the step runs. "dots" would also keep every projection and expert matmul output
    # (V2-Lite at 4 x 4096 tokens per H100: 97 GiB of temporaries against 31 GiB).
    model.remat_policy = "full"
    # Expert parallelism 8 with top-8: the allgather dispatch that "auto" picks would run the
    # grouped matmuls over every assignment of the 8 gathered shards (EP*T*K rows, 14 GiB of
    # f32 expert outputs per layer at 8192 tokens per chip). The ragged all-to-all receives
    # at most 2 x the balanced share, T*K rows; past that (a shard's 32 experts drawing over
    # twice their share of a step's tokens) the lowest-scoring assignments are dropped.
    model.moe_dispatch = "ragged_all_to_all"
    model.dispatch_capacity_factor = 2.0
    model.attention_impl = "auto"  # the Pallas kernels on TPU and GPU, XLA on CPU
    model.scan_layers = True  # one compiled layer per group: minutes, not hours, at 61 layers
    if variant == "runlocal":
        return runlocal_config(model, RUNLOCAL_SIZES)
    if variant:
        raise ValueError(
            f"configs/deepseek_v3.py: unknown variant {variant!r} (known: 'runlocal')")
    return run_config(
        model,
        train=dict(steps=500_000, batch_size=15360, seq_len=4096, learning_rate=2.2e-4,
                   warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0,
                   eval_every_steps=2000, eval_batches=8),
        checkpoint=dict(every_steps=1000, max_to_keep=3, keep_every_steps=20_000),
        log=dict(every_steps=10),
        mesh=dict(data=1, fsdp=-1, expert=64, tensor=1),
    )
