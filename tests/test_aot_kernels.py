"""The kernels compile for real TPUs and GPUs, at DeepSeek-V3 shapes, on the real compilers.

libtpu (XLA:TPU + Mosaic) and the CUDA plugin (XLA:GPU + Triton; A100 sm_80, H100 sm_90a)
compile for compile-only devices (`pallas_kernels.targets`); nothing runs. H200 is the same
sm_90a with the same per-block shared memory (it differs in HBM only): its kernels are the
H100's, compiled by `python bench/kernels_tpu.py --compile_only`, not here.
Training: `mla_attention` forward + backward, H = V = 128, R = 64, N = 128 (16 for a
tensor-sharded slice), T = S from 1K to 64K. Decode: `latent_attention_cache` over the packed
512 + 64 latent cache, N = 128, T = 1 and 2, caches from 1K to 163,840 slots (V3's maximum),
batch 1 to 256.

Every TPU kernel must stay within half of its target's scoped VMEM limit, and, since K/V
stream block by block, its VMEM must not grow with the sequence: 4x more keys may cost at
most 25% more (Mosaic's pipeline bookkeeping grows a little with the grid).
Every GPU kernel's shared memory is read from the compiler's log and must be within the
per-block limit.
"""

import functools

import pytest

from pallas_kernels import aot, targets

TPU_TARGETS = ["tpu:v4:2x2x1", "tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v6e:2x2", "tpu:tpu7x:2x2x1"]
GPU_TARGETS = ["gpu:a100:1x1x1", "gpu:h100:1x1x1"]
TRAIN = {"N128-1K-packed": dict(b=1, t=1024, n=128, segments=True),
         "N16-16K": dict(b=1, t=16384, n=16), "N16-64K": dict(b=1, t=65536, n=16)}
DECODE = {"B1-T1-S160K": dict(b=1, t=1, s=163840), "B256-T2-S4K": dict(b=256, t=2, s=4096),
          "B8-T2-S32K": dict(b=8, t=2, s=32768), "B8-T2-S160K": dict(b=8, t=2, s=163840)}
# The same kernel at 4-5x the sequence (16K -> 64K keys, 32K -> 160K cache slots) may ask this
# factor more VMEM at most (measured: up to 1.13x, dk/dv on v6e); kernels holding K/V whole
# would ask 4-5x.
SEQUENCE_GROWTH = 1.25


@functools.cache
def _tpu(target, kind, case):
    shape = TRAIN[case] if kind == "mla" else DECODE[case]
    return aot.run_call(kind, target, **shape)


@pytest.mark.parametrize("target", TPU_TARGETS)
def test_tpu_kernels_compile_within_vmem(target):
    limit = aot.vmem_limit_bytes(targets.devices(target)[0].device_kind)
    want = {"mla": {"mla_attention_fwd", "mla_attention_dq", "mla_attention_dkv"},
            "latent": {"latent_attention_decode"}}
    for kind, cases in (("mla", TRAIN), ("latent", DECODE)):
        for case in cases:
            result = _tpu(target, kind, case)
            assert result["ok"], (target, case, result["error"])
            assert set(result["vmem"]) == want[kind], (target, case, result["vmem"])
            for name, used in result["vmem"].items():
                assert 0 < used <= limit // 2, (target, case, name, used, limit)


@pytest.mark.parametrize("target", TPU_TARGETS)
def test_tpu_vmem_does_not_grow_with_the_sequence(target):
    for kind, short, long in (("mla", "N16-16K", "N16-64K"),
                              ("latent", "B8-T2-S32K", "B8-T2-S160K")):
        a, b = _tpu(target, kind, short)["vmem"], _tpu(target, kind, long)["vmem"]
        for name in a:
            assert b[name] <= SEQUENCE_GROWTH * a[name], (target, name, a[name], b[name])


@pytest.mark.parametrize("target", TPU_TARGETS)
def test_tpu_decode_reads_the_cache_in_place(target):
    """The decode step's temporaries are the f32 split partials (at most two splits), not a
    relayout copy of the cache: the kernel reads the packed cache as XLA:TPU lays it out."""
    for case, shape in DECODE.items():
        result = _tpu(target, "latent", case)
        cache_bytes = shape["b"] * shape["s"] * (512 + 64) * 2
        partials_bytes = 2 * shape["b"] * shape["t"] * 128 * (512 + 1) * 4
        assert result["temp_bytes"] < partials_bytes + cache_bytes // 50, (
            target, case, result["temp_bytes"], cache_bytes)


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_kernels_compile_within_shared_memory(target):
    limit = aot.shared_memory_limit_bytes(targets.parse_target(target).chip)
    calls = ([dict(kind="mla", target=target, **shape) for shape in TRAIN.values()]
             + [dict(kind="latent", target=target, **shape) for shape in DECODE.values()])
    for call, result in zip(calls, aot.gpu_compile_log(calls), strict=True):
        assert result["ok"], (call, result["error"])
        # forward, dq and dk/dv; or the decode kernel
        assert len(result["shared_memory"]) == (3 if call["kind"] == "mla" else 1), result
        assert max(result["shared_memory"]) <= limit, (call, result["shared_memory"], limit)
        if call["kind"] == "latent":  # the packed cache is read in place, not copied
            cache_bytes = call["b"] * call["s"] * (512 + 64) * 2
            # f32 split partials: ~264 programs of 32 rows, or one split of all B * T * N rows
            partials_bytes = max(264 * 32, call["b"] * call["t"] * 128) * (512 + 1) * 4
            assert result["temp_bytes"] < partials_bytes + cache_bytes // 50, (
                call, result["temp_bytes"], cache_bytes)


