"""Meshes across TPU slices: `mesh.dcn_data` / `mesh.dcn_fsdp` lay the slices along the data
(or fsdp) axis, a size that does not match the slices is one error naming both numbers, and
the train step compiled for two v5p slices sends only gradient (and metric) sums across them."""

import json
import os
import subprocess
import sys

import pytest

import mla_moe
from configs import tiny
from mla_moe import sharding
from mla_moe.train import config as config_lib
from pallas_kernels import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _two_slices():
    return targets.devices(targets.parse_target("tpu:v5p:2x2x1", 2))


def test_slices_stack_along_the_data_axis():
    devices = _two_slices()
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, dcn_data=2), devices)
    assert dict(mesh.shape) == dict(data=4, fsdp=2, expert=1, context=1, tensor=1)
    slice_of = [[d.slice_index for d in row] for row in mesh.devices[:, :, 0, 0, 0]]
    assert slice_of == [[0, 0], [0, 0], [1, 1], [1, 1]]  # fsdp pairs never straddle slices
    across = sharding.make_mesh(dict(data=2, fsdp=2, dcn_fsdp=2), devices)
    assert dict(across.shape) == dict(data=2, fsdp=4, expert=1, context=1, tensor=1)
    assert [d.slice_index for d in across.devices[0, :, 0, 0, 0]] == [0, 0, 1, 1]


@pytest.mark.parametrize("mesh, message", [
    (dict(dcn_data=1), "mesh.dcn_data=1 x mesh.dcn_fsdp=1 spans 1 slice, but the devices form "
                       "2 slices"),
    (dict(dcn_data=4), "mesh.dcn_data=4 x mesh.dcn_fsdp=1 spans 4 slices, but the devices form "
                       "2 slices"),
    (dict(dcn_data=2, dcn_fsdp=2), "spans 4 slices, but the devices form 2 slices"),
])
def test_dcn_sizes_must_match_the_slices(mesh, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(dict(data=-1, **mesh), _two_slices())


def test_one_slice_refuses_dcn_axes():
    import jax

    with pytest.raises(ValueError, match=r"mesh.dcn_data=2 x mesh.dcn_fsdp=1 spans 2 slices, "
                                         r"but the devices form 1 slice \(1 process\)"):
        sharding.make_mesh(dict(data=-1, dcn_data=2), jax.devices())
    with pytest.raises(ValueError, match="mesh.dcn_fsdp must be a positive integer, got 0"):
        sharding.make_mesh(dict(data=-1, dcn_fsdp=0), jax.devices())


def test_single_slice_mesh_is_unchanged():
    import jax

    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2), jax.devices())
    plain = jax.make_mesh((2, 2, 2, 1, 1), sharding.MESH_AXES, devices=jax.devices())
    assert (mesh.devices == plain.devices).all()


def test_two_slices_compile_and_only_sums_cross_them(tmp_path):
    """The contract: launch.compile for two v5p:2x2x1 slices with mesh.dcn_data=2 fits, and
    the only transfers across slices are all-reduce sums at least as large as one slice's
    share of the gradients (each parameter's gradient is reduced over dcn_data). On the tiny
    preset's micro model: what crosses the slices does not depend on the model's size."""
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "src"), ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.compile", "--target=tpu:v5p:2x2x1", "--num_slices=2",
         "--config=configs/tiny.py:micro", "--config.mesh.dcn_data=2", f"--json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fits"] is True
    assert report["mesh"] == dict(data=8, fsdp=1, expert=1, context=1, tensor=1)
    assert "across slices (DCN)" in proc.stdout
    dcn = report["dcn_collectives"]
    assert set(dcn) == {"ALL_REDUCE/SUM"}, dcn
    params, _ = mla_moe.param_count(config_lib.model_config(tiny.get_config("micro")))
    # Within a slice the gradients are reduce-scattered over its 4 devices; each device then
    # sums its quarter (float32) with the other slice's.
    assert dcn["ALL_REDUCE/SUM"]["bytes"] >= params * 4 / 4
    assert report["collectives"]["all-to-all"]["count"] == 0
