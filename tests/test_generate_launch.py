"""`python -m launch.generate` end to end on a saved tiny HuggingFace model (V2-Lite style:
no q LoRA), called in-process through its absl `main`."""

import ast
import re

import numpy as np
import pytest
from absl import flags
from hf_models import make_hf_model

import mla_moe
from mla_moe.hf import load_pretrained


def test_launch_generate_greedy_byte_tokenizer(tmp_path, capsys):
    from launch import generate as launcher

    make_hf_model("v2_lite", seed=1).save_pretrained(tmp_path)
    argv = ["generate", f"--hf={tmp_path}", "--prompt=ABC", "--prompt=+-*/0", "--eos_id=-1",
            "--max_new_tokens=6"]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    launcher.main([argv[0]])
    out = capsys.readouterr().out
    assert re.search(r"run 0: 12 new tokens in [\d.]+ s = [\d.]+ tokens/s", out)
    printed = [ast.literal_eval(m) for m in re.findall(r"^tokens: (\[.*\])$", out, re.M)]
    texts = [ast.literal_eval(m) for m in re.findall(r"^('.*'|\".*\")$", out, re.M)]
    want = mla_moe.generate(load_pretrained(tmp_path), [[65, 66, 67], [43, 45, 42, 47, 48]],
                            max_new_tokens=6)
    assert printed == want
    assert texts == [bytes(row).decode("utf-8", errors="replace") for row in want]
    # Bad input is refused with a message naming the cause.
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["generate", f"--hf={tmp_path}", "--prompt=hello"])
    with pytest.raises(Exception, match="outside the model's vocab"):
        launcher.main(["generate"])


def test_launch_generate_on_a_mesh(tmp_path, capsys):
    """--mesh loads the HF weights into their shards and generates the same tokens; a mesh
    the model cannot use is refused before any weight is read, naming the axis."""
    from launch import generate as launcher

    make_hf_model("v2_lite", seed=1).save_pretrained(tmp_path)
    argv = ["generate", f"--hf={tmp_path}", "--prompt=ABC", "--prompt=+-*/0", "--eos_id=-1",
            "--max_new_tokens=6", "--mesh=data=2,expert=4"]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    launcher.main([argv[0]])
    out = capsys.readouterr().out
    assert "on data=2 x expert=4;" in out
    printed = [ast.literal_eval(m) for m in re.findall(r"^tokens: (\[.*\])$", out, re.M)]
    want = mla_moe.generate(load_pretrained(tmp_path), [[65, 66, 67], [43, 45, 42, 47, 48]],
                            max_new_tokens=6)
    assert printed == want
    for bad, match in (("--mesh=tensor=2,data=-1", "mesh.tensor=2 does not divide vocab_size=97"),
                       ("--mesh=experts=8", "unknown axis 'experts'"),
                       ("--mesh=expert=x", "needs an integer")):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["generate", f"--hf={tmp_path}", "--prompt=hi", bad])
        with pytest.raises(Exception, match=match):
            launcher.main(["generate"])


def test_load_checkpoint_reads_a_training_workdir(tmp_path):
    """A workdir laid out as launch/train.py writes it (config.json + Checkpointer state with
    step / params / extra / opt_state) loads back into the same model."""
    import json

    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from mla_moe.train import checkpoint as ckpt_lib
    from mla_moe.train.checkpoint import load_checkpoint

    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
               num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
               n_shared_experts=1, topk_method="noaux_tc", scoring_func="sigmoid", n_group=2,
               topk_group=2, norm_topk_prob=True, max_position_embeddings=256)
    model = mla_moe.DeepSeekModel(mla_moe.ModelConfig(**cfg), rngs=nnx.Rngs(3))
    _, params, extra = nnx.split(model, nnx.Param, ...)
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg, "train": {"steps": 9}}))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), ml_collections.ConfigDict(
        dict(max_to_keep=2, keep_every_steps=0, async_save=False)))
    state = {"step": jnp.int32(9), "params": params, "extra": extra,
             "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)}}
    ckpt.save(9, state, None, force=True)
    ckpt.close()
    loaded, step = load_checkpoint(str(tmp_path))
    assert step == 9 and loaded.config == model.config
    want, got = nnx.state(model), nnx.state(loaded)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
