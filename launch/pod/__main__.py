"""Start `launch.train` on every host of a TPU pod slice (or several), a GKE cluster or a SLURM
GPU cluster. Everything after `--` is passed unchanged to `launch.train` on every host.

    python -m launch.pod tpu-vm --tpu=my-v5p-64 --zone=us-east5-a -- \\
        --config=configs/deepseek_v2_lite.py --workdir=gs://bucket/run1
    python -m launch.pod tpu-vm --tpu=my-qr --zone=us-east5-a --num_slices=2 -- ...
    python -m launch.pod gke --cluster=c1 --tpu=v5p-128 --num_slices=2 \\
        --image=us-docker.pkg.dev/p/r/mla-moe:latest [--apply] -- ...
    python -m launch.pod slurm --nodes=4 --gpus_per_node=8 --partition=a3 [--submit] -- ...

`--dry_run` prints every command, manifest or script instead of running it. With
`--num_slices=N > 1` the run gets `--config.mesh.dcn_data=N` (slices along the data axis)
unless the forwarded flags set a `mesh.dcn_*` size themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from absl import flags

from launch import cli
from launch.pod.tpu_vm import display

SUBCOMMANDS = ("tpu-vm", "gke", "slurm")

_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, manifest or script; run "
                             "nothing.")
_TPU = flags.DEFINE_string("tpu", "", "tpu-vm: the TPU VM's name (multislice: the queued "
                           "resource's); gke: the accelerator type of a slice, e.g. v5p-128.")
_ZONE = flags.DEFINE_string("zone", "", "tpu-vm: the TPU's zone; gke: the cluster's location.")
_PROJECT = flags.DEFINE_string("project", "", "Google Cloud project (default: gcloud's).")
_SLICES = flags.DEFINE_integer("num_slices", 1, "tpu-vm, gke: TPU slices (multislice).")
_LOGDIR = flags.DEFINE_string("logdir", "pod_logs", "tpu-vm: worker-K.log per worker; slurm: "
                              "the job's output.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "mla_moe", "tpu-vm: where the tree goes, under "
                                  "each worker's home.")
_INSTALL = flags.DEFINE_bool("install", True, "tpu-vm: pip install the tree with its tpu extra "
                             "(--noinstall: the workers' Python already has the dependencies).")
_CLUSTER = flags.DEFINE_string("cluster", "", "gke: the GKE cluster.")
_IMAGE = flags.DEFINE_string("image", "", "gke: container image holding this tree and its "
                             "dependencies (working directory: the tree).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "gke: the slice topology (default: the usual "
                                "one of --tpu, e.g. 4x4x4 for v5p-128).")
_NAME = flags.DEFINE_string("name", "mla-moe", "gke: the JobSet's name; slurm: the job's.")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 0, "gke: JobSet restarts after a failure "
                                     "(each resumes from the last checkpoint).")
_APPLY = flags.DEFINE_bool("apply", False, "gke: kubectl apply the manifest (else print it).")
_NODES = flags.DEFINE_integer("nodes", 1, "slurm: nodes.")
_GPUS = flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node.")
_TASKS_PER = flags.DEFINE_enum("tasks_per", "node", ["node", "gpu"], "slurm: one process per "
                               "node (driving all its GPUs) or per GPU.")
_PARTITION = flags.DEFINE_string("partition", "", "slurm: partition.")
_ACCOUNT = flags.DEFINE_string("account", "", "slurm: account.")
_TIME = flags.DEFINE_string("time", "", "slurm: time limit, e.g. 24:00:00.")
_SUBMIT = flags.DEFINE_bool("submit", False, "slurm: sbatch the script (else print it).")
_OUTPUT = flags.DEFINE_string("output", "", "gke, slurm: also write the manifest or script here.")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launch.pod's argv, the flags after `--` for launch.train)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def train_args(forwarded: list[str], num_slices: int) -> list[str]:
    """The forwarded flags, after `--config.mesh.dcn_data=N` for a multislice run that sets no
    dcn size (a later flag overrides an earlier one)."""
    if not any(a.startswith("--config=") or a == "--config" for a in forwarded):
        from mla_moe.errors import InputError

        raise InputError("pass launch.train's flags after --, e.g. -- "
                         "--config=configs/tiny.py --workdir=gs://BUCKET/run")
    if num_slices > 1 and not any(a.startswith("--config.mesh.dcn_") for a in forwarded):
        return [f"--config.mesh.dcn_data={num_slices}", *forwarded]
    return list(forwarded)


def _require(**values) -> None:
    from mla_moe.errors import InputError

    for name, value in values.items():
        if not value:
            raise InputError(f"--{name} is required here")


def _write(text: str, path: str) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)


def tpu_vm(args: list[str]) -> int:
    """Runs `launch.train` with `args` on every host of a TPU VM slice; returns the exit code."""
    from launch.pod import tpu_vm as lib

    _require(tpu=_TPU.value, zone=_ZONE.value)
    vm = lib.TpuVm(tpu=_TPU.value, zone=_ZONE.value, project=_PROJECT.value,
                   num_slices=_SLICES.value, remote_dir=_REMOTE_DIR.value,
                   install=_INSTALL.value)
    return lib.launch(vm, args, logdir=_LOGDIR.value, dry_run=_DRY_RUN.value)


def gke(args: list[str]) -> int:
    """The GKE JobSet that runs `launch.train` with `args`: printed (and written to --output),
    or with --apply written and applied; returns the exit code."""
    from launch.pod import gke as lib
    from launch.pod import tpu_types

    _require(cluster=_CLUSTER.value, tpu=_TPU.value, image=_IMAGE.value)
    tpu = tpu_types.parse(_TPU.value, _TOPOLOGY.value)
    manifest = lib.render(lib.jobset(name=_NAME.value, tpu=tpu, num_slices=_SLICES.value,
                                     image=_IMAGE.value, train_args=args,
                                     max_restarts=_MAX_RESTARTS.value))
    _write(manifest, _OUTPUT.value)
    applying = _APPLY.value and not _DRY_RUN.value
    path = _OUTPUT.value or (os.path.join(tempfile.mkdtemp(prefix="mla_moe_pod_"), "jobset.yaml")
                             if applying else "jobset.yaml")
    steps = lib.commands(cluster=_CLUSTER.value, zone=_ZONE.value, project=_PROJECT.value,
                         manifest_path=path)
    if not applying:
        print(f"# {_SLICES.value} x {tpu.name} ({tpu.topology}, {tpu.hosts} hosts of "
              f"{tpu.chips_per_host} chips): JobSet manifest ({path})")
        print(manifest, end="")
        print("# to start it:" if not _APPLY.value else "# --apply runs:")
        for cmd in steps:
            print(display(cmd))
        return 0
    _write(manifest, path)
    for cmd in steps:
        print(f"$ {display(cmd)}", flush=True)
        status = subprocess.run(cmd).returncode
        if status:
            return status
    print(f"started; follow it with: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name="
          f"{_NAME.value} --max-log-requests={tpu.hosts * _SLICES.value}", flush=True)
    return 0


def slurm(args: list[str]) -> int:
    """The sbatch script that runs `launch.train` with `args`: printed (and written to
    --output), or with --submit written and submitted; returns sbatch's exit code."""
    from launch.pod import slurm as lib

    if _NODES.value < 1 or _GPUS.value < 1:
        from mla_moe.errors import InputError

        raise InputError(f"--nodes={_NODES.value} and --gpus_per_node={_GPUS.value} must be "
                         ">= 1")
    job = lib.Sbatch(nodes=_NODES.value, gpus_per_node=_GPUS.value, tasks_per=_TASKS_PER.value,
                     partition=_PARTITION.value, account=_ACCOUNT.value, time=_TIME.value,
                     job_name=_NAME.value.replace("-", "_"), chdir=lib_root(),
                     logdir=os.path.abspath(_LOGDIR.value))
    script = job.script(args)
    _write(script, _OUTPUT.value)
    if _DRY_RUN.value or not _SUBMIT.value:
        print(script, end="")
        print("# to submit it: sbatch SCRIPT (or rerun with --submit)")
        return 0
    os.makedirs(job.logdir, exist_ok=True)
    path = _OUTPUT.value or os.path.join(tempfile.mkdtemp(prefix="mla_moe_pod_"), "train.sbatch")
    _write(script, path)
    print(f"$ sbatch {path}", flush=True)
    return subprocess.run(["sbatch", path]).returncode


def lib_root() -> str:
    """The tree launch.pod runs from (the sbatch script's working directory)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str], forwarded: list[str]) -> None:
    """Dispatches to the subcommand, passing it the arguments after `--`."""
    from mla_moe.errors import InputError

    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        given = " ".join(argv[1:]) or "none"
        raise InputError(f"expected one subcommand, {' | '.join(SUBCOMMANDS)} (got {given}); "
                         "launch.train's flags go after --")
    if _SLICES.value < 1:
        raise InputError(f"--num_slices={_SLICES.value} must be >= 1")
    args = train_args(forwarded, _SLICES.value)
    run = {"tpu-vm": tpu_vm, "gke": gke, "slurm": slurm}[argv[1]]
    sys.exit(run(args))


def _entry() -> None:
    own, forwarded = split_argv(sys.argv)
    cli.run(lambda argv: main(argv, forwarded), argv=own, positional=True)


if __name__ == "__main__":
    _entry()
