"""libtpu flags for host offload and FSDP collectives: merged into LIBTPU_INIT_ARGS, and
accepted by libtpu."""

import os
import subprocess
import sys
import textwrap

from mla_moe.train import tpu_flags


def test_offloading_policies_need_the_host_offload_flags():
    pod = tpu_flags.HOST_OFFLOAD_FLAGS + tpu_flags.COLLECTIVE_FLAGS
    assert tpu_flags.needed_flags("offload_layer_input") == pod
    assert tpu_flags.needed_flags("offload_layer_input", "v5p") == pod
    assert tpu_flags.needed_flags("offload_layer_input_attention_out")
    assert tpu_flags.needed_flags("full") == ()
    assert tpu_flags.needed_flags("none") == ()
    assert tpu_flags.needed_flags("none", "v5p") == ()


def test_ironwood_keeps_gathers_off_the_sparsecores():
    assert tpu_flags.needed_flags("none", "tpu7x") == tpu_flags.TPU7X_FLAGS
    both = tpu_flags.needed_flags("offload_layer_input", "tpu7x")
    assert both == tpu_flags.HOST_OFFLOAD_FLAGS + tpu_flags.TPU7X_FLAGS


def test_the_generation_comes_from_the_accelerator_type():
    assert tpu_flags.generation_from_env({"TPU_ACCELERATOR_TYPE": "tpu7x-128"}) == "tpu7x"
    assert tpu_flags.generation_from_env({"TPU_ACCELERATOR_TYPE": "v5p-1024"}) == "v5p"
    assert tpu_flags.generation_from_env({"TPU_ACCELERATOR_TYPE": "v5litepod-16"}) == "v5e"
    assert tpu_flags.generation_from_env({"TPU_ACCELERATOR_TYPE": "v3-8"}) is None
    assert tpu_flags.generation_from_env({"TPU_ACCELERATOR_TYPE": " "}) is None
    assert tpu_flags.generation_from_env({}) is None


def test_merged_keeps_the_users_value_and_adds_the_rest():
    user = "--xla_tpu_host_transfer_overlap_limit=2 --xla_tpu_scoped_vmem_limit_kib=65536"
    out = tpu_flags.merged(user, tpu_flags.HOST_OFFLOAD_FLAGS).split()
    assert out[:2] == user.split()
    assert "--xla_tpu_host_transfer_overlap_limit=24" not in out
    names = [f.split("=")[0] for f in out]
    assert len(names) == len(set(names))  # every flag once
    assert len(out) == len(tpu_flags.HOST_OFFLOAD_FLAGS) + 1
    assert tpu_flags.merged("", ()) == ""


def test_libtpu_accepts_the_flags():
    """libtpu aborts on a flag it does not know: start a compile-only topology with them and
    compile a host-offloading program."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax.ad_checkpoint import checkpoint_name
        from mla_moe.train import tpu_flags
        from pallas_kernels import targets
        tpu_flags.set_libtpu_flags("offload_layer_input")
        dev = targets.devices("tpu:v5p:2x2x1")[0]
        policy = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=("h",),
            offload_src="device", offload_dst="pinned_host")

        def loss(w, x):
            def body(x, w):
                x = checkpoint_name(x, "h")
                return jnp.tanh(x @ w), None
            y, _ = jax.lax.scan(jax.checkpoint(body, policy=policy), x, w)
            return y.sum()

        sh = jax.sharding.SingleDeviceSharding(dev)
        w = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32, sharding=sh)
        x = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=sh)
        compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
        print("host bytes", compiled.memory_analysis().host_temp_size_in_bytes)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               LIBTPU_INIT_ARGS="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host = int(proc.stdout.split("host bytes")[1])
    assert host >= 4 * 512 * 256 * 4  # the four saved [512, 256] f32 layer inputs


def test_libtpu_accepts_the_ironwood_flags():
    """The TPU7x flags start a compile-only tpu7x topology, a gather compiles under them, and
    the compiler holds a program to the HBM budget."""
    code = textwrap.dedent("""
        import os
        import jax, jax.numpy as jnp
        from mla_moe.train import tpu_flags
        from pallas_kernels import targets
        tpu_flags.set_libtpu_flags("none", "tpu7x")
        dev = targets.devices("tpu:tpu7x:2x2x1")[0]
        sh = jax.sharding.SingleDeviceSharding(dev)
        table = jax.ShapeDtypeStruct((4096, 512), jnp.bfloat16, sharding=sh)
        idx = jax.ShapeDtypeStruct((8192,), jnp.int32, sharding=sh)
        jax.jit(lambda t, i: jnp.take(t, i, axis=0)).lower(table, idx).compile()
        # The HBM budget reaches the compiler: 84 GiB (an f32 argument and two outputs of its
        # size), within the die's 94.75 GiB, exceeds it.
        n = 84 * 2**30 // 4 // 3
        big = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sh)
        try:
            jax.jit(lambda x: (x * 2.0, x + 1.0)).lower(big).compile()
            print("budget not enforced")
        except Exception as e:
            print("budget", str(e).splitlines()[0])
        print("flags", os.environ["LIBTPU_INIT_ARGS"])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               LIBTPU_INIT_ARGS="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("flags")[1].split() == list(tpu_flags.TPU7X_FLAGS)
    budget = proc.stdout.split("budget")[1].split("flags")[0]
    assert "RESOURCE_EXHAUSTED" in budget, budget
    assert f"({tpu_flags.TPU7X_HBM_BUDGET_MIB / 1024:.2f}G)" in budget, budget
