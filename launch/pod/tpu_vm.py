"""Cloud TPU VMs: ship the working tree to every worker, install it, start `launch.train` on all
of them at once, keep a log per worker, and stop them cleanly.

One slice is a TPU VM (`gcloud compute tpus tpu-vm scp|ssh NAME --worker=all`). Several slices
(multislice) are a queued resource created with `--node-count=N`: Cloud TPU's current way to
get slices that talk over the data-center network, whose nodes carry the multislice settings
(MEGASCALE_* in their TPU metadata) that libtpu and `jax.distributed.initialize()` read; the
same steps then go through `gcloud compute tpus queued-resources scp|ssh QR --worker=all
--node=all`.

The steps, each a command `--dry_run` prints:
  1. pack the tree (`git ls-files`: tracked and untracked files, not ignored ones) into a tarball;
  2. copy it to every worker (scp);
  3. unpack it into ~/mla_moe and `pip install '.[tpu]'` there (ssh);
  4. run `python3 -m launch.pod.worker ARGS` there on every worker (ssh): `launch.train` with
     the forwarded flags, its lines tagged by worker;
  5. on Ctrl-C: `kill -TERM` every worker's supervisor (ssh), which signals its trainer: all
     hosts save the same step and exit 143 (stopped on a signal).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading

from mla_moe.errors import InputError

ARCHIVE = "mla_moe.tar.gz"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TAGGED = re.compile(r"^\[(?:slice (\d+) )?worker (\d+)\] (.*)$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """The gcloud commands of one run on a TPU VM (or, multislice, a queued resource)."""

    tpu: str
    zone: str
    project: str = ""
    num_slices: int = 1
    remote_dir: str = "mla_moe"  # relative to the workers' home directory
    install: bool = True

    def _gcloud(self, verb: str, *args: str) -> list[str]:
        group = "queued-resources" if self.num_slices > 1 else "tpu-vm"
        cmd = ["gcloud", "compute", "tpus", group, verb, *args, "--worker=all"]
        if self.num_slices > 1:
            cmd.append("--node=all")
        cmd.append(f"--zone={self.zone}")
        if self.project:
            cmd.append(f"--project={self.project}")
        return cmd

    def ssh(self, command: str) -> list[str]:
        """The gcloud command that runs `command` on every worker."""
        return self._gcloud("ssh", self.tpu, f"--command={command}")

    def copy(self, archive: str) -> list[str]:
        """The gcloud command that copies the code archive to every worker."""
        return self._gcloud("scp", archive, f"{self.tpu}:{ARCHIVE}")

    def setup(self) -> list[str]:
        """The command that unpacks the archive into the remote directory (and installs it)."""
        d = shlex.quote(self.remote_dir)
        command = f"rm -rf {d} && mkdir -p {d} && tar -xzf {ARCHIVE} -C {d}"
        if self.install:
            command += f" && cd {d} && python3 -m pip install --quiet '.[tpu]'"
        return self.ssh(command)

    def train(self, train_args: list[str]) -> list[str]:
        """The command that starts `launch.pod.worker` with `train_args` on every worker."""
        return self.ssh(f"cd {shlex.quote(self.remote_dir)} && python3 -u -m launch.pod.worker "
                        f"{shlex.join(train_args)}")

    def stop(self) -> list[str]:
        """The command that sends SIGTERM to the training process on every worker."""
        return self.ssh(f"cd {shlex.quote(self.remote_dir)} && kill -TERM $(cat train.pid)")


def display(cmd: list[str]) -> str:
    """A command as a shell line to copy: `--name='value'` rather than `'--name=value'`."""
    out = []
    for arg in cmd:
        name, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and shlex.quote(arg) != arg:
            out.append(f"{name}={shlex.quote(value)}")
        else:
            out.append(shlex.quote(arg))
    return " ".join(out)


def pack(root: str, archive: str) -> int:
    """Writes the working tree's files (tracked and untracked, not ignored) to `archive`."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=root, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise InputError(f"cannot list the files of {root} with git ({e}); launch.pod ships a "
                         "git working tree") from None
    files = [f for f in out.stdout.decode().split("\0") if f and os.path.isfile(
        os.path.join(root, f))]
    with tarfile.open(archive, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(root, f), arcname=f)
    return len(files)


