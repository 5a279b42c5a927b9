"""`save_pretrained`: `DeepSeekModel` -> a HuggingFace directory (config.json + safetensors)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_moe.decoder import DeepSeekModel, layer_groups
from mla_moe.hf.mapping import MTP_READERS, layer_writers
from mla_moe.hf.safetensors_io import write_safetensors

DEFAULT_SHARD_BYTES = 4 * 2**30


class _Lazy:
    """Arguments of one tensor's writer, sliced from the model only when it is written."""

    def __init__(self, arrays: dict, index: int | None = None):
        self.arrays, self.index = arrays, index

    _last: tuple | None = None  # (owner, host arrays): one layer held at a time

    def concrete(self):
        if _Lazy._last is None or _Lazy._last[0] is not self:
            if self.index is None:
                host = {k: np.asarray(v[...]) for k, v in self.arrays.items()}
            else:
                host = {k: np.asarray(v[...][self.index]) for k, v in self.arrays.items()}
            _Lazy._last = (self, host)
        return _Lazy._last[1]

    def abstract(self):
        cut = 0 if self.index is None else 1
        return {k: jax.ShapeDtypeStruct(v.shape[cut:], v.dtype) for k, v in self.arrays.items()}


def _tensor_plan(model: DeepSeekModel):
    """[(hf name, writer, _Lazy args)] in file order."""
    config = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    plan = []

    def whole(fn, *path):
        return (lambda a: fn(a["x"])), _Lazy({"x": flat[path]})

    def add(name, fn_args):
        plan.append((name, *fn_args))

    def ident(a):
        return a

    def transpose(a):
        return a.T

    add("model.embed_tokens.weight", whole(ident, "embed_UD"))
    layer = 0
    for g, (moe, n) in enumerate(layer_groups(config)):
        rel = {p[2:]: v for p, v in flat.items() if p[:2] == ("groups", g)}
        for j in range(n):
            args = _Lazy(rel, j)
            for suffix, fn in layer_writers(config, moe):
                add(f"model.layers.{layer}.{suffix}", (fn, args))
            layer += 1
    add("model.norm.weight", whole(ident, "norm", "weight"))
    head = whole(ident, "embed_UD") if config.tie_word_embeddings else whole(transpose, "head_DU")
    if not config.tie_word_embeddings:
        add("lm_head.weight", head)
    for k in range(config.num_nextn_predict_layers):
        idx = config.num_hidden_layers + k
        prefix = f"model.layers.{idx}."
        args = _Lazy({p[3:]: v for p, v in flat.items() if p[:3] == ("mtp", k, "layer")})
        for suffix, fn in layer_writers(config, config.is_moe_layer(idx)):
            add(prefix + suffix, (fn, args))
        for ours, theirs in MTP_READERS.items():
            add(prefix + theirs, whole(ident, "mtp", k, *ours))
        add(prefix + "eh_proj.weight", whole(transpose, "mtp", k, "eh_proj_2DD"))
        add(prefix + "embed_tokens.weight", whole(ident, "embed_UD"))
        add(prefix + "shared_head.head.weight", head)
    return plan


def save_pretrained(model: DeepSeekModel, path: str | os.PathLike, *,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> None:
    """Writes `path/config.json` and `model*.safetensors` (+ index) in HF DeepSeek layout.

    Experts are written per expert (the original checkpoint names, which transformers also
    reads). The directory is written under a temporary name and renamed at the end, so an
    interrupted save never leaves a half-written checkpoint at `path`; an existing non-empty
    `path` is refused unless `overwrite=True`.
    """
    path = os.fspath(path)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
    config = model.config
    plan = _tensor_plan(model)
    specs = []
    for name, fn, args in plan:
        out = jax.eval_shape(fn, args.abstract())
        dtype = np.dtype(jnp.float32) if ".gate." in name else np.dtype(out.dtype)
        specs.append((name, tuple(out.shape), dtype))
    # Split into files of at most max_shard_bytes.
    files, current, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            files.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    files.append(current)

    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
    try:
        weight_map, total = {}, 0
        for f_idx, members in enumerate(files):
            fname = ("model.safetensors" if len(files) == 1
                     else f"model-{f_idx + 1:05d}-of-{len(files):05d}.safetensors")
            by_name = {plan[i][0]: plan[i] for i in members}

            def produce(name, by_name=by_name):
                _, fn, args = by_name[name]
                return np.asarray(jax.device_get(fn(args.concrete())))

            total += write_safetensors(os.path.join(tmp, fname), [specs[i] for i in members],
                                       produce)
            weight_map.update({plan[i][0]: fname for i in members})
        if len(files) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        _Lazy._last = None
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _Lazy._last = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
