"""`launch.train` with `--config.mesh.context=4`: the launcher's own path (flags, the mesh from
`mesh.*`, the token store's batches placed with each sequence split over `context`, the train
loop) gives the losses of the same run on one device."""

import json
import os
import subprocess
import sys

import numpy as np
from tolerance import assert_close_scaled
from train_helpers import synthetic_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# XLA:CPU's quick compile (the unit tests' FAST_COMPILE, as flags for a subprocess): the two
# runs compile in about half the time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _launch(store, workdir, devices, *overrides):
    """Starts `python -m launch.train` over `devices` CPU devices on the micro model cut to
    one MoE layer (its dense layer and MTP module would double the compile, and
    test_context_parallel.py's train step covers both under context): 3 steps of 8 x 32
    tokens from `store`, no evaluation, one checkpoint at the end."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(["src", ".", os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
    args = ["launch.train", "--config=configs/tiny.py:micro", f"--workdir={workdir}",
            f"--config.data.path={store}", f"--config.train.steps={STEPS}",
            "--config.train.seq_len=32", "--config.train.batch_size=8",
            "--config.model.num_hidden_layers=1", "--config.model.first_k_dense_replace=0",
            "--config.model.num_nextn_predict_layers=0", "--config.train.eval_batches=0",
            "--config.checkpoint.every_steps=100",
            "--config.log.every_steps=1", "--config.log.tensorboard=False", *overrides]
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_context_4_trains_like_one_device(tmp_path):
    """Data 1 x fsdp 2 x context 4 on 8 devices (each 32-token sequence in 4 shards of 8, the
    zigzag layout's chunks of 4) against one device, the two runs at once: the same loss and
    gradient norm at every step. Step 1 runs at learning rate 0 (warm-up), so step 2 sees the
    same weights and a moved expert bias, and step 3 one Adam update."""
    store = synthetic_store(str(tmp_path / "store"))
    runs = {"one": (1, ()), "context": (8, ("--config.mesh.context=4", "--config.mesh.fsdp=2"))}
    procs = {name: _launch(store, str(tmp_path / name), devices, *overrides)
             for name, (devices, overrides) in runs.items()}
    outs = {}
    try:
        for name, p in procs.items():
            outs[name] = p.communicate(timeout=400)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{outs[name][-3000:]}"
    assert "mesh {'data': 1, 'fsdp': 2, 'expert': 1, 'context': 4, 'tensor': 1}" in outs["context"]
    assert "mesh {'data': 1, 'fsdp': 1, 'expert': 1, 'context': 1, 'tensor': 1}" in outs["one"]
    keys = ("loss", "grad_norm")
    got, want = ({k: np.array([r[k] for r in _records(str(tmp_path / name))]) for k in keys}
                 for name in ("context", "one"))
    for name in runs:
        assert [r["step"] for r in _records(str(tmp_path / name))] == list(range(1, STEPS + 1))
    assert np.all(np.isfinite(want["loss"])) and want["loss"][-1] < want["loss"][0]  # it trains
    # float32 sums in another order (the attention over the gathered latent, the gradients
    # reduce-scattered over fsdp and context): 2^7 float32 roundings of the largest value, the
    # bound of test_context_parallel.py's gradients (measured: loss 4.3e-7, grad norm 0).
    assert_close_scaled(got, want, rel=2**7 * float(np.finfo(np.float32).eps))
