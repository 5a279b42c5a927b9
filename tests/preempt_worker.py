"""One process of a two-process CPU run for the preemption tests:

    python tests/preempt_worker.py PORT PROCESS_ID STORE WORKDIR STEPS SIGTERM_STEP SIGTERM_PID

trains the micro config (its model cut to one layer: `train_helpers.ONE_LAYER`) with
`jax.distributed` over gloo, sending itself SIGTERM after step
SIGTERM_STEP when its process id is SIGTERM_PID (-1: never), as a preempted host would get, and
exits as `launch.train` does (143 after a SIGTERM, whichever process received it)."""

import sys

import jax


def main(port, pid, store, workdir, steps, sigterm_step, sigterm_pid):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(pid))
    from train_helpers import micro_config, one_layer, sigterm_at

    from mla_moe.train import train

    hooks = (sigterm_at(int(sigterm_step)),) if int(sigterm_pid) == int(pid) else ()
    config = one_layer(micro_config(store, train=dict(steps=int(steps)),
                                    log=dict(tensorboard=False)))
    result = train(config, workdir, hooks=hooks)
    print(f"process {pid}: step {result.step} preempted {result.preempted}", flush=True)
    sys.exit(result.exit_status)  # as launch.train does


if __name__ == "__main__":
    main(*sys.argv[1:])
