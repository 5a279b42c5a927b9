"""Small DeepSeek-V3-style model (~0.5B total, ~0.1B active) for one GPU or TPU host."""

import ml_collections

import configs


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=32768,  # a tokenizer.json of this size, or the byte tokenizer (256 used)
            hidden_size=768,
            intermediate_size=2048,
            moe_intermediate_size=256,
            num_hidden_layers=12,
            num_attention_heads=12,
            q_lora_rank=384,
            kv_lora_rank=256,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_routed_experts=64,
            n_shared_experts=1,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            n_group=8,
            topk_group=4,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            max_position_embeddings=4096,
            num_nextn_predict_layers=1,
            bos_token_id=None,
            eos_token_id=None,
            aux_loss_alpha=0.0,
            seq_balance_alpha=0.0001,
            expert_bias_update_rate=0.001,
            mtp_loss_weight=0.3,
            dtype="bfloat16",
            param_dtype="float32",
            remat_policy="dots",
            scan_layers=True,
            attention_impl="auto",
        )
    )


def _run() -> ml_collections.ConfigDict:
    from mla_moe.train.config import run_config

    return run_config(
        model_config(),
        train=dict(
            steps=20_000,
            batch_size=64,
            seq_len=2048,
            learning_rate=1e-3,
            warmup_steps=500,
            eval_every_steps=500,
            eval_batches=8,
        ),
        checkpoint=dict(every_steps=500, max_to_keep=3, keep_every_steps=5000),
        log=dict(every_steps=10),
        mesh=dict(data=1, fsdp=-1, expert=1, tensor=1),
    )


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """`--config=configs/small.py`: one accelerator host; no variants."""
    return configs.pick(__file__, variant, {"": _run})
