"""launch.compile: the trainer's step compiled ahead of time for TPU v5p and H100 targets from
this CPU host (libtpu and the CUDA plugin compile; nothing runs), and the HLO collectives
table it reports."""

import json
import os
import re
import subprocess
import sys

import cli_output
import jax
import pytest

from configs import tiny
from mla_moe.train import aot, hlo_collectives
from pallas_kernels import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_KEYS = {"fits", "per_device_bytes", "hbm_capacity_bytes", "argument_bytes", "temp_bytes",
             "compile_s", "collectives", "mesh", "model_flops_per_step", "host_bytes",
             "host_ram_bytes", "limit_exceeded", "hbm_traffic_bytes",
             "compiler_bytes_accessed_once", "ici_bytes", "dcn_bytes", "estimate", "dropless"}
ESTIMATE_KEYS = {"kind", "compute_s", "hbm_s", "ici_s", "dcn_s", "host_s", "step_s_lower_bound",
                 "mfu_upper_bound", "peak_flops", "hbm_bandwidth", "ici_bandwidth",
                 "dcn_bandwidth", "host_bandwidth", "chip", "sources"}
MESH = dict(data=1, fsdp=2, expert=2, tensor=1)


def _tiny(**model):
    config = tiny.get_config("micro")
    config.mesh.update(MESH)
    config.train.update(batch_size=8, seq_len=128)
    for k, v in model.items():
        config.model[k] = v
    return config


def _entry_params(hlo: str) -> list[str]:
    """The per-device shapes of the entry computation's parameters (SPMD-partitioned HLO)."""
    return re.findall(r"= (\w+\[[\d,]*\])\S* parameter\(", hlo.split("ENTRY", 1)[1])


def _check_report(report, devices):
    d = report.to_json()
    assert JSON_KEYS <= set(d)
    assert d["fits"] and 0 < d["argument_bytes"] <= d["per_device_bytes"]
    assert d["per_device_bytes"] < d["hbm_capacity_bytes"] == targets.hbm_bytes(devices[0])
    assert d["mesh"] == {**MESH, "context": 1}
    assert d["state_bytes"] <= d["argument_bytes"]
    assert set(d["collectives"]) == set(hlo_collectives.KINDS)
    _check_estimate(d)
    json.dumps(d)


def _check_estimate(d):
    """The roofline block: its fields, the terms from the report's own figures, the bound."""
    est = d["estimate"]
    assert set(est) == ESTIMATE_KEYS
    assert est["kind"] == "lower bound from analysis, not a measurement"
    flops = d["model_flops_per_step"] / d["num_devices"]
    assert est["compute_s"] == flops / est["peak_flops"] > 0
    link = sum(r["bytes"] for r in d["collectives"].values())
    network = sum(r.get("network_bytes", 0) for r in d["collectives"].values())
    assert d["ici_bytes"] == pytest.approx(link - network) and d["ici_bytes"] > 0
    assert est["ici_s"] == d["ici_bytes"] / est["ici_bandwidth"]
    terms = [est[k] for k in ("compute_s", "hbm_s", "ici_s", "dcn_s", "host_s")]
    assert est["step_s_lower_bound"] == max(t for t in terms if t is not None)
    assert 0 < est["mfu_upper_bound"] <= 1
    assert est["hbm_s"] == d["hbm_traffic_bytes"] / est["hbm_bandwidth"] > 0
    if d["compiler_bytes_accessed_once"] is not None:  # TPU: the compiler's own count
        assert d["compiler_bytes_accessed_once"] > 0
    assert d["host_bytes"] == 0 and d["host_ram_bytes"] > 0 and d["limit_exceeded"] == ""


def _check_batch_split_over_expert(hlo: str):
    # The batch [8, 128] enters split 4 ways (fsdp x expert), not 2 (fsdp alone).
    params = _entry_params(hlo)
    assert params.count("s32[2,128]") == 4 and "f32[2,128]" in params, params
    assert "s32[4,128]" not in params


