"""mla-moe: DeepSeek-style Multi-head Latent Attention and DeepSeekMoE models in JAX.

The model API is imported here; the subpackages `mla_moe.hf` (HuggingFace checkpoints),
`mla_moe.data` (tokenizers, token stores, input pipeline) and `mla_moe.train` (the trainer) are
imported on first use, so `import mla_moe` stays light and `mla_moe.hf.load_pretrained(...)`
works without a separate import.
"""

import importlib

from mla_moe.balance import update_expert_bias
from mla_moe.cache import KVCache, init_cache
from mla_moe.config import ModelConfig, RopeScaling
from mla_moe.counting import flops_per_token, param_count
from mla_moe.decoder import DeepSeekModel, ModelOutput
from mla_moe.generation import generate
from mla_moe.router import ExpertBias


def apply_expert_bias_update(model: DeepSeekModel, router_stats, rate: float) -> None:
    """Applies `update_expert_bias` in place to every noaux_tc router of `model`.

    `router_stats` is `ModelOutput.router` (one entry per MoE layer, same order as
    `model.moe_routers()`), ideally with counts summed over all data shards.
    """
    for (router, idx), stats in zip(model.moe_routers(), router_stats, strict=True):
        bias = router.e_score_correction_bias
        if bias is None:
            continue
        if idx is None:
            bias[...] = update_expert_bias(bias[...], stats["tokens_per_expert"], rate)
        else:
            bias[...] = bias[...].at[idx].set(
                update_expert_bias(bias[...][idx], stats["tokens_per_expert"], rate)
            )


_SUBPACKAGES = ("data", "hf", "train")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"mla_moe.{name}")
    raise AttributeError(f"module 'mla_moe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))


__all__ = [
    "DeepSeekModel",
    "ExpertBias",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "RopeScaling",
    "apply_expert_bias_update",
    "flops_per_token",
    "generate",
    "init_cache",
    "param_count",
    "update_expert_bias",
]
