"""`load_pretrained`: a HuggingFace DeepSeek directory -> `DeepSeekModel`, tensor by tensor."""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_moe import sharding
from mla_moe.config import ModelConfig
from mla_moe.decoder import DeepSeekModel, layer_groups
from mla_moe.errors import InputError, MissingInputError
from mla_moe.hf.mapping import MTP_READERS, layer_readers
from mla_moe.hf.safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
FP8_BLOCK = 128
# Tensors we do not need: rope buffers, the MTP modules' copies of the shared embedding/head.
_IGNORED = re.compile(
    r"(rotary_emb\.inv_freq$|shared_head\.head\.weight$|"
    r"layers\.\d+\.embed_tokens\.weight$)"
)
_EXPERT_PARAMS = ("gate_EDF", "up_EDF", "down_EFD")  # routed experts: read per expert slice


class CheckpointReader:
    """Name -> float32 numpy array over every safetensors file of a directory."""

    def __init__(self, path: str):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            pickled = [f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)]
            if pickled:
                raise InputError(
                    f"{path} holds only pickled weights ({', '.join(sorted(pickled)[:3])}); "
                    "they are refused because loading them can run arbitrary code. Convert "
                    "them to safetensors first."
                )
            raise MissingInputError(
                f"no *.safetensors files in {path}; convert the weights to safetensors"
            )
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            st = SafetensorsFile(f)
            for name in st.names():
                self._where[name] = st
        self.used: set[str] = set()

    def names(self) -> list[str]:
        """Every tensor name over all shards."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (no dequantisation), marked as used."""
        if name not in self._where:
            raise KeyError(name)
        self.used.add(name)
        return self._where[name].get(name)

    def __call__(self, name: str) -> np.ndarray:
        """The tensor as stored, or dequantised when it has a block `weight_scale_inv`."""
        w = self.raw(name)
        scale_name = name + "_scale_inv"
        if scale_name in self._where:
            return dequantize_fp8(w, self.raw(scale_name))
        return w


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """W = fp8 * scale_inv per [block x block] tile (tiles at the edges are cropped)."""
    rows, cols = w.shape
    scale = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block, 0), block, 1)
    return np.asarray(w, np.float32) * scale[:rows, :cols]


def _sharding(variable, mesh):
    """Where a tensor goes: its sharding on `mesh`, else on the mesh in effect
    (`jax.set_mesh`), else this host's first device."""
    if mesh is None and not jax.sharding.get_mesh().empty:
        mesh = jax.sharding.get_mesh()
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        from mla_moe.sharding import variable_sharding
    except ImportError:
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return variable_sharding(variable, mesh)