def test_tpu_v5p_train_step():
    """fsdp=2 x expert=2 on v5p:2x2x1 with attention_impl=auto: the Pallas attention kernels
    (Mosaic custom calls, forward and backward) run inside the mesh's shard_map."""
    devices = targets.devices("tpu:v5p:2x2x1")
    report, compiled = aot.compile_train(_tiny(attention_impl="auto"), devices,
                                         target="tpu:v5p:2x2x1")
    _check_report(report, devices)
    hlo = compiled.as_text()
    _check_batch_split_over_expert(hlo)
    # FSDP gathers the weights; the grads are reduce-scattered back.
    assert report.collectives["all-gather"]["count"] > 0
    assert report.collectives["reduce-scatter"]["count"] > 0
    calls = [ln for ln in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in ln]
    for kernel in ("mla_attention_fwd", "mla_attention_dq", "mla_attention_dkv"):
        assert any(kernel in ln for ln in calls), kernel
    # The experts' grouped matmuls are megablox kernels inside the MoE shard_map; nothing
    # can be dropped (expert=2 with top-2 and more: the allgather exchange).
    assert any("gmm" in ln for ln in calls) and any("tgmm" in ln for ln in calls)
    assert report.dropless


def test_gpu_h100_train_step():
    devices = targets.devices("gpu:h100:1x1x8")
    # The tiny preset, not micro: XLA:GPU finds no Triton tiling for some of micro's dots.
    config = tiny.get_config()
    config.mesh.update(data=2, fsdp=2, expert=2)
    config.train.update(batch_size=8, seq_len=128)
    # The tests' "highest" f32 matmul precision trips XLA:GPU's Triton tiling; runs use default.
    with jax.default_matmul_precision("default"):
        report, compiled = aot.compile_train(config, devices, target="gpu:h100:1x1x8")
    d = report.to_json()
    assert JSON_KEYS <= set(d) and d["fits"]
    assert d["hbm_capacity_bytes"] == targets.hbm_bytes(devices[0]) > 79 * 2**30
    assert d["device_kind"].startswith("NVIDIA H100")
    _check_estimate(d)
    # No cost analysis on GPU: the HBM term is the HLO walk's alone.
    assert d["compiler_bytes_accessed_once"] is None and d["estimate"]["chip"] == "NVIDIA H100"
    params = _entry_params(compiled.as_text())
    assert params.count("s32[1,128]") == 4, params  # 8 sequences over 2 x 2 x 2


