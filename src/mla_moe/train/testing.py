"""Helpers for tests and benchmarks: a very small run config and small token stores."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from mla_moe.data import token_store
from mla_moe.train.config import run_config


def micro_model() -> ml_collections.ConfigDict:
    """Every feature of the tiny config (MLA with q LoRA, noaux_tc MoE with groups and shared
    expert, expert-bias update, MTP) at the smallest sizes that keep them meaningful."""
    return ml_collections.ConfigDict(dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
        topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, max_position_embeddings=256, num_nextn_predict_layers=1,
        bos_token_id=None, eos_token_id=None, aux_loss_alpha=0.0, seq_balance_alpha=1e-4,
        expert_bias_update_rate=1e-3, mtp_loss_weight=0.3,
    ))


def micro_config(data_path: str = "", **sections) -> ml_collections.ConfigDict:
    """A run of the micro model: seconds per few steps on one CPU core."""
    defaults = dict(
        train=dict(steps=6, batch_size=8, seq_len=32, learning_rate=3e-3, warmup_steps=2,
                   eval_every_steps=0, eval_batches=1),
        data=dict(path=data_path, num_threads=1, prefetch=2),
        checkpoint=dict(every_steps=2, max_to_keep=10, async_save=True),
        log=dict(every_steps=1, tensorboard=True, peak_tflops=1.0),
        mesh=dict(data=-1, fsdp=1, expert=1, tensor=1),
    )
    for k, v in sections.items():
        defaults.setdefault(k, {}).update(v)
    return run_config(micro_model(), **defaults)


def synthetic_store(path: str, num_docs: int = 40, doc_len: int = 300, seed: int = 0) -> str:
    """A byte-vocabulary store of random documents with a learnable pattern (token i+1 often
    follows token i), written to `path`."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(doc_len // 2, doc_len * 3 // 2))
        start = rng.integers(0, 256)
        steps = np.where(rng.random(n) < 0.7, 1, rng.integers(0, 256, n))
        docs.append(((start + np.cumsum(steps)) % 256).astype(np.uint8))
    token_store.write_store(
        path, {"train": docs[:-4], "val": docs[-4:]}, tokenizer="byte", vocab_size=256,
        source="synthetic",
    )
    return os.path.abspath(path)


def enable_compilation_cache(path: str | None = None) -> str:
    """Persistent XLA compilation cache (also for subprocesses, through the environment), so
    repeated test runs of one config compile once."""
    import tempfile

    import jax

    path = path or os.path.join(tempfile.gettempdir(), "mla_moe_test_jax_cache")
    os.makedirs(path, exist_ok=True)
    settings = {
        "jax_compilation_cache_dir": path,
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for k, v in settings.items():
        jax.config.update(k, v)
        os.environ[k.upper()] = str(v)
    return path


def sigterm_at(step: int):
    """A trainer hook that sends this process SIGTERM after `step` (a simulated preemption)."""
    import signal

    def hook(s, metrics):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook
