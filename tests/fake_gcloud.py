"""A stand-in for `gcloud compute tpus tpu-vm scp|ssh` that plays a 2-worker TPU slice on this
machine (the tests put a `gcloud` that runs this script first on PATH).

- Every call appends its argv to $FAKE_GCLOUD_LOG (one JSON list per line).
- `scp SRC NAME:DEST --worker=all` copies SRC to $FAKE_GCLOUD_ROOT/worker-K/DEST for each worker.
- `ssh NAME --command=CMD --worker=all` runs `bash -c CMD` once per worker, at once, in
  $FAKE_GCLOUD_ROOT/worker-K (the worker's home), with what a host of a 2-worker slice knows:
  TPU_WORKER_ID=K, and the coordinator (worker 0, a port held for it) and process ids given as
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. Outputs are merged as gcloud
  merges them; the exit status is the largest of the workers'.
"""

import json
import os
import shutil
import subprocess
import sys

from ports import reserved_port

WORKERS = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    root = os.environ["FAKE_GCLOUD_ROOT"]
    homes = [os.path.join(root, f"worker-{k}") for k in range(WORKERS)]
    for home in homes:
        os.makedirs(home, exist_ok=True)
    positional = [a for a in argv if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    assert positional[:3] == ["compute", "tpus", "tpu-vm"], argv
    assert options.get("worker") == "all", argv
    verb = positional[3]
    if verb == "scp":
        src, dest = positional[4], positional[5].split(":", 1)[1]
        for home in homes:
            shutil.copy(src, os.path.join(home, dest))
        return 0
    assert verb == "ssh", argv
    with reserved_port() as port:
        procs = []
        for k, home in enumerate(homes):
            env = dict(os.environ, HOME=home, TPU_WORKER_ID=str(k),
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(WORKERS), JAX_PROCESS_ID=str(k))
            procs.append(subprocess.Popen(["bash", "-c", options["command"]], cwd=home, env=env))
        return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
