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
from mla_moe.mla import MLA
from mla_moe.moe import MoE, MoEOutput, MoEStats
from mla_moe.router import ExpertBias, Router, Routing

_SUBPACKAGES = ("data", "hf", "train")
_FROM_TRAIN = {"apply_expert_bias_update": "mla_moe.train.expert_bias"}


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"mla_moe.{name}")
    if name in _FROM_TRAIN:  # lives in mla_moe.train (it needs the decoder): on first use
        return getattr(importlib.import_module(_FROM_TRAIN[name]), name)
    raise AttributeError(f"module 'mla_moe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES) | set(_FROM_TRAIN))


__all__ = [
    "DeepSeekModel",
    "ExpertBias",
    "KVCache",
    "MLA",
    "MoE",
    "MoEOutput",
    "MoEStats",
    "ModelConfig",
    "ModelOutput",
    "RopeScaling",
    "Router",
    "Routing",
    "apply_expert_bias_update",
    "flops_per_token",
    "generate",
    "init_cache",
    "param_count",
    "update_expert_bias",
]
