"""ModelConfig validation, HF round trips, published presets and exact counts."""

import importlib.util
import os

import pytest

from mla_moe import ModelConfig, flops_per_token, param_count
from mla_moe.counting import matmul_params_per_token

ROOT = os.path.dirname(os.path.dirname(__file__))


def preset_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def preset(name):
    return ModelConfig(**preset_module(name).get_config().model.to_dict())


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_experts_per_tok=80), "num_experts_per_tok"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=8, topk_group=9), "topk_group"),
        (dict(topk_method="best"), "topk_method"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(kv_lora_rank=-4), "kv_lora_rank"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(first_k_dense_replace=99), "first_k_dense_replace"),
        (dict(moe_impl="magic"), "moe_impl"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(dtype="int8"), "dtype"),
        (dict(remat_policy="some"), "remat_policy"),
        (dict(aux_loss_alpha=-1.0), "aux_loss_alpha"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(topk_method="noaux_tc", n_group=64, topk_group=8), "n_group"),
        (dict(expert_devices=5), "expert_devices"),
        (dict(n_group=8, topk_group=2, device_limit=9), "device_limit"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**changes)


def test_hf_round_trip_and_v5_rope_parameters():
    cfg = preset("deepseek_v3")
    hf = cfg.to_hf()
    assert hf["model_type"] == "deepseek_v3" and hf["rope_parameters"]["rope_type"] == "yarn"
    back = ModelConfig.from_hf(hf)
    assert back == cfg.replace(dtype=cfg.param_dtype)
    # transformers v5 style: rope_theta inside rope_parameters, no topk_method for V3.
    v5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta", "topk_method",
                                                   "scoring_func")}
    assert ModelConfig.from_hf(v5).rope_scaling == cfg.rope_scaling
    assert ModelConfig.from_hf(v5).topk_method == "noaux_tc"


def test_from_hf_reads_a_directory(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(preset("deepseek_v2").to_hf()))
    assert ModelConfig.from_hf(tmp_path).topk_method == "group_limited_greedy"


def test_mla_requires_equal_kv_heads():
    hf = preset("deepseek_v2_lite").to_hf()
    hf["num_key_value_heads"] = 8
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize(
    "name, total, active",
    [("deepseek_v2_lite", 15.7e9, 2.4e9), ("deepseek_v2", 236e9, 21e9),
     ("deepseek_v3", 671e9, 37e9)],
)
def test_published_parameter_counts(name, total, active):
    t, a = param_count(preset(name))
    # Totals match to the published digits. The active figures are given to two significant
    # digits and not rounded consistently (2.45B is quoted as 2.4B, 36.6B as 37B): within 2.5%.
    assert abs(t - total) <= (0.05e9 if total < 100e9 else 0.5e9), t
    assert abs(a - active) / active < 0.025, a


def test_published_preset_values():
    v3 = preset("deepseek_v3")
    assert (v3.n_routed_experts, v3.num_experts_per_tok) == (256, 8)
    assert (v3.n_group, v3.topk_group) == (8, 4)
    assert v3.kv_lora_rank + v3.qk_rope_head_dim == 576
    v2 = preset("deepseek_v2")
    assert (v2.n_routed_experts, v2.routed_scaling_factor, v2.topk_method) == (
        160, 16.0, "group_limited_greedy")
    lite = preset("deepseek_v2_lite")
    assert lite.q_lora_rank is None and lite.num_hidden_layers == 27


def test_flops_per_token_hand_count():
    cfg = ModelConfig(
        vocab_size=100, hidden_size=8, intermediate_size=16, moe_intermediate_size=4,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=6,
        qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=3, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    )
    # Layer 0 (dense): q 8*2*5=80, kv_a 8*8=64, kv_b 6*2*(3+3)=72, o 2*3*8=48, ffn 3*8*16=384.
    attn = 80 + 64 + 72 + 48
    dense = attn + 384
    # Layer 1 (MoE): router 8*4=32, 2 routed + 1 shared experts of 3*8*4=96 each.
    moe = attn + 32 + 3 * 96
    head = 100 * 8
    assert matmul_params_per_token(cfg) == dense + moe + head
    seq = 10
    attention = 3 * seq * 2 * (5 + 3) * 2  # 3 * T * N * (H + R + V) per layer, 2 layers
    assert flops_per_token(cfg, seq) == 6 * (dense + moe + head) + attention


def test_subpackages_are_reachable_from_the_package():
    import subprocess
    import sys

    code = ("import mla_moe; print(mla_moe.hf.load_pretrained.__name__, "
            "mla_moe.train.train.__name__, mla_moe.data.prepare.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["load_pretrained", "train", "prepare"]


def test_model_config_from_an_ml_collections_section():
    import ml_collections

    cfg = preset_module("tiny").get_config()
    cfg.model.rope_scaling = ml_collections.ConfigDict(
        dict(type="yarn", factor=4.0, original_max_position_embeddings=512))
    model = ModelConfig(**cfg.model)
    assert model.rope_scaling.factor == 4.0
    assert model.rope_scaling.original_max_position_embeddings == 512
    assert model.dtype == cfg.model.dtype == "float32"  # every field is in the config section


def test_fields_a_saved_config_leaves_out_take_their_defaults():
    from mla_moe.train.config import incompatible_fields

    saved = {"model": {"hidden_size": 64}}
    assert incompatible_fields(saved, {"model": {"hidden_size": 64, "moe_impl": "dropless",
                                                 "n_group": 1}}) == []
    assert incompatible_fields(saved, {"model": {"hidden_size": 64, "n_group": 2}}) == [
        "model.n_group: '<absent>' -> 2"]


def test_run_settings_a_saved_config_leaves_out_take_their_defaults():
    """A workdir written before a run setting existed resumes while the setting has its
    run_config default, and not once it differs."""
    import ml_collections

    from mla_moe.train.config import incompatible_fields, run_config

    saved = {"train": {"seq_len": 128}}
    default = run_config(ml_collections.ConfigDict()).train.moment_dtype
    assert incompatible_fields(saved, {"train": {"seq_len": 128, "moment_dtype": default}}) == []
    assert incompatible_fields(saved, {"train": {"seq_len": 128, "moment_dtype": "bfloat16"}}
                               ) == ["train.moment_dtype: '<absent>' -> 'bfloat16'"]