def log_name(line_slice: str | None, worker: str) -> str:
    """The log file name of a worker (of a slice, under multislice)."""
    return f"slice-{line_slice}-worker-{worker}.log" if line_slice else f"worker-{worker}.log"


class LogSplitter:
    """Splits the tagged output of all workers into LOGDIR/worker-K.log (slice-S-worker-K.log
    for multislice) and shows worker 0's lines (of slice 0) on the console; untagged lines
    (gcloud's own) go to LOGDIR/gcloud.log and the console's stderr."""

    def __init__(self, logdir: str, console=sys.stdout, errors=sys.stderr):
        os.makedirs(logdir, exist_ok=True)
        self.logdir, self.console, self.errors = logdir, console, errors
        self._files = {}

    def _file(self, name: str):
        if name not in self._files:
            self._files[name] = open(os.path.join(self.logdir, name), "a")
        return self._files[name]

    def line(self, line: str) -> None:
        """Routes one output line to its worker's log (and worker 0's to the console)."""
        m = _TAGGED.match(line)
        if m is None:
            self._file("gcloud.log").write(line)
            self.errors.write(line)
            self.errors.flush()
            return
        line_slice, worker, text = m.groups()
        f = self._file(log_name(line_slice, worker))
        f.write(text)
        f.flush()
        if worker == "0" and line_slice in (None, "0"):
            self.console.write(text)
            self.console.flush()

    def close(self) -> None:
        """Closes the log files."""
        for f in self._files.values():
            f.close()


def run_logged(cmd: list[str], stop_cmd: list[str], logdir: str) -> int:
    """Runs the train command, splitting its output into logs. The first Ctrl-C (or SIGTERM)
    runs `stop_cmd` (every worker saves and exits) and keeps collecting the output; a second
    one ends the command at once. Returns the command's exit status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    stops = []

    def on_signal(signum, frame):
        if stops:
            os.killpg(proc.pid, signal.SIGKILL)
            return
        print("stopping: SIGTERM to every worker; each saves a checkpoint and exits "
              "(Ctrl-C again to abandon them)", file=sys.stderr, flush=True)
        stops.append(threading.Thread(target=subprocess.run, args=(stop_cmd,),
                                      kwargs=dict(stdout=subprocess.DEVNULL), daemon=True))
        stops[0].start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    splitter = LogSplitter(logdir)
    try:
        for line in proc.stdout:
            splitter.line(line)
        return proc.wait()
    finally:
        splitter.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in stops:
            t.join(timeout=60)


def launch(vm: TpuVm, train_args: list[str], *, logdir: str, dry_run: bool,
           root: str = ROOT) -> int:
    """All the steps; with `dry_run`, prints them instead. Returns the exit status."""
    tmp = tempfile.mkdtemp(prefix="mla_moe_pod_")
    archive = os.path.join(tmp, ARCHIVE)
    steps = [vm.copy(archive), vm.setup()]
    if dry_run:
        print(f"# pack the working tree of {root} (git ls-files: tracked and untracked, not "
              f"ignored) into {archive}")
        for cmd in steps:
            print(display(cmd))
        print(f"# train; each worker's output to {os.path.join(logdir, 'worker-K.log')}, worker "
              "0's on the console")
        print(display(vm.train(train_args)))
        print("# on Ctrl-C: every worker saves a checkpoint and exits")
        print(display(vm.stop()))
        os.rmdir(tmp)
        return 0
    n = pack(root, archive)
    print(f"packed {n} files of {root}", flush=True)
    for cmd in steps:
        print(f"$ {display(cmd)}", flush=True)
        status = subprocess.run(cmd).returncode
        if status:
            print(f"error: step failed with exit status {status}: {display(cmd)}",
                  file=sys.stderr, flush=True)
            return status
    os.remove(archive)
    os.rmdir(tmp)
    print(f"$ {display(vm.train(train_args))}", flush=True)
    print(f"logs: {logdir}/worker-K.log; the console shows worker 0", flush=True)
    return run_logged(vm.train(train_args), vm.stop(), logdir)
