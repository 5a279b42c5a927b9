"""DeepSeek-V3.2 (V3 plus a lightning indexer per layer: 671B + 0.85B; one MTP module), as
published, with the two DeepSeek Sparse Attention training stages of the V3.2-Exp report.

    --config=configs/deepseek_v32.py          sparse training (top-k on, every weight trains)
    --config=configs/deepseek_v32.py:warmup   dense warm-up (only the indexer trains)
    --config=configs/deepseek_v32.py:runlocal the same model at toy sizes, two steps on a CPU
    --config=configs/deepseek_v32.py:runlocal_warmup
"""

import functools

import configs
from configs import deepseek_v3

INDEXER = dict(index_n_heads=64, index_head_dim=128, index_topk=2048)
# Toy sizes: 8 indexer heads and a top-k of 16 below runlocal's 32-token sequences, so the
# sparse path runs.
RUNLOCAL_SIZES = dict(deepseek_v3.RUNLOCAL_SIZES, index_n_heads=8, index_head_dim=16, index_topk=16)
# The report's stages, from V3.1-Terminus at 128K context: warm-up 1000 steps x 16 x 128K
# tokens at lr 1e-3; sparse training 15,000 steps x 480 x 128K tokens at lr 7.3e-6.
STAGES = {
    "warmup": dict(
        dsa_stage="warmup", steps=1000, batch_size=16, learning_rate=1e-3, warmup_steps=100
    ),
    "sparse": dict(
        dsa_stage="sparse", steps=15_000, batch_size=480, learning_rate=7.3e-6, warmup_steps=100
    ),
}


def model_config():
    model = deepseek_v3.model_config()
    model.update(INDEXER)
    return model


# variant -> (the V3 variant it builds on, the training stage)
VARIANTS = {
    "": ("", "sparse"),
    "warmup": ("", "warmup"),
    "runlocal": ("runlocal", "sparse"),
    "runlocal_warmup": ("runlocal", "warmup"),
}


def _config(size: str, stage: str):
    config = deepseek_v3.get_config(size)
    config.model.update(INDEXER)
    if size == "runlocal":
        config.model.update(RUNLOCAL_SIZES)
        config.train.dsa_stage = STAGES[stage]["dsa_stage"]
        config.train.learning_rate = 3e-3 if stage == "warmup" else 3e-4
        return config
    config.train.update(STAGES[stage], seq_len=131072)
    return config


def get_config(variant: str = ""):
    builders = {v: functools.partial(_config, *args) for v, args in VARIANTS.items()}
    return configs.pick(__file__, variant, builders)
