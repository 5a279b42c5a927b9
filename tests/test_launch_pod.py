"""launch.pod: the TPU VM path end to end against a fake `gcloud` that plays a 2-worker slice
on this machine (3 steps over two processes match one process), and the dry-run outputs of
every subcommand field by field (gcloud commands, the JobSet YAML, the sbatch script)."""

import json
import os
import shlex
import subprocess
import sys

import cli_output
import numpy as np
import pytest
import yaml
from train_helpers import micro_config, one_layer, one_layer_flags, synthetic_store, xla_flags

from launch.pod import tpu_types
from mla_moe.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config=configs/tiny.py", "--workdir=gs://bucket/run 1", "--config.train.steps=10"]


def _env(**extra):
    return cli_output.user_env(**extra)  # no JAX_PLATFORMS, as a user runs it


def _pod(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "launch.pod", *args], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _fake_gcloud(tmp_path):
    """A `gcloud` on PATH that runs tests/fake_gcloud.py; returns (env, argv log path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "gcloud"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT}/tests/fake_gcloud.py" "$@"\n')
    shim.chmod(0o755)
    log = tmp_path / "gcloud_argv.jsonl"
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
    # The workers run from their unpacked tree (cwd): `src` there is the library they import.
    env = _env(PATH=path, FAKE_GCLOUD_LOG=str(log), FAKE_GCLOUD_ROOT=str(tmp_path / "hosts"),
               XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    return env, log


def test_tpu_vm_trains_on_two_fake_workers(tmp_path):
    """The micro model cut to one layer (`one_layer`), the workers compiled quickly: their
    losses against this process's run of the same config."""
    store = synthetic_store(str(tmp_path / "store"))
    steps = 3
    train(one_layer(micro_config(store, train=dict(steps=steps))), str(tmp_path / "one"))
    one = {r["step"]: r["loss"] for r in _records(str(tmp_path / "one"))}

    env, log = _fake_gcloud(tmp_path)
    workdir = str(tmp_path / "two")
    forwarded = ["--config=configs/tiny.py:micro", f"--workdir={workdir}",
                 f"--config.data.path={store}", f"--config.train.steps={steps}",
                 *one_layer_flags(), "--config.log.tensorboard=False"]
    logdir = tmp_path / "logs"
    out = _pod("tpu-vm", "--tpu=fake-v5p-16", "--zone=us-east5-a", "--noinstall",
               f"--logdir={logdir}", "--", *forwarded, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", v]
                                      for v in ("scp", "ssh", "ssh")]
    assert all("--worker=all" in c and "--zone=us-east5-a" in c for c in calls)
    command = next(a for a in calls[2] if a.startswith("--command=")).split("=", 1)[1]
    assert shlex.split(command)[-len(forwarded):] == forwarded
    # Each worker got the tree, unpacked in its home.
    for k in range(2):
        assert (tmp_path / "hosts" / f"worker-{k}" / "mla_moe" / "launch" / "train.py").exists()

    two = {r["step"]: r["loss"] for r in _records(workdir)}
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    for s in one:
        np.testing.assert_allclose(two[s], one[s], rtol=1e-5, err_msg=f"step {s}")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
    worker0 = (logdir / "worker-0.log").read_text()
    assert "'data': 8" in worker0 and f"step      3/{steps}" in worker0
    assert f"step      3/{steps}" in out.stdout  # worker 0 on the console, untagged
    assert "[worker" not in out.stdout


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def _option(cmd: list[str], name: str) -> str:
    return next(a for a in cmd if a.startswith(f"--{name}=")).split("=", 1)[1]


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
    out = _pod("tpu-vm", "--dry_run", "--tpu=my-tpu", "--zone=us-east5-a", "--project=p1",
               "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    scp, setup, run, stop = _commands(out.stdout)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5].endswith("/mla_moe.tar.gz") and scp[6] == "my-tpu:mla_moe.tar.gz"
    for cmd in (scp, setup, run, stop):
        assert "--worker=all" in cmd and "--node=all" not in cmd
        assert _option(cmd, "zone") == "us-east5-a" and _option(cmd, "project") == "p1"
    assert setup[4:6] == ["ssh", "my-tpu"]
    assert "tar -xzf mla_moe.tar.gz -C mla_moe" in _option(setup, "command")
    assert "pip install --quiet '.[tpu]'" in _option(setup, "command")
    train_line = shlex.split(_option(run, "command"))
    assert train_line[:6] == ["cd", "mla_moe", "&&", "python3", "-u", "-m"]
    assert train_line[6] == "launch.pod.worker" and train_line[7:] == TRAIN  # verbatim
    assert _option(stop, "command") == "cd mla_moe && kill -TERM $(cat train.pid)"


def test_tpu_vm_multislice_goes_through_the_queued_resource():
    out = _pod("tpu-vm", "--dry_run", "--tpu=my-qr", "--zone=us-east5-a", "--num_slices=2",
               "--noinstall", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    assert len(cmds) == 4
    for cmd in cmds:
        assert cmd[3] == "queued-resources" and "--worker=all" in cmd and "--node=all" in cmd
    assert "pip" not in _option(cmds[1], "command")
    train_line = shlex.split(_option(cmds[2], "command"))
    assert train_line[7:] == ["--config.mesh.dcn_data=2", *TRAIN]


def _manifest(stdout: str) -> dict:
    return yaml.safe_load("\n".join(ln for ln in stdout.splitlines() if not ln.startswith("#")
                                    and not ln.startswith(("gcloud ", "kubectl "))))


def test_gke_dry_run_renders_a_jobset():
    out = _pod("gke", "--dry_run", "--cluster=c1", "--zone=us-east5", "--tpu=v5p-128",
               "--num_slices=2", "--image=us-docker.pkg.dev/p/r/mla-moe:1", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    js = _manifest(out.stdout)
    assert js["apiVersion"].startswith("jobset.x-k8s.io/") and js["kind"] == "JobSet"
    assert js["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == (
        "cloud.google.com/gke-nodepool")
    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2  # one Job per slice
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # v5p-128: 64 chips, 4 per host
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4"}
    (container,) = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/r/mla-moe:1"
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    command = shlex.split(container["command"][-1])
    assert command[:5] == ["python", "-u", "-m", "launch.train", "--distributed"]
    assert command[5:] == ["--config.mesh.dcn_data=2", *TRAIN]
    env = {e["name"]: e for e in container["env"]}
    assert env["TPU_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
        "['batch.kubernetes.io/job-completion-index']")
    hosts = env["TPU_WORKER_HOSTNAMES"]["value"].split(",")
    assert len(hosts) == 16 and hosts[0] == "mla-moe-slice-$(JOB_INDEX)-0.mla-moe"
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert env["MEGASCALE_SLICE_ID"]["value"] == "$(JOB_INDEX)"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"].startswith("mla-moe-slice-0-0.mla-moe")
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to save on SIGTERM
    # A run stopped on a signal (it saved first) or evicted fails its Job for a reason the
    # JobSet restarts without counting it against --max_restarts.
    stopped, evicted = job["podFailurePolicy"]["rules"]
    assert stopped == {"action": "FailJob", "onExitCodes": {
        "containerName": container["name"], "operator": "In", "values": [130, 143]}}
    assert evicted["action"] == "FailJob"
    assert evicted["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    (rule,) = js["spec"]["failurePolicy"]["rules"]
    assert rule["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert rule["onJobFailureReasons"] == ["PodFailurePolicy"] and rule["name"]
    lines = out.stdout.splitlines()
    assert "gcloud container clusters get-credentials c1 --location=us-east5" in lines
    assert "kubectl apply -f jobset.yaml" in lines


def test_slurm_dry_run_renders_an_sbatch_script(tmp_path):
    out = _pod("slurm", "--dry_run", "--nodes=4", "--gpus_per_node=8", "--partition=a3",
               "--time=24:00:00", f"--output={tmp_path / 'train.sbatch'}", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    script = (tmp_path / "train.sbatch").read_text()
    assert script in out.stdout
    assert subprocess.run(["bash", "-n", str(tmp_path / "train.sbatch")]).returncode == 0
    sbatch = dict(ln.removeprefix("#SBATCH --").partition("=")[::2]
                  for ln in script.splitlines() if ln.startswith("#SBATCH"))
    assert sbatch["nodes"] == "4" and sbatch["gpus-per-node"] == "8"
    assert sbatch["ntasks-per-node"] == "1" and sbatch["partition"] == "a3"
    assert sbatch["time"] == "24:00:00" and sbatch["signal"] == "TERM@120"
    assert sbatch["chdir"] == ROOT and sbatch["exclusive"] == ""
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    srun = srun.removesuffix(" || status=$?")  # the exit status decides a requeue
    assert shlex.split(srun)[-len(TRAIN) - 1:] == ["--distributed", *TRAIN]
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script
    assert sbatch["requeue"] == "" and sbatch["open-mode"] == "append"
    per_gpu = _pod("slurm", "--dry_run", "--nodes=2", "--tasks_per=gpu", "--", *TRAIN)
    assert "#SBATCH --ntasks-per-node=8" in per_gpu.stdout
    assert "JAX_LOCAL_DEVICE_IDS" not in per_gpu.stdout  # jax reads SLURM_LOCALID


@pytest.mark.parametrize("status, requeued", [(0, False), (1, False), (130, True),
                                             (143, True)])
def test_slurm_script_requeues_a_run_stopped_on_a_signal(tmp_path, status, requeued):
    """The generated script under fake `srun` (the trainer's exit status) and `scontrol`: a run
    stopped on a signal (130, 143: it saved a checkpoint) is queued again; a finished or failed
    one is not; the script exits with the trainer's status either way."""
    from launch.pod.slurm import Sbatch

    script = tmp_path / "train.sbatch"
    script.write_text(Sbatch(nodes=1, gpus_per_node=1, logdir=str(tmp_path / "logs"))
                      .script(TRAIN))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("srun", f"printf '%s\\n' \"$@\" > {tmp_path}/srun.args\nexit {status}"),
                       ("scontrol", f'echo "$@" > {tmp_path}/scontrol.args')]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_ID="4242")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == status, out.stderr
    assert (tmp_path / "srun.args").read_text().splitlines() == [
        "--kill-on-bad-exit=1", "python", "-u", "-m", "launch.train", "--distributed", *TRAIN]
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
        assert f"stopped on a signal (exit status {status}): requeueing" in out.stdout
    else:
        assert not (tmp_path / "scontrol.args").exists()


@pytest.mark.parametrize("args, message", [
    (["--dry_run", "--", *TRAIN], "error: expected one subcommand, tpu-vm | gke | slurm"),
    (["tpu-vm", "--dry_run", "--zone=z", "--", *TRAIN], "error: --tpu is required here"),
    (["tpu-vm", "--dry_run", "--tpu=t", "--zone=z"], "error: pass launch.train's flags after"),
    (["gke", "--dry_run", "--cluster=c", "--tpu=v9-8", "--image=i", "--", *TRAIN],
     "error: --tpu='v9-8': expected an accelerator type"),
])
def test_bad_input_is_one_line(args, message):
    out = _pod(*args)
    errors = cli_output.lines(out.stderr)
    assert out.returncode == 1 and len(errors) == 1 and errors[0].startswith(message), out.stderr


@pytest.mark.parametrize("name, chips, topology, hosts", [
    ("v5p-8", 4, "2x2x1", 1), ("v5p-128", 64, "4x4x4", 16), ("v5p-256", 128, "4x4x8", 32),
    ("v4-32", 16, "2x2x4", 4), ("v5litepod-8", 8, "2x4", 1), ("v6e-64", 64, "8x8", 16),
    ("v5litepod-16", 16, "4x4", 4), ("tpu7x-8", 4, "2x2x1", 1), ("tpu7x-128", 64, "4x4x4", 16),
])
def test_tpu_types(name, chips, topology, hosts):
    t = tpu_types.parse(name)
    assert (t.chips, t.topology, t.hosts) == (chips, topology, hosts)
