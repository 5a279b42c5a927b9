"""The V3 aux-loss-free bias update over a whole model, which the train step applies after the
optimizer update.

`balance.update_expert_bias` is the rule for one router; this walks the model's routers. It
lives apart from balance.py because it needs the decoder, which imports balance.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from mla_moe.balance import update_expert_bias
from mla_moe.decoder import DeepSeekModel


def apply_expert_bias_update(
    model: DeepSeekModel, tokens_per_expert: Sequence[jax.Array], rate: float
) -> None:
    """Applies `update_expert_bias` in place to every noaux_tc router of `model`.

    `tokens_per_expert`: one [E] count per MoE layer, in the order of `model.moe_routers()` and
    `ModelOutput.router` (e.g. `[s.tokens_per_expert for s in out.router]`), ideally summed
    over all data shards.
    """
    for (router, idx), counts_E in zip(model.moe_routers(), tokens_per_expert, strict=True):
        bias = router.e_score_correction_bias
        if bias is None:
            continue
        if idx is None:
            bias[...] = update_expert_bias(bias[...], counts_E, rate)
        else:
            bias[...] = bias[...].at[idx].set(update_expert_bias(bias[...][idx], counts_E, rate))
