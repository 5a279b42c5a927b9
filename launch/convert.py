"""Converts weights to a HuggingFace DeepSeek directory.

    python -m launch.convert --checkpoint=WORKDIR [--step=N] --output=HF_DIR
    python -m launch.convert --hf=SRC_DIR --output=HF_DIR [--dtype=bfloat16]

The first exports a training run's model; the second rewrites an HF checkpoint (e.g. FP8
block-scaled or fused-expert weights to plain per-expert bf16/f32 safetensors). The output
directory is written atomically and an existing one is never overwritten without --overwrite.
"""

from __future__ import annotations

import os
from typing import Any

from absl import flags

from launch import cli
from mla_moe.errors import ExistingOutputError, InputError

_CKPT = flags.DEFINE_string("checkpoint", None, "Training workdir to export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_HF = flags.DEFINE_string("hf", None, "HuggingFace DeepSeek directory to rewrite.")
_OUT = flags.DEFINE_string("output", None, "Output HuggingFace directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Output weight dtype.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 4.0, "Largest safetensors file, in GiB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def check_flags() -> None:
    """What needs no loading: one source, an output that may be written. Before any weight
    is read (minutes at V3 size)."""
    if (_CKPT.value is None) == (_HF.value is None):
        raise InputError("pass exactly one of --checkpoint=WORKDIR or --hf=DIR")
    if _STEP.value is not None and _HF.value is not None:
        raise InputError("--step applies to --checkpoint only")
    if _SHARD_GB.value <= 0:
        raise InputError(f"--max_shard_gb must be > 0, got {_SHARD_GB.value}")
    out = _OUT.value
    if not out:
        raise InputError("--output is empty; pass the HuggingFace directory to write")
    if os.path.exists(out) and not _OVERWRITE.value and (
            not os.path.isdir(out) or os.listdir(out)):
        raise ExistingOutputError(f"--output={out!r} exists and is not empty; choose another "
                                  "directory or pass --overwrite to replace it")


def main(argv: list[str]) -> None:
    """Converts between an Orbax training checkpoint and a HuggingFace directory."""
    check_flags()
    from mla_moe.hf import load_pretrained, save_pretrained

    if _HF.value is not None:
        model = load_pretrained(_HF.value, dtype=_DTYPE.value)
        source = _HF.value
    else:
        from flax import nnx

        from mla_moe.train.checkpoint import load_checkpoint

        model, step = load_checkpoint(_CKPT.value, _STEP.value)
        if _DTYPE.value is not None:
            nnx.update(model, cast_params(nnx.state(model, nnx.Param), _DTYPE.value))
            model.config = model.config.replace(param_dtype=_DTYPE.value, dtype=_DTYPE.value)
        source = f"{_CKPT.value} step {step}"
    save_pretrained(model, _OUT.value, max_shard_bytes=int(_SHARD_GB.value * 2**30),
                    overwrite=_OVERWRITE.value)
    print(f"wrote {_OUT.value} from {source}")


def cast_params(params: Any, dtype: str) -> Any:
    """Casts floating parameters to `dtype`, keeping the router in float32 (as HF does)."""
    import jax
    import jax.numpy as jnp

    def cast(path, x):
        if "w_DE" in jax.tree_util.keystr(path) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


if __name__ == "__main__":
    cli.run(main)