def _launch(*args, tmp_path, python=("-m", "launch.compile")):
    """launch.compile as a user runs it (cli_output.user_env); `python`: what runs it."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, *python, "--config=configs/tiny.py:micro",
           "--target=tpu:v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=2",
           "--config.mesh.expert=2", f"--json={out}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_output.user_env(), capture_output=True,
                          text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _one_error(proc, start):
    errors = cli_output.lines(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(start), errors[0]
    return errors[0]


def test_out_of_memory_is_a_result(tmp_path):
    """A batch far beyond HBM: fits false, required > available bytes, exit 3, no traceback."""
    proc, report = _launch("--config.train.batch_size=1048576", "--config.train.seq_len=256",
                           tmp_path=tmp_path)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DOES NOT FIT" in proc.stdout
    # libtpu, opened for a compile-only topology on a host without TPUs, and the CUDA plugin
    # say nothing.
    assert cli_output.noise(proc.stderr) == [], proc.stderr[-3000:]
    assert report["fits"] is False
    assert report["per_device_bytes"] > report["hbm_capacity_bytes"] > 90 * 2**30
    assert JSON_KEYS <= set(report) and report["limit_exceeded"] == "HBM"


def test_decode_step_compiles_with_the_latent_kernel(tmp_path):
    """--what=decode: the absorbed decode step at a given cache length on fsdp x expert, with
    the Pallas latent kernel (a Mosaic call) reading the cache."""
    proc, report = _launch("--what=decode", "--cache_length=256",
                           "--config.model.attention_impl=auto", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert report["fits"] and JSON_KEYS <= set(report)
    assert "decode step" in proc.stdout and "cache 256 tokens" in proc.stdout
    _check_estimate(report)
    assert "roofline estimate (lower bound from analysis, not a measurement)" in proc.stdout
    _, compiled = aot.compile_decode(_tiny(attention_impl="auto"),
                                     targets.devices("tpu:v5p:2x2x1"), cache_length=256)
    assert "latent_attention_decode" in compiled.as_text()


def test_bad_target_is_one_line(tmp_path):
    proc, report = _launch("--target=tpu:v9:2x2x1", tmp_path=tmp_path)
    assert report is None
    _one_error(proc, "error: --target 'tpu:v9:2x2x1': unknown tpu 'v9'")


def test_misspelt_override_is_one_line(tmp_path):
    proc, _ = _launch("--config.train.stesp=3", tmp_path=tmp_path)
    _one_error(proc, "error: --config.train.stesp: train has no field 'stesp'; did you mean "
                     "--config.train.steps?")


def test_a_target_without_its_compiler_names_the_extra(tmp_path):
    """Without libtpu (as before `pip install -e '.[aot]'`): one line naming the extra."""
    hide = ("import runpy, sys; sys.modules['libtpu'] = None; "
            "runpy.run_module('launch.compile', run_name='__main__', alter_sys=True)")
    proc, _ = _launch(tmp_path=tmp_path, python=("-c", hide))
    error = _one_error(proc, "error: --target=tpu:v5p:2x2x1: compiling for TPUs needs libtpu")
    assert error.endswith("install the aot extra: pip install -e '.[aot]'")


_HLO = """\
HloModule m, num_partitions=4

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %x), dimensions={0}
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%cond2 (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%body2 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %cp = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(f32[8]{0} %x)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, backend_config=TRIP
  %w2 = (s32[], f32[8]{0}) while(%t0), condition=%cond2, body=%body2
  %r = bf16[4,16]{1,0:T(8,128)(2,1)} reduce-scatter(bf16[16,16]{1,0} %y), dimensions={0}
  ROOT %o = f32[8]{0} get-tuple-element(%w), index=1
}
""".replace("TRIP", '{"known_trip_count":{"n":"61"}}')


def test_collectives_count_loop_iterations():
    """Over the module's 4 devices, per run: the all-gather's 32-byte result arrives 3/4 over
    links, the all-reduce's 32 bytes twice 3/4, the reduce-scatter's 512-byte input 3/4, the
    permute's 32 bytes whole."""
    table = hlo_collectives.collectives(_HLO)
    assert table["all-gather"] == {"count": 61, "bytes": 61 * 24.0, "array_bytes": 61 * 32.0,
                                   "ops": 1}
    assert table["all-reduce"] == {"count": 61, "bytes": 61 * 48.0, "array_bytes": 61 * 32.0,
                                   "ops": 1}
    assert table["reduce-scatter"] == {"count": 1, "bytes": 384.0, "array_bytes": 512.0,
                                       "ops": 1}
    assert table["collective-permute"] == {"count": 3, "bytes": 3 * 32.0,
                                           "array_bytes": 3 * 32.0, "ops": 1}
    assert table["all-to-all"]["count"] == 0


# A collective offloaded to the SparseCore (TPU7x, v5p): an async call of a computation whose
# closing brace carries its execution thread, called from the layer loop's body.
_SPARSECORE = """\
HloModule m, num_partitions=8

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[]{:T(128)S(7)} parameter(0)
  %y = f32[]{:T(128)S(7)} parameter(1)
  ROOT %s = f32[]{:T(128)S(7)} add(%x, %y)
}, execution_thread="sparsecore"

%called_computation.1 (p0: f32[128,16], p1: token[]) -> f32[16,16] {
  %p1 = token[] parameter(1)
  %p0 = f32[128,16]{1,0:T(8,128)} parameter(0)
  ROOT %rs = f32[16,16]{1,0:T(8,128)} reduce-scatter(%p0), channel_id=1, dimensions={0}, to_apply=%sum
}, execution_thread="sparsecore"

%body (p: (s32[], f32[128,16])) -> (s32[], f32[128,16]) {
  %p = (s32[], f32[128,16]{1,0}) parameter(0)
  %g = f32[128,16]{1,0} get-tuple-element(%p), index=1
  %tok = token[] after-all()
  %cs = ((f32[128,16]{1,0}, token[]), f32[16,16]{1,0}) call-start(%g, %tok), async_execution_thread="sparsecore", to_apply=%called_computation.1
  %cd = f32[16,16]{1,0} call-done(%cs)
  ROOT %t = (s32[], f32[128,16]{1,0}) tuple(%i, %g)
}

%cond (q: (s32[], f32[128,16])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[128,16]) -> f32[128,16] {
  %a = f32[128,16]{1,0} parameter(0)
  %w = (s32[], f32[128,16]{1,0}) while(%t0), condition=%cond, body=%body, backend_config=TRIP
  ROOT %o = f32[128,16]{1,0} get-tuple-element(%w), index=1
}
""".replace("TRIP", '{"known_trip_count":{"n":"3"}}')  # noqa: E501 - HLO instructions are one line each