# --- Sparse decode (DeepSeek-V3.2): `sparse_latent_attention_cache`, K = 2048 slots per query ---
# N = 128, C = 512, R = 64, over caches of 32K and 160K slots. Its VMEM holds K-blocks of
# gathered rows, never the cache: the same kernel at 5x the slots may ask SEQUENCE_GROWTH more
# at most (measured: equal). TPU7x reports the whole scoped limit as each kernel's VMEM
# (32 MiB, whatever the kernel needs), so there the kernel is compiled under half the limit
# instead, which it must fit (measured: it compiles under 4.9 MiB at S=160K, 5.5 MiB at B=64).
# On TPU the cache is held in the kernel's layout (`sparse_latent_attention_tpu.cache_layout`),
# so the temporaries must be the f32 split partials alone, no copy of the cache.
SPARSE_TPU_TARGETS = ["tpu:v5p:2x2x1", "tpu:v6e:2x2", "tpu:tpu7x:2x2x1"]
SPARSE_GPU_TARGETS = ["gpu:h100:1x1x1"]
SPARSE = {"B1-T1-S32K": dict(b=1, t=1, s=32768), "B1-T1-S160K": dict(b=1, t=1, s=163840),
          "B64-T2-S160K": dict(b=64, t=2, s=163840)}
_REPORTS_WHOLE_LIMIT = ("TPU7x",)


@functools.cache
def _sparse_tpu(target, case):
    kind = targets.devices(target)[0].device_kind
    limit = aot.vmem_limit_bytes(kind) // 2 if kind in _REPORTS_WHOLE_LIMIT else None
    return aot.run_call("sparse", target, **SPARSE[case], vmem_limit_bytes=limit)


def _sparse_partials_bytes(b, t, splits):
    """f32 split partials of the sparse decode: [B * T, O, N, C] outputs and their
    log-sum-exps, [.., 1] padded to 128 lanes."""
    return splits * b * t * 128 * (512 + 128) * 4


@pytest.mark.parametrize("target", SPARSE_TPU_TARGETS)
def test_tpu_sparse_decode_compiles_within_vmem(target):
    limit = aot.vmem_limit_bytes(targets.devices(target)[0].device_kind)
    for case, shape in SPARSE.items():
        result = _sparse_tpu(target, case)
        assert result["ok"], (target, case, result["error"])
        assert set(result["vmem"]) == {"sparse_latent_attention_decode"}, result["vmem"]
        used = result["vmem"]["sparse_latent_attention_decode"]
        assert 0 < used <= limit // 2, (target, case, used, limit)
        cache_bytes = shape["b"] * shape["s"] * (512 + 64) * 2
        # at most two splits (one per TensorCore) on TPU
        assert result["temp_bytes"] < _sparse_partials_bytes(shape["b"], shape["t"], 2) + (
            cache_bytes // 50), (target, case, result["temp_bytes"], cache_bytes)
    short = _sparse_tpu(target, "B1-T1-S32K")["vmem"]["sparse_latent_attention_decode"]
    long = _sparse_tpu(target, "B1-T1-S160K")["vmem"]["sparse_latent_attention_decode"]
    assert long <= SEQUENCE_GROWTH * short, (target, short, long)


@pytest.mark.parametrize("target", SPARSE_GPU_TARGETS)
def test_gpu_sparse_decode_compiles_within_shared_memory(target):
    limit = aot.shared_memory_limit_bytes(targets.parse_target(target).chip)
    calls = [dict(kind="sparse", target=target, **SPARSE[case])
             for case in ("B1-T1-S160K", "B64-T2-S160K")]
    for call, result in zip(calls, aot.gpu_compile_log(calls), strict=True):
        assert result["ok"], (call, result["error"])
        assert len(result["shared_memory"]) == 1, result  # the one sparse decode kernel
        assert max(result["shared_memory"]) <= limit, (call, result["shared_memory"], limit)
        cache_bytes = call["b"] * call["s"] * (512 + 64) * 2
        # ~264 programs of 32 rows, or one split of all B * T * N rows
        splits = max(1, 264 * 32 // (call["b"] * call["t"] * 128))
        assert result["temp_bytes"] < _sparse_partials_bytes(call["b"], call["t"], splits) + (
            cache_bytes // 50), (call, result["temp_bytes"], cache_bytes)