def _has_mtp(reader: CheckpointReader, config: ModelConfig) -> bool:
    prefix = f"model.layers.{config.num_hidden_layers}."
    return any(n.startswith(prefix + "eh_proj") for n in reader.names())


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides: Any,
) -> DeepSeekModel:
    """Loads a HuggingFace DeepSeek-V2/V3 checkpoint directory.

    dtype: parameter and compute dtype (default: the checkpoint's `dtype`/`torch_dtype`).
    mesh: place each tensor directly into its sharding on this mesh (default: the mesh in
    effect through `jax.set_mesh`, else this host's first device).
    Reads per-expert and fused-expert layouts, dequantises FP8 block-scaled weights, loads the
    MTP modules when present. Each parameter is assembled from the memory-mapped files slice by
    slice for each device, so host memory never holds a second copy of the model.
    """
    path = os.fspath(path)
    if dtype is not None:
        config_overrides.update(dtype=dtype, param_dtype=dtype)
    config = ModelConfig.from_hf(path, **config_overrides)  # names a missing/foreign config
    reader = CheckpointReader(path)
    if config.num_nextn_predict_layers and not _has_mtp(reader, config):
        log.info("checkpoint has no MTP weights: loading without MTP modules")
        config = config.replace(num_nextn_predict_layers=0)

    abstract = sharding.abstract_model(lambda: DeepSeekModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    sources = _Sources(reader, config)
    flat = [
        (leaf, _load_leaf(path, leaf, variable, sources(leaf), mesh))
        for leaf, variable in nnx.to_flat_state(state)
    ]
    _check_all_read(reader, path)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class _Sources:
    """Our parameter path -> (read(index) -> np.ndarray) over the checkpoint's tensors."""

    def __init__(self, reader: CheckpointReader, config: ModelConfig):
        self._reader, self._config = reader, config
        self._groups = layer_groups(config)
        self._starts, first = [], 0
        for _, n in self._groups:
            self._starts.append(first)
            first += n

    def _layer(self, fn, prefix, experts_axis, idx):
        """One layer's array at `idx`; routed experts are read for the expert slice only."""
        if experts_axis:
            return fn(self._reader, prefix, idx[0])[(slice(None),) + tuple(idx[1:])]
        return fn(self._reader, prefix, slice(None))[tuple(idx)]

    def __call__(self, path_: tuple) -> Callable[[tuple], np.ndarray]:
        reader, config = self._reader, self._config
        head, rest = path_[0], tuple(path_[1:])
        if head == "embed_UD":
            return lambda idx: reader("model.embed_tokens.weight")[idx]
        if head == "head_DU":
            return lambda idx: reader("lm_head.weight").T[idx]
        if head == "norm":
            return lambda idx: reader("model.norm.weight")[idx]
        if head == "groups":
            g, rel = rest[0], rest[1:]
            fn = layer_readers(config, self._groups[g][0])[rel]
            experts_axis = rel[-1] in _EXPERT_PARAMS
            first, count = self._starts[g], self._groups[g][1]

            def read(idx):
                layers = range(first, first + count)[idx[0]]
                prefixes = [f"model.layers.{i}." for i in layers]
                return np.stack([self._layer(fn, p, experts_axis, idx[1:]) for p in prefixes])

            return read
        if head == "mtp":
            k, rel = rest[0], rest[1:]
            prefix = f"model.layers.{config.num_hidden_layers + k}."
            if rel in MTP_READERS:
                return lambda idx: reader(prefix + MTP_READERS[rel])[idx]
            if rel == ("eh_proj_2DD",):
                return lambda idx: reader(prefix + "eh_proj.weight").T[idx]
            fn = layer_readers(config, config.is_moe_layer(config.num_hidden_layers + k))[rel[1:]]
            return functools.partial(self._layer, fn, prefix, rel[-1] in _EXPERT_PARAMS)
        raise KeyError(f"no HF source for parameter {path_}")


def _load_leaf(path: str, path_: tuple, variable, read: Callable, mesh):
    """`variable` holding its array read through `read`, placed in its sharding."""
    target = jnp.dtype(variable.dtype)
    shape = variable.shape

    def callback(idx):
        idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
        return np.asarray(read(idx), np.float32).astype(target)

    try:
        value = jax.make_array_from_callback(shape, _sharding(variable, mesh), callback)
    except KeyError as e:
        raise InputError(
            f"{path}: missing tensor {e} (needed for {'.'.join(map(str, path_))})"
            "; the weights do not match its config.json"
        ) from None
    if value.shape != shape:
        raise InputError(
            f"{path}: {'.'.join(map(str, path_))} has shape {value.shape}, its "
            f"config.json implies {shape}"
        )
    return variable.replace(value)


def _check_all_read(reader: CheckpointReader, path: str) -> None:
    """Refuses a checkpoint with tensors the model has no place for."""
    unexpected = [
        n
        for n in reader.names()
        if n not in reader.used and not n.endswith("_scale_inv") and not _IGNORED.search(n)
    ]
    if unexpected:
        raise InputError(
            f"{path}: {len(unexpected)} tensors do not fit its config.json, e.g. {unexpected[:5]}"
        )
