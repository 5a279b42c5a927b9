"""Every test sees 8 simulated CPU devices and float32 matmuls at full precision."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile-only TPU tests load libtpu in each test worker.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Multi-device XLA:CPU programs reloaded from the persistent cache can deadlock
# (mla_moe.train.compilation_cache): this process never uses it, whatever the environment says.
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(request, tmp_path_factory):
    """A persistent XLA compilation cache for the training subprocesses the tests start (set
    through the environment they inherit), so that runs of one config compile once per test
    run. Each decides for itself with `mla_moe.train.compilation_cache`: one-device CPU runs use
    it, multi-device ones do not (nor this process, above). The directory is this run's own: in
    pytest's base temporary directory, the one xdist's local workers share (each has a
    `popen-gwN` directory in it), so runs at once do not share it."""
    base = tmp_path_factory.getbasetemp()
    worker = getattr(request.config, "workerinput", None)
    if worker is not None and base.name == f"popen-{worker['workerid']}":
        base = base.parent
    path = base / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JAX_COMPILATION_CACHE_DIR", str(path))
        env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        yield path


# The slowest tests (each a minute or more on 2 cores: multi-process runs, launcher runs,
# full-preset runlocal trainings, GPU kernel compiles), by file or node id prefix. They are
# collected first, so that `pytest -n 2` starts them early rather than leaving one worker
# running them alone at the end of the suite.
SLOW_FIRST = (
    "tests/test_multihost_preemption.py",
    "tests/test_launch_pod.py::test_tpu_vm_trains_on_two_fake_workers",
    "tests/test_launch_train.py::test_two_processes_match_one",
    "tests/test_configs_runlocal.py",
    "tests/test_launch_train.py::test_train_end_to_end_on_default_corpus",
    "tests/test_train_resume.py::test_ctrl_c_at_random_moments_of_saves_loses_nothing",
    "tests/test_multislice.py::test_two_slices_compile_and_only_sums_cross_them",
    "tests/test_train_resume.py::test_sigkill_then_resume_is_bitwise_identical",
    "tests/test_train_resume.py::test_sigkill_with_a_raw_source",
    "tests/test_aot_kernels.py::test_gpu_kernels_compile_within_shared_memory",
    "tests/test_context_parallel.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)),
                    len(SLOW_FIRST))
    items.sort(key=rank)  # stable: the rest keep their order
