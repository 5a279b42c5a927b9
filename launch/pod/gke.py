"""GKE: a JobSet manifest that runs `launch.train` on every host of one or more TPU slices.

One replicated Job per slice (`replicas` = slices), each an indexed Job with one pod per host
(`parallelism` = `completions` = hosts), pinned to a TPU node pool by the accelerator and
topology node selectors, and to one node pool per slice by JobSet's exclusive-topology
annotation. Each pod gets the environment `jax.distributed.initialize()` reads on GKE
(TPU_WORKER_ID, TPU_WORKER_HOSTNAMES) and, across slices, the MEGASCALE_* variables.

Restarts: a pod whose trainer stopped on a signal (exit 143 after SIGTERM, 130 after SIGINT:
it saved a checkpoint first) or that was evicted (the `DisruptionTarget` condition: node
preemption, maintenance) fails its Job with the reason `PodFailurePolicy`, and the JobSet
restarts every Job for that reason without counting it against `max_restarts`: the run
resumes from its checkpoint. Any other failure restarts it at most `max_restarts` times.

    manifest = jobset(name="pretrain", tpu=tpu_types.parse("v5p-128"), num_slices=2,
                      image="us-docker.pkg.dev/p/r/mla-moe:latest", train_args=[...])
    print(render(manifest))
"""

from __future__ import annotations

import shlex

from launch.pod.tpu_types import TpuType

COORDINATOR_PORT = 8080  # MEGASCALE's across slices
GRACE_SECONDS = 600  # SIGTERM -> the trainer saves its checkpoint before the pod is killed
STOPPED_ON_SIGNAL = (130, 143)  # launch.train's exit statuses after SIGINT, SIGTERM


def _field(path: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def env(name: str, tpu: TpuType, num_slices: int) -> list[dict]:
    """The pods' environment: worker index and hostnames of the slice; MEGASCALE_* when there
    are several slices. Hostnames follow JobSet's DNS: <jobset>-<job>-<slice>-<host>.<jobset>."""
    hosts = ",".join(f"{name}-slice-$(JOB_INDEX)-{k}.{name}" for k in range(tpu.hosts))
    out = [
        {"name": "JOB_INDEX", **_field(
            "metadata.annotations['jobset.sigs.k8s.io/job-index']")},
        {"name": "TPU_WORKER_ID", **_field(
            "metadata.annotations['batch.kubernetes.io/job-completion-index']")},
        {"name": "TPU_WORKER_HOSTNAMES", "value": hosts},
    ]
    if num_slices > 1:
        out += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS",
             "value": f"{name}-slice-0-0.{name}:{COORDINATOR_PORT}"},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
            {"name": "MEGASCALE_SLICE_ID", "value": "$(JOB_INDEX)"},
            {"name": "MEGASCALE_PORT", "value": str(COORDINATOR_PORT)},
        ]
    return out


def jobset(*, name: str, tpu: TpuType, num_slices: int, image: str, train_args: list[str],
           max_restarts: int = 0) -> dict:
    """The JobSet as a dict (render it with `render`)."""
    container = {
        "name": "train",
        "image": image,
        "command": ["bash", "-c",
                    f"python -u -m launch.train --distributed {shlex.join(train_args)}"],
        "ports": [{"containerPort": 8471}, {"containerPort": COORDINATOR_PORT}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": tpu.chips_per_host}},
        "env": env(name, tpu, num_slices),
    }
    pod = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": tpu.gke_accelerator,
                         "cloud.google.com/gke-tpu-topology": tpu.topology},
        "containers": [container],
    }
    job = {
        "parallelism": tpu.hosts,
        "completions": tpu.hosts,
        "completionMode": "Indexed",
        "backoffLimit": 0,
        # Preempted (stopped on a signal after saving, or evicted): fail the Job at once with
        # the reason PodFailurePolicy, which the JobSet's rule below restarts.
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {
                "containerName": "train", "operator": "In",
                "values": list(STOPPED_ON_SIGNAL)}},
            {"action": "FailJob", "onPodConditions": [
                {"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"spec": pod},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "annotations": {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts, "rules": [
                {"name": "restart-preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
                 "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{"name": "slice", "replicas": num_slices,
                                "template": {"spec": job}}],
        },
    }


def render(manifest: dict) -> str:
    """The manifest as YAML, keys in their given order."""
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False, width=1000)


def commands(*, cluster: str, zone: str, project: str, manifest_path: str) -> list[list[str]]:
    """Point kubectl at the cluster, then apply the manifest."""
    creds = ["gcloud", "container", "clusters", "get-credentials", cluster]
    if zone:
        creds.append(f"--location={zone}")
    if project:
        creds.append(f"--project={project}")
    return [creds, ["kubectl", "apply", "-f", manifest_path]]