def test_collectives_offloaded_to_the_sparsecore_count_per_iteration():
    table = hlo_collectives.collectives(_SPARSECORE)
    full = 128 * 16 * 4.0  # the input scattered over 8 devices: 7/8 of it arrives
    assert table["reduce-scatter"] == {"count": 3, "bytes": 3 * full * 7 / 8,
                                       "array_bytes": 3 * full, "ops": 1}


# The MoE dispatch and combine as compiled TPU modules print them: operands by name only, the
# receive buffer sized at twice the balanced share (dispatch) or at the rows sent (combine).
_RAGGED = """\
HloModule m, num_partitions=2

ENTRY %main (a: bf16[64,128]) -> bf16[64,128] {
  %a = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %buf = bf16[128,128]{1,0} broadcast(%z), dimensions={}
  %o = s32[8]{0} parameter(1)
  %dispatch = bf16[128,128]{1,0:T(8,128)(2,1)} ragged-all-to-all(%a, %buf, %o, %o, %o, /*index=5*/%o), channel_id=1, replica_groups={{0,1}}
  %back = bf16[64,128]{1,0} broadcast(%z), dimensions={}
  %combine = bf16[64,128]{1,0} ragged-all-to-all(%dispatch, %back, %o, %o, %o, %o), channel_id=2
  %inline = f32[16,4]{1,0} ragged-all-to-all(f32[8,4]{1,0} %x, f32[16,4]{1,0} %y, s32[2]{0} %o1, s32[2]{0} %o2, s32[2]{0} %o3, s32[2]{0} %o4)
  %start = ((bf16[256,8]{1,0}, bf16[32,8]{1,0}, s64[8]{0}, s64[8]{0}, s64[8]{0}, /*index=5*/s64[8]{0}), bf16[32,8]{1,0}) ragged-all-to-all-start(%g, %h, %o, %o, %o, /*index=5*/%o), channel_id=3
  ROOT %done = bf16[32,8]{1,0} ragged-all-to-all-done(%start)
}
"""  # noqa: E501 - HLO instructions are one line each


def test_ragged_all_to_all_counts_bytes_sent_not_the_receive_buffer():
    row = hlo_collectives.collectives(_RAGGED)["ragged-all-to-all"]
    # dispatch: the 64-row input (not the 128-row buffer); combine: the 64-row result (not the
    # 128-row input); inline operand types: the 8-row input; the async form (GPU), whose
    # result is ((operands), output): the 32-row output, not the 256-row input.
    sent = 64 * 128 * 2.0 * 2 + 8 * 4 * 4.0 + 32 * 8 * 2.0
    assert row == {"count": 4, "bytes": sent / 2, "array_bytes": sent, "ops": 4}  # 2 devices


@pytest.mark.parametrize("message, want", [
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 105.93G of 95.74G hbm.",
     (int(105.93 * 2**30), int(95.74 * 2**30), "hbm")),
    ("RESOURCE_EXHAUSTED: CompileTimeScopedVmemOom ... 20.31M and limit 16.00M",
     (int(20.31 * 2**20), int(16.0 * 2**20), "vmem")),
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (2.10T) exceeds available HBM (95.74G).",
     (int(2.10 * 2**40), int(95.74 * 2**30), "hbm")),
    ("INVALID_ARGUMENT: something else", None),
])
def test_out_of_memory_messages(message, want):
    assert aot.out_of_memory(RuntimeError(message)) == want
