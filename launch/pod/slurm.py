"""SLURM GPU clusters: an sbatch script that starts `launch.train` on every node.

`srun` starts one task per node (each process drives all the node's GPUs) or one per GPU;
`jax.distributed.initialize()` (`--distributed`) reads SLURM's variables for the coordinator
(the first node), the process count and index. With one task per GPU jax picks each task's GPU
from SLURM_LOCALID; with one per node, JAX_LOCAL_DEVICE_IDS hands every GPU to the task.
`--signal=TERM@120` sends the trainer SIGTERM two minutes before the time limit: it saves a
checkpoint and exits 143 (130 after SIGINT), and the script then requeues the job
(`--requeue`; `scontrol requeue`), which resumes from that checkpoint; the job's log is
appended to (`--open-mode=append`). A finished run (0) or a failure (1, ...) is not requeued. A
preemption that SLURM requeues itself (PreemptMode=REQUEUE) goes the same way.

The script runs from the tree it was rendered in (a checkout on the cluster's shared file
system), with the Python environment active when it was submitted (sbatch exports it).
"""

from __future__ import annotations

import dataclasses
import shlex

TASKS_PER = ("node", "gpu")
STOPPED_ON_SIGNAL = (130, 143)  # launch.train's exit statuses after SIGINT, SIGTERM


@dataclasses.dataclass(frozen=True)
class Sbatch:
    """The sbatch settings of a multi-node GPU job."""

    nodes: int
    gpus_per_node: int
    tasks_per: str = "node"  # "node" or "gpu"
    partition: str = ""
    account: str = ""
    time: str = ""  # e.g. "24:00:00"
    job_name: str = "mla_moe"
    chdir: str = "."
    logdir: str = "logs"

    def directives(self) -> list[str]:
        """The `#SBATCH` option values (without the `#SBATCH` prefix)."""
        tasks = 1 if self.tasks_per == "node" else self.gpus_per_node
        lines = [f"--job-name={self.job_name}", f"--nodes={self.nodes}",
                 f"--ntasks-per-node={tasks}", f"--gpus-per-node={self.gpus_per_node}",
                 "--exclusive", f"--chdir={self.chdir}",
                 f"--output={self.logdir}/%x-%j.out", "--open-mode=append", "--requeue",
                 "--signal=TERM@120"]
        if self.partition:
            lines.append(f"--partition={self.partition}")
        if self.account:
            lines.append(f"--account={self.account}")
        if self.time:
            lines.append(f"--time={self.time}")
        return lines

    def script(self, train_args: list[str]) -> str:
        """The sbatch script: #SBATCH lines, then one srun of launch.train."""
        out = ["#!/bin/bash"]
        out += [f"#SBATCH {d}" for d in self.directives()]
        out += ["set -euo pipefail", f"mkdir -p {shlex.quote(self.logdir)}"]
        if self.tasks_per == "node":
            ids = ",".join(str(i) for i in range(self.gpus_per_node))
            out.append(f"export JAX_LOCAL_DEVICE_IDS={ids}")
        train = ["python", "-u", "-m", "launch.train", "--distributed", *train_args]
        # --kill-on-bad-exit: one failed task ends the others instead of leaving them waiting
        # at a collective.
        out.append("status=0")
        out.append(f"srun --kill-on-bad-exit=1 {shlex.join(train)} || status=$?")
        # 130/143: stopped on a signal (the time limit's TERM, a preemption) after saving.
        codes = " || ".join(f'[ "$status" -eq {c} ]' for c in STOPPED_ON_SIGNAL)
        out += [f"if {codes}; then",
                '  echo "stopped on a signal (exit status $status): requeueing to resume"',
                '  scontrol requeue "$SLURM_JOB_ID" || true',
                "fi",
                'exit "$status"']
        return "\n".join(out) + "\n"
