"""The kernels lower for the real backends, checked on CPU by cross-platform jax.export.

Lowering runs the Pallas -> Mosaic TPU and Pallas -> Triton translations (block-shape rules,
supported ops, scalar/SMEM access) at DeepSeek-V3 shapes in bf16. It does not compile the
result (that happens in libtpu / Triton on the device), so it is a necessary check, not proof
that the kernels run on a TPU or GPU.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import latent_attention, mla_attention

SD = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
# The Triton custom call has no serialisation-compatibility guarantee; we never serialise.
DISABLED = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


# The GPU the Triton kernels lower for (its compute capability, sm_90): jax >= 0.11 asks for
# it on an abstract mesh when the host has no GPU; jax 0.10 assumed sm_90.
H100 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"))


def _lower(fn, platform, *args):
    export_fn = export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)
    if platform != "cuda":
        return export_fn(*args).mlir_module()
    with jax.sharding.use_abstract_mesh(H100):
        return export_fn(*args).mlir_module()


@pytest.mark.parametrize("implementation,platform,marker", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "xla.gpu.triton")])
def test_mla_attention_fwd_bwd_lowers(implementation, platform, marker):
    b, t, s, n, h, r, v = 1, 256, 384, 2, 128, 64, 128
    args = [SD((b, t, n, h), BF16), SD((b, t, n, r), BF16), SD((b, s, n, h), BF16),
            SD((b, s, r), BF16), SD((b, s, n, v), BF16), SD((b, t), jnp.int32),
            SD((b, s), jnp.int32)]

    def fwd_bwd(q_nope, q_pe, k_nope, k_pe, v_, q_seg, kv_seg):
        fn = lambda *a: mla_attention(*a, sm_scale=0.1, causal=True,  # noqa: E731
                                      segment_ids=(q_seg, kv_seg),
                                      implementation=implementation)
        out, vjp = jax.vjp(fn, q_nope, q_pe, k_nope, k_pe, v_)
        return out, vjp(out)

    module = _lower(fwd_bwd, platform, *args)
    assert module.count(marker) >= 3  # forward, dq and dk/dv kernels


@pytest.mark.parametrize("implementation,platform,marker", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "xla.gpu.triton")])
def test_latent_attention_lowers(implementation, platform, marker):
    b, t, s, n, c, r = 2, 2, 4096, 128, 512, 64
    args = [SD((b, t, n, c), BF16), SD((b, t, n, r), BF16), SD((b, s, c), BF16),
            SD((b, s, r), BF16), SD((b,), jnp.int32)]

    def decode(q_lat, q_pe, kv, k_pe, lengths):
        return latent_attention(q_lat, q_pe, kv, k_pe, lengths_B=lengths, sm_scale=0.1,
                                implementation=implementation)

    assert marker in _lower(decode, platform, *args)
