"""libtpu compiler flags a run's config needs, set in `LIBTPU_INIT_ARGS` before libtpu starts.

Host offload (the `offload_*` remat policies): without these, XLA:TPU's scheduler does not
account for the device-host copies' memory and keeps few of them in flight, so the copies of
the saved layer inputs serialise with compute. The set is the one public TPU recipes for
DeepSeek-V3 and Llama pass with `decoder_layer_input=offload`: the experimental scheduler
features with memory-pressure tracking, up to 24 host transfers in flight, and loop-carried
values allowed in the copy chains that move the scan's saved activations.

FSDP collectives (with the same policies, on every generation but TPU7x): the data-parallel
all-reduce optimisation set public TPU recipes for DeepSeek-V3 pass. With pure FSDP over a
whole v5p:8x8x8 the weights' gradients otherwise come out of XLA's partitioner as 512-way
all-reduces (2(N-1)/N of each gradient over the links); with these flags they are
reduce-scatters. V3 at 6 x 8192 tokens per chip on jax 0.12 / libtpu 0.0.50: 4,774 GiB
received per chip per step instead of 5,136, the same peak memory (bench/RESULTS.md,
"Roofline bound of compiled steps"). Not set on TPU7x, where their effect on the compiler's
budgeted HBM was not measured.

Ironwood (TPU7x): libtpu 0.0.42 moves large gathers onto the SparseCores, and for DeepSeek-V3's
train step its SparseCore compiler then aborts the process ("LLVM ERROR: Not enough space for
TILESPMEM spill"). And its HBM check counts less than the compiled step then holds (arguments
+ temporaries, from its memory analysis), by 15 GiB and more for V3's train step on
tpu7x:4x8x8, and what it assigns depends on the HBM size it is given
(`xla_tpu_max_hbm_size_mib`). At 4 x 8192 tokens per device the step holds 102.2 GiB when the
compiler is given the die's 94.75 GiB or 80 GiB, and 82.6 GiB when given 70. At 6 x 8192 it
holds 100.3 GiB given 94.75 and 91.5 given 80, and given 70 the compiler says it needs 76.5.
So on tpu7x the compiler gets a 70 GiB budget, which keeps what the executable holds within
the die's HBM with room to spare. Both flags are set for `tpu:tpu7x` targets in
`launch.compile`, and in `launch.train` where `TPU_ACCELERATOR_TYPE` (set on TPU VMs and GKE
nodes) names a tpu7x slice; a larger per-device batch can raise the budget in
`LIBTPU_INIT_ARGS` (e.g. `--xla_tpu_max_hbm_size_mib=81920` for 6 x 8192 tokens).

A flag the user already put in `LIBTPU_INIT_ARGS` keeps the user's value. libtpu reads the
variable once, when the TPU backend (or a compile-only TPU topology) is first created: call
`set_libtpu_flags` before that, as `launch.train` and `launch.compile` do.
"""

from __future__ import annotations

import os

from pallas_kernels.chips import parse_accelerator_type

HOST_OFFLOAD_FLAGS = (
    "--xla_tpu_enable_all_experimental_scheduler_features=true",
    "--xla_tpu_enable_scheduler_memory_pressure_tracking=true",
    "--xla_tpu_host_transfer_overlap_limit=24",
    "--xla_tpu_aggressive_opt_barrier_removal=ENABLED",
    "--xla_lhs_prioritize_async_depth_over_stall=ENABLED",
    "--xla_tpu_enable_ag_backward_pipelining=true",
    "--xla_should_allow_loop_variant_parameter_in_chain=ENABLED",
    "--xla_should_add_loop_invariant_op_in_chain=ENABLED",
    "--xla_max_concurrent_host_send_recv=100",
    "--xla_tpu_scheduler_percent_shared_memory_limit=100",
    "--xla_latency_hiding_scheduler_rerun=2",
)


COLLECTIVE_FLAGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_use_minor_sharding_for_major_trivial_input=true",
    "--xla_tpu_relayout_group_size_threshold_for_reduce_scatter=1",
    "--xla_tpu_assign_all_reduce_scatter_layout=true",
)

TPU7X_HBM_BUDGET_MIB = 70 * 1024

TPU7X_FLAGS = ("--xla_tpu_offload_gather_to_sparsecore=false",
               f"--xla_tpu_max_hbm_size_mib={TPU7X_HBM_BUDGET_MIB}")


def generation_from_env(environ=os.environ) -> str | None:
    """The TPU generation `TPU_ACCELERATOR_TYPE` names, as libtpu names its topologies
    ("v5p-128" -> "v5p", "v5litepod-16" -> "v5e", "tpu7x-64" -> "tpu7x"); None when it is
    unset or not an accelerator type of the chip table."""
    try:
        return parse_accelerator_type(environ.get("TPU_ACCELERATOR_TYPE", "")).chip.target
    except ValueError:
        return None


def needed_flags(remat_policy: str, generation: str | None = None) -> tuple[str, ...]:
    """The libtpu flags a model with this `remat_policy` needs on TPU `generation` ("v5p",
    "tpu7x"; None when not known): for the `offload_*` policies (the pod presets') the
    host-offload set, and the FSDP collective set except on tpu7x; TPU7X_FLAGS on tpu7x."""
    if not remat_policy.startswith("offload"):
        flags = ()
    elif generation == "tpu7x":
        flags = HOST_OFFLOAD_FLAGS
    else:
        flags = HOST_OFFLOAD_FLAGS + COLLECTIVE_FLAGS
    return flags + (TPU7X_FLAGS if generation == "tpu7x" else ())


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merged(existing: str, flags: tuple[str, ...]) -> str:
    """`existing` (a LIBTPU_INIT_ARGS value) plus those of `flags` it does not set already."""
    have = {_name(f) for f in existing.split()}
    extra = [f for f in flags if _name(f) not in have]
    return " ".join([existing.strip(), *extra]).strip()


def set_libtpu_flags(remat_policy: str, generation: str | None = None) -> tuple[str, ...]:
    """Adds the flags `needed_flags` names to `LIBTPU_INIT_ARGS`; returns the flags wanted."""
    flags = needed_flags(remat_policy, generation)
    if flags:
        os.environ["LIBTPU_INIT_ARGS"] = merged(os.environ.get("LIBTPU_INIT_ARGS", ""), flags)
    return flags
