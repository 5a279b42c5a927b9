"""Run presets, one file each: `--config=configs/NAME.py[:VARIANT]` loads `get_config(VARIANT)`.

What every preset's `get_config` shares lives here. `pick` turns a variant's name into its
config ("" is the preset itself; an unknown name is one error listing the known ones), and
`published` is the whole `get_config` of a published model: its full-size run, or `runlocal`,
the same model at toy sizes for two training steps on a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import ml_collections


def pick(
    preset_file: str,
    variant: str,
    variants: Mapping[str, Callable[[], ml_collections.ConfigDict]],
) -> ml_collections.ConfigDict:
    """`variants[variant]()`. An unknown variant is a ValueError naming the preset's file (the
    caller's `__file__`) and the variants it has."""
    if variant not in variants:
        known = ", ".join(repr(v) for v in variants if v) or "none"
        name = f"configs/{os.path.basename(preset_file)}"
        raise ValueError(f"{name}: unknown variant {variant!r} (known: {known})")
    return variants[variant]()


def published_train(**fields) -> dict:
    """The train section of a published DeepSeek run (V2-Lite, V2, V3): the recipe they share,
    with `fields` (steps, batch, learning rate, eval cadence) set per model."""
    return dict(
        warmup_steps=2000,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        grad_clip_norm=1.0,
        eval_batches=8,
        # Adam moments in bfloat16: half their memory (5.25 GB per chip for V3 on 512 chips);
        # on the tiny preset they train the same as float32 within the seed spread
        # (bench/RESULTS.md).
        moment_dtype="bfloat16",
        **fields,
    )


def published(
    preset_file: str,
    variant: str,
    model: ml_collections.ConfigDict,
    runlocal_sizes: dict,
    **sections: dict,
) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a published `model`: "" is its run with the run `sections`
    (`run_config`'s overrides: train, checkpoint, log, mesh, ...); "runlocal" is the same model
    with `runlocal_sizes` (every other field as published), trained two steps on a CPU."""
    from mla_moe.train.config import run_config, runlocal_config

    return pick(
        preset_file,
        variant,
        {
            "": lambda: run_config(model, **sections),
            "runlocal": lambda: runlocal_config(model, runlocal_sizes),
        },
    )
