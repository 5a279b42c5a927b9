"""--init_from_hf: training starts from the HuggingFace weights (and refuses a mismatch)."""

import pytest
from flax import nnx
from tolerance import assert_close_scaled
from train_helpers import micro_config, synthetic_store

from mla_moe import DeepSeekModel, ModelConfig
from mla_moe.hf import load_pretrained, save_pretrained
from mla_moe.train import ConfigError, train
from mla_moe.train.checkpoint import load_checkpoint


def test_training_starts_from_hf_weights(tmp_path):
    store = synthetic_store(str(tmp_path / "store"))
    # A vanishing learning rate and no decay: after one step the weights are the HF ones.
    config = micro_config(store, train=dict(steps=1, learning_rate=1e-12, weight_decay=0.0),
                          checkpoint=dict(every_steps=1))
    model_cfg = ModelConfig(**config.model.to_dict()).replace(initializer_range=0.3)
    hf_dir = tmp_path / "hf"
    save_pretrained(DeepSeekModel(model_cfg, rngs=nnx.Rngs(42)), hf_dir)
    train(config, str(tmp_path / "w"), init_from_hf=str(hf_dir))
    trained, step = load_checkpoint(str(tmp_path / "w"))
    assert step == 1
    assert_close_scaled(nnx.state(trained, nnx.Param),
                        nnx.state(load_pretrained(hf_dir), nnx.Param), rel=1e-8)

    other = micro_config(store)
    other.model.hidden_size = other.model.hidden_size * 2
    with pytest.raises(ConfigError, match="does not match the configured model"):
        train(other, str(tmp_path / "w2"), init_from_hf=str(hf_dir))
