"""launch.convert as a user runs it (no JAX_PLATFORMS, the aot extra's plugins installed): HF ->
HF rewrite (dtype), a training workdir -> HF without Orbax's log lines, and each mistake as one
`error:` line naming the flag, found before any weight is read."""

import json
import subprocess
import sys

import cli_output
import numpy as np
from hf_models import hf_logits, make_hf_model

import mla_moe
from mla_moe.hf import load_pretrained


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "launch.convert", *args], capture_output=True,
                          text=True, timeout=600, cwd=cli_output.ROOT, env=cli_output.user_env())


def _one_error(done, *names):
    errors = cli_output.lines(done.stderr)
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: ") and all(n in errors[0] for n in names), errors[0]


def test_hf_to_bfloat16_and_no_overwrite(tmp_path):
    hf = make_hf_model("v2_lite")
    hf.save_pretrained(tmp_path / "src")
    done = _convert(f"--hf={tmp_path / 'src'}", f"--output={tmp_path / 'out'}",
                    "--dtype=bfloat16")
    assert done.returncode == 0, done.stderr
    assert cli_output.lines(done.stderr) == [], done.stderr[-3000:]
    model = load_pretrained(tmp_path / "out")
    assert model.config.param_dtype == "bfloat16"
    assert model.embed_UD[...].dtype == np.dtype("bfloat16")
    tokens = np.random.default_rng(0).integers(0, 97, (1, 12))
    expected = hf_logits(hf, tokens)
    err = np.abs(np.asarray(model(tokens).logits) - expected)
    assert np.percentile(err, 90) < 0.05 * np.abs(expected).max()
    (tmp_path / "out" / "marker").write_text("keep")
    again = _convert(f"--hf={tmp_path / 'src'}", f"--output={tmp_path / 'out'}")
    _one_error(again, "--output=", "not empty", "--overwrite")
    assert (tmp_path / "out" / "marker").read_text() == "keep"


def _workdir(path):
    """A training workdir as launch.train lays it out: config.json and a checkpoint (step 4)."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from mla_moe.train import checkpoint as ckpt_lib

    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
               num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
               n_shared_experts=1, max_position_embeddings=128)
    model = mla_moe.DeepSeekModel(mla_moe.ModelConfig(**cfg), rngs=nnx.Rngs(1))
    _, params, extra = nnx.split(model, nnx.Param, ...)
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": cfg, "train": {"steps": 4}}))
    ckpt = ckpt_lib.Checkpointer(str(path / "checkpoints"), ml_collections.ConfigDict(
        dict(max_to_keep=1, keep_every_steps=0, async_save=False)))
    ckpt.save(4, {"step": jnp.int32(4), "params": params, "extra": extra,
                  "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)}}, None, force=True)
    ckpt.close()
    return model


def test_workdir_to_hf_is_quiet_and_mistakes_are_one_line(tmp_path):
    model = _workdir(tmp_path / "run")
    done = _convert(f"--checkpoint={tmp_path / 'run'}", f"--output={tmp_path / 'hf'}")
    assert done.returncode == 0, done.stderr[-3000:]
    # One line of its own, none of Orbax's INFO lines, none of the plugins' notices.
    assert cli_output.lines(done.stdout) == [f"wrote {tmp_path / 'hf'} from "
                                             f"{tmp_path / 'run'} step 4"]
    assert cli_output.lines(done.stderr) == [], done.stderr[-3000:]
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["hidden_size"] == model.config.hidden_size == 32
    assert list((tmp_path / "hf").glob("*.safetensors"))
    _one_error(_convert(f"--checkpoint={tmp_path / 'missing'}", f"--output={tmp_path / 'x'}"),
               "--checkpoint=", "missing")
    assert not (tmp_path / "x").exists()
