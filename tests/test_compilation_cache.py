"""The persistent compilation cache: used by one-device CPU runs, kept off for multi-device CPU
jobs, whose reloaded programs with collectives can deadlock."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from mla_moe.train.compilation_cache import (
    cache_is_safe,
    disable_where_unsafe,
    enable_compilation_cache,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_cache_config():
    keys = ["jax_compilation_cache_dir", "jax_enable_compilation_cache"]
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_only_one_device_cpu_programs_count_as_safe():
    assert jax.default_backend() == "cpu" and jax.device_count() == 8
    assert cache_is_safe(1)
    assert not cache_is_safe(2) and not cache_is_safe(8) and not cache_is_safe()


def test_multi_device_cpu_job_keeps_the_cache_off(tmp_path, restore_cache_config):
    jax.config.update("jax_enable_compilation_cache", True)
    assert enable_compilation_cache(str(tmp_path / "cache")) is None
    assert not jax.config.jax_enable_compilation_cache
    assert not (tmp_path / "cache").exists()


def test_train_turns_a_configured_cache_off_for_several_devices(tmp_path, restore_cache_config):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_enable_compilation_cache", True)
    assert not disable_where_unsafe(1)
    assert jax.config.jax_enable_compilation_cache
    assert disable_where_unsafe(8)
    assert not jax.config.jax_enable_compilation_cache
    assert not disable_where_unsafe(8)  # already off


def test_one_device_cpu_run_writes_the_cache(tmp_path):
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from mla_moe.train.compilation_cache import enable_compilation_cache
        print(enable_compilation_cache({str(tmp_path / "c")!r}, min_compile_time_secs=0,
                                       min_entry_size_bytes=0))
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "c")
    assert os.listdir(tmp_path / "c")  # the compiled program was stored
