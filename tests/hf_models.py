"""Tiny random HuggingFace DeepSeek models for the parity tests (built here, never downloaded)."""

from __future__ import annotations

import numpy as np

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.707, "mscale_all_dim": 0.707}

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
              num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=12, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)

# name -> (model_type, config kwargs)
HF_CONFIGS = {
    "v2_lite": ("deepseek_v2", dict(
        COMMON, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_group=1, topk_group=1,
        topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "v2": ("deepseek_v2", dict(
        COMMON, num_hidden_layers=2, q_lora_rank=48, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=16.0, norm_topk_prob=False,
        rope_parameters=dict(YARN))),
    "v3": ("deepseek_v3", dict(
        COMMON, num_hidden_layers=3, q_lora_rank=48, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, first_k_dense_replace=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0), num_nextn_predict_layers=0)),
    # V3.2: V3 plus a lightning indexer per layer; 8 indexer heads (few heads make exact
    # ReLU ties likely) and index_topk=8 < the tests' 24 tokens, so attention is sparse.
    "v32": ("deepseek_v32", dict(
        COMMON, num_hidden_layers=3, q_lora_rank=48, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
        index_n_heads=8, index_head_dim=16, index_topk=8)),
}


def make_hf_model(name: str, seed: int = 0):
    """A random float32 HF model; weights drawn wider than HF's init so routing and attention
    patterns are far from uniform, and (V3) a non-zero random correction bias."""
    import torch
    import transformers

    model_type, kwargs = HF_CONFIGS[name]
    cls_cfg = {"deepseek_v2": transformers.DeepseekV2Config,
               "deepseek_v3": transformers.DeepseekV3Config,
               "deepseek_v32": transformers.DeepseekV32Config}[model_type]
    cls_model = {"deepseek_v2": transformers.DeepseekV2ForCausalLM,
                 "deepseek_v3": transformers.DeepseekV3ForCausalLM,
                 "deepseek_v32": transformers.DeepseekV32ForCausalLM}[model_type]
    config = cls_cfg(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls_model(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms: around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / np.sqrt(p.shape[-1])))
        for mname, buf in model.named_buffers():
            if mname.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long))
    return out.logits.float().numpy()
