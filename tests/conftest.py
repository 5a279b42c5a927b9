"""Every test sees 8 simulated CPU devices and float32 matmuls at full precision."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile-only TPU tests load libtpu in each test worker.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Multi-device XLA:CPU programs reloaded from the persistent cache can deadlock
# (mla_moe.train.compilation_cache): this process never uses it, whatever the environment says.
jax.config.update("jax_enable_compilation_cache", False)
