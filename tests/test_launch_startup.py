"""launch.startup: which lines are held back (only the plugins' start-up notices: a real error
shows), when the platform is chosen, and --verbosity bringing the notices back."""

import os
import subprocess
import sys

import cli_output

from launch import startup

# What jax 0.10.2 with the aot extra's plugins prints on a host without a TPU or GPU.
NOTICES = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796657480.696633   16585 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so may not properly initialize.
WARNING: Logging before InitGoogle() is written to STDERR
E0000 00:00:1796657549.907927   17894 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker hostname 'WARNING: could not determine TPU worker hostnames or IP addresses' from env var TPU_WORKER_HOSTNAMES. Expecting a valid hostname or IP address without port number.
=== Source Location Trace: ===<SP>
learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327
""".replace("<SP>", " ")  # noqa: E501 - the lines as printed (one ends in a space)


def test_only_the_notices_are_held_back():
    assert startup.without_noise(NOTICES) == ""
    real = ("E0000 00:00:1.0   1 tpu_client.cc:12] INTERNAL: TPU initialization failed\n"
            "learning/45eac/tfrc/runtime/tpu_client.cc:99\n"
            "Traceback (most recent call last):\n")
    assert startup.without_noise(NOTICES + real + NOTICES) == real
    # A source line is held only as part of a held E-line's trace.
    assert startup.without_noise("xla/service/foo.cc:12\n") == "xla/service/foo.cc:12\n"


def test_verbosity_flags():
    assert startup.verbose(["x", "--verbosity=0"]) and startup.verbose(["x", "-v", "1"])
    assert startup.verbose(["x", "--v=1"]) and startup.verbose(["x", "--verbosity", "1"])
    assert not startup.verbose(["x", "--value=1", "--config.v=1", "--vocab=2"])


def test_held_stderr_writes_back_the_rest(capfd):
    with startup.held_stderr():
        os.write(2, NOTICES.encode() + b"a real warning\n")  # as native code writes
    assert capfd.readouterr().err == "a real warning\n"


def test_verbosity_brings_the_notices_back():
    """With --verbosity jax starts as without launch.startup: the CUDA plugin's notices show
    (the test extra installs it); without, test_bad_input and the launch tests see none."""
    out = subprocess.run([sys.executable, "-m", "launch.pod", "--verbosity=0"], cwd=cli_output.ROOT,
                         env=cli_output.user_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Could not find cuda drivers" in out.stderr, out.stderr
    assert cli_output.lines(out.stderr)[-1].startswith("error: expected one subcommand")
