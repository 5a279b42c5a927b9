"""launch.convert: HF -> HF rewrite (dtype), and refusal to overwrite."""

import subprocess
import sys

import numpy as np
from hf_models import hf_logits, make_hf_model

from mla_moe.hf import load_pretrained


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "launch.convert", *args], capture_output=True,
                          text=True, timeout=600)


def test_hf_to_bfloat16_and_no_overwrite(tmp_path):
    hf = make_hf_model("v2_lite")
    hf.save_pretrained(tmp_path / "src")
    done = _convert(f"--hf={tmp_path / 'src'}", f"--output={tmp_path / 'out'}",
                    "--dtype=bfloat16")
    assert done.returncode == 0, done.stderr
    model = load_pretrained(tmp_path / "out")
    assert model.config.param_dtype == "bfloat16"
    assert model.embed_UD[...].dtype == np.dtype("bfloat16")
    tokens = np.random.default_rng(0).integers(0, 97, (1, 12))
    expected = hf_logits(hf, tokens)
    err = np.abs(np.asarray(model(tokens).logits) - expected)
    assert np.percentile(err, 90) < 0.05 * np.abs(expected).max()
    (tmp_path / "out" / "marker").write_text("keep")
    again = _convert(f"--hf={tmp_path / 'src'}", f"--output={tmp_path / 'out'}")
    assert again.returncode != 0 and "not empty" in again.stderr
    assert (tmp_path / "out" / "marker").read_text() == "keep"
