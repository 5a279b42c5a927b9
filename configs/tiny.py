"""Tiny DeepSeek-V3-style model: every feature on, small enough for a laptop CPU."""

import ml_collections

import configs


def model_config(**changes) -> ml_collections.ConfigDict:
    """The tiny model's `ModelConfig` fields, with `changes` on top: the one home of the small
    V3-style model that bench/model_cpu.py and the tests' `model_configs.small_config` resize."""
    fields = dict(
        vocab_size=256,  # byte-level tokenizer
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_interleave=True,
        max_position_embeddings=2048,
        num_nextn_predict_layers=1,
        bos_token_id=None,
        eos_token_id=None,
        aux_loss_alpha=0.0,
        # V3 balances with a bias moved 0.001 a step and a sequence-wise loss of weight
        # 1e-4, tuned for ~15T tokens. From a random router every token picks the same
        # expert in most layers (max/mean 4.0 at step 10), and at that rate the bias needs
        # far more than this run's 150 steps to undo it (max/mean 2.4-3.7 at step 150).
        # Three times the rate and thirty times the weight balance the run by its end,
        # at no cost in validation loss over seeds 0-2 (the table in README's quickstart).
        seq_balance_alpha=0.003,
        expert_bias_update_rate=0.003,
        mtp_loss_weight=0.3,
    )
    fields.update(changes)
    return ml_collections.ConfigDict(fields)


def micro_model() -> ml_collections.ConfigDict:
    """Every feature of the tiny model (MLA with q LoRA, noaux_tc MoE with groups and shared
    expert, expert-bias update, MTP) at the smallest sizes that keep them meaningful."""
    return ml_collections.ConfigDict(
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            max_position_embeddings=256,
            num_nextn_predict_layers=1,
            bos_token_id=None,
            eos_token_id=None,
            aux_loss_alpha=0.0,
            seq_balance_alpha=1e-4,
            expert_bias_update_rate=1e-3,
            mtp_loss_weight=0.3,
        )
    )


def micro_config(data_path: str = "", **sections) -> ml_collections.ConfigDict:
    """A run of the micro model, seconds per few steps on one CPU core; `sections` update the
    run config's sections (e.g. `train=dict(steps=2)`)."""
    from mla_moe.train.config import run_config

    defaults = dict(
        train=dict(
            steps=6,
            batch_size=8,
            seq_len=32,
            learning_rate=3e-3,
            warmup_steps=2,
            eval_every_steps=0,
            eval_batches=1,
        ),
        data=dict(path=data_path, num_threads=1, prefetch=2),
        checkpoint=dict(every_steps=2, max_to_keep=10, async_save=True),
        log=dict(every_steps=1, tensorboard=True, peak_tflops=1.0),
        mesh=dict(data=-1, fsdp=1, expert=1, tensor=1),
    )
    for k, v in sections.items():
        defaults.setdefault(k, {}).update(v)
    return run_config(micro_model(), **defaults)


def _tiny_run() -> ml_collections.ConfigDict:
    from mla_moe.train.config import run_config

    return run_config(
        model_config(),
        train=dict(
            steps=150,
            batch_size=8,
            seq_len=128,
            learning_rate=3e-3,
            warmup_steps=15,
            eval_every_steps=50,
            eval_batches=2,
        ),
        checkpoint=dict(every_steps=50, max_to_keep=2),
        log=dict(every_steps=10),
        mesh=dict(data=-1, fsdp=1, expert=1, tensor=1),
    )


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """`--config=configs/tiny.py` trains on the bundled default corpus in a few minutes on a
    2-core CPU; `--config=configs/tiny.py:micro` is an even smaller model for launcher tests."""
    return configs.pick(__file__, variant, {"": _tiny_run, "micro": micro_config})
