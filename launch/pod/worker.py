"""What runs on each TPU VM host: `launch.train` under a small supervisor.

    python3 -m launch.pod.worker --config=... --workdir=gs://...   (in the unpacked tree)

It
- starts `python -m launch.train` with the distributed setup: `--distributed` (jax detects the
  TPU slice, or the slices of a queued resource, from the VM's metadata), unless
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are all set, which are then
  passed as --coordinator_address / --num_processes / --process_id;
- prefixes every line of its output with `[worker K] ` (`[slice S worker K] ` in a multislice
  run), so that `launch.pod` can split the one stream `gcloud ... ssh --worker=all` returns into
  a log per worker;
- writes its process id to `train.pid`, and turns SIGTERM, SIGINT and SIGHUP (the ssh session
  closing) into one SIGTERM for the trainer, which then saves a checkpoint and exits 143.
Its exit status is the trainer's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping

PIDFILE = "train.pid"
_METADATA = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
             "agent-worker-number")


def worker_id(env: Mapping[str, str] = os.environ) -> int:
    """This host's index in its slice: TPU_WORKER_ID (GKE and explicit setups), else the TPU
    VM's metadata, else 0."""
    if env.get("TPU_WORKER_ID", "").isdigit():
        return int(env["TPU_WORKER_ID"])
    try:
        request = urllib.request.Request(_METADATA, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.read().decode().strip())
    except (OSError, ValueError):
        return 0


def tag(env: Mapping[str, str] = os.environ) -> str:
    """The prefix of this host's lines."""
    slice_id = env.get("MEGASCALE_SLICE_ID", "")
    head = f"slice {slice_id} " if slice_id.isdigit() else ""
    return f"[{head}worker {worker_id(env)}] "


def distributed_flags(env: Mapping[str, str] = os.environ) -> list[str]:
    """launch.train's flags for joining the job: the coordinator from JAX_* variables when all
    are set, else `--distributed` (auto-detection)."""
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    if all(env.get(n) for n in names):
        return [f"--coordinator_address={env[names[0]]}", f"--num_processes={env[names[1]]}",
                f"--process_id={env[names[2]]}"]
    return ["--distributed"]


def main(argv: list[str]) -> int:
    """Runs `launch.train` with `argv`, prefixing each of its output lines with this host's
    tag; returns its exit code."""
    prefix = tag()
    child = subprocess.Popen(
        [sys.executable, "-u", "-m", "launch.train", *distributed_flags(), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def stop(signum, frame):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    with open(PIDFILE, "w") as f:
        f.write(f"{os.getpid()}\n")
    for line in child.stdout:
        try:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
        except (BrokenPipeError, OSError):  # the console went away: keep training
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
