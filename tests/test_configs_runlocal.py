"""Every published preset has a `runlocal` variant: the same model at toy sizes, which trains
for two steps on a CPU (what the full-size run would do, short of its memory)."""

import importlib
import math

import pytest

from mla_moe.train import train

PRESETS = ["deepseek_v2_lite", "deepseek_v2", "deepseek_v3", "deepseek_v32"]


def _configs(name):
    module = importlib.import_module(f"configs.{name}")
    return module, module.get_config(), module.get_config("runlocal")


@pytest.mark.parametrize("name", PRESETS)
def test_runlocal_is_the_published_model_shrunk(name):
    module, published, local = _configs(name)
    shrunk = set(module.RUNLOCAL_SIZES)
    assert shrunk <= set(published.model)
    same = {k: v for k, v in published.model.items() if k not in shrunk}
    assert {k: local.model[k] for k in same} == same  # routing, scoring, YARN, MTP, remat...
    assert set(local.model) == set(published.model)
    # The q LoRA shrinks where the preset has one and stays absent where it does not.
    assert (local.model.q_lora_rank is None) == (published.model.q_lora_rank is None)
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        module.get_config("huge")


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_runlocal_trains_two_steps(name, tmp_path):
    local = _configs(name)[2]
    result = train(local, str(tmp_path / "w"))
    assert result.step == 2 and not result.preempted
    assert math.isfinite(result.last_record["loss"])
