"""The device mesh and the shardings the trainer uses.

Axes: `data`, `fsdp`, `expert`, `tensor`. The batch is split over the `batch` rule's axes
(default `data`, `fsdp`, `expert`); the train state's layout comes from the logical-axis rules
of `mla_moe.sharding`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mla_moe import sharding

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def make_mesh(mesh_cfg, devices=None, *, config=None) -> jax.sharding.Mesh:
    """The run's mesh (`mla_moe.sharding.make_mesh`: -1 = the remaining devices; sizes that
    do not fit the devices or the model's dimensions fail here, naming the axis)."""
    return sharding.make_mesh(mesh_cfg, devices, config=config)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split: the product of the `batch` rule's mesh axes."""
    return math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[B, ...] inputs split over the `batch` rule's axes (rules in effect: `use_mesh`)."""
    return sharding.batch_sharding(mesh)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """Shardings for every leaf of the train state from the logical-axis rules in effect
    (`sharding.use_mesh`): parameters and optimizer moments by their logical names, plain
    leaves (the step) replicated."""
    return sharding.state_shardings(abstract_state, mesh)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assembles per-process numpy batches into global jax.Arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
