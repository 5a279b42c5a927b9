"""Run settings shared by every config file, and their validation.

A config file's `get_config()` returns `run_config(model_config(), ...)` with its own values;
`validate` turns a bad value into one `ConfigError` line naming the field, before anything is
compiled.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

from mla_moe import ModelConfig
from mla_moe.data import raw_source
from mla_moe.data.mixture import parse_weights, source_paths
from mla_moe.errors import ConfigError
from mla_moe.train.optimizer import MOMENT_DTYPES

NAN_POLICIES = ("stop", "skip")
# DeepSeek Sparse Attention training (V3.2, dsa_loss.py): "off" (the plain LM loss), "warmup"
# (dense attention, only the indexer trains, on its KL alone), "sparse" (top-k attention, every
# weight trains: the LM loss, plus the indexer's KL that reaches the indexer only).
DSA_STAGES = ("off", "warmup", "sparse")
MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
# The optional numeric model fields ("int | None", "float | None") and their number type.
_NUMBER_TYPES = {
    f.name: {"int | None": int, "float | None": float}[str(f.type)]
    for f in dataclasses.fields(ModelConfig)
    if str(f.type) in ("int | None", "float | None")
}


def run_config(model: ml_collections.ConfigDict, **sections: dict) -> ml_collections.ConfigDict:
    """Defaults for every run setting; `sections` maps a section name to overrides."""
    c = ml_collections.ConfigDict()
    c.model = model
    # Every ModelConfig field can be overridden (--config.model.dtype=bfloat16), not only the
    # ones the config file spells out; a field whose default is None gets a typed placeholder
    # where its type is a number (--config.model.dispatch_capacity_factor=2.0), else stays
    # unset.
    for name, default in MODEL_DEFAULTS.items():
        if name in c.model:
            continue
        if default is not None:
            c.model[name] = default
        elif name in _NUMBER_TYPES:
            c.model[name] = ml_collections.config_dict.placeholder(_NUMBER_TYPES[name])
    c.seed = 0
    c.train = dict(
        steps=1000,
        batch_size=32,  # global, in sequences
        seq_len=512,
        # A micro-batches of batch_size / A sequences run one after another (train_step.py).
        # Every loss is summed over them and divided once by the whole batch's count, so the
        # loss, the gradient and the logged losses are the batch's, whatever the micro-batches'
        # valid tokens. Per micro-batch by definition: with model.seq_aux=False the balance
        # losses' "batch" (the load f_i and mean score P_i of each expert) is the micro-batch,
        # and the loss is their mean over the A micro-batches (the whole batch's f_i would need
        # every micro-batch's routing before the first backward); likewise moe_impl="capacity"
        # and dispatch_capacity_factor size expert capacity from the micro-batch's tokens.
        grad_accum_steps=1,
        # Tokens per device per chunk of the chunked CE + MTP loss (losses.chunked_cross_entropy;
        # the [tokens, vocab] logits are never whole); 0: whole logits, then the plain loss.
        loss_chunk_tokens=8192,
        learning_rate=3e-4,
        warmup_steps=100,
        # The cosine's length in steps (then held at min_lr_ratio); 0: train.steps. A run
        # continued with another train.steps keeps the decay length it had (its config.json
        # records it) unless this is given: a finished run of 150 steps rerun with
        # steps=200 holds its floor for 50 more steps, where decay_steps=200 raises the
        # learning rate again.
        decay_steps=0,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip_norm=1.0,
        moment_dtype="float32",  # storage of both Adam moments: "float32" or "bfloat16"
        dsa_stage="off",  # V3.2 only: "off", "warmup" or "sparse" (DSA_STAGES above)
        indexer_loss_coef=1.0,  # the indexer's KL (averaged over tokens and layers) times this
        nan_policy="stop",  # "stop" or "skip" a step whose loss or gradient is not finite
        eval_every_steps=200,  # 0: only at the end
        eval_batches=4,
        fault_nan_step=-1,  # test hook: make this step's loss NaN
    )
    c.data = dict(
        # Token store(s) from launch.prepare_data, comma-separated to mix several (each may be
        # a store of parts from a multi-host prepare), or raw files tokenized on the fly as
        # "raw:GLOB" (raw_source.py); "" = the bundled default corpus.
        path="",
        weights="",  # the sources' sampling weights, e.g. "0.7,0.3"; "" = equal (mixture.py)
        tokenizer="",  # for raw sources: "byte", a tokenizer.json, .model or HF checkpoint dir
        text_key="text",  # raw .jsonl/.parquet sources: the field or column holding the text
        workers=1,  # processes tokenizing each raw source (0: the training process itself)
        num_threads=2,
        prefetch=4,
    )
    c.checkpoint = dict(
        every_steps=200,
        max_to_keep=3,
        keep_every_steps=0,  # also keep every M-th step forever (0: off)
        async_save=True,
    )
    c.log = dict(
        every_steps=10,
        tensorboard=True,
        peak_tflops=0.0,  # per device; 0 = known accelerator peak, or a matmul timed on CPU
    )
    # data/fsdp/expert/tensor: per slice; dcn_data/dcn_fsdp: across slices (multislice.py).
    # context: how many chips share each sequence (context parallelism, context_parallel.py).
    c.mesh = dict(data=-1, fsdp=1, expert=1, context=1, tensor=1, dcn_data=1, dcn_fsdp=1)
    for name, values in sections.items():
        c[name].update(values)
    return c


def runlocal_config(model: ml_collections.ConfigDict, sizes: dict) -> ml_collections.ConfigDict:
    """A published preset at toy `sizes` (every other model field as published), trained for
    two steps on the bundled byte corpus: a CPU check that the preset runs end to end. Longer
    runs of it (`--config.train.steps=300`, the README's V3.2 walk-through) log every 10 steps
    and save every 50 (the last step is always logged and saved)."""
    model.update(sizes)
    return run_config(
        model,
        train=dict(
            steps=2, batch_size=8, seq_len=32, warmup_steps=1, eval_every_steps=0, eval_batches=1
        ),
        data=dict(num_threads=1, prefetch=2),
        checkpoint=dict(every_steps=50, max_to_keep=1),
        log=dict(every_steps=10),
        mesh=dict(data=-1, fsdp=1, expert=1, tensor=1),
    )


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of `config.model`; a bad field is a ConfigError naming it. The dense
    warm-up (`train.dsa_stage="warmup"`) trains with the main attention dense."""
    try:
        cfg = ModelConfig(**config.model.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    if config.train.get("dsa_stage", "off") == "warmup":
        cfg = cfg.replace(index_attention="dense")
    return cfg


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
    """Checks the run settings that need no devices or data; returns the ModelConfig."""
    cfg = model_config(config)
    t = config.train
    for name in ("steps", "batch_size", "seq_len", "grad_accum_steps"):
        v = t[name]
        _check(isinstance(v, int) and v > 0, f"train.{name} must be a positive integer, got {v!r}")
    _check(
        isinstance(t.loss_chunk_tokens, int)
        and not isinstance(t.loss_chunk_tokens, bool)
        and t.loss_chunk_tokens >= 0,
        f"train.loss_chunk_tokens must be an integer >= 0, got {t.loss_chunk_tokens!r}",
    )
    _check(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(
        isinstance(t.decay_steps, int) and not isinstance(t.decay_steps, bool)
        and t.decay_steps >= 0,
        f"train.decay_steps must be an integer >= 0 (0: train.steps), got {t.decay_steps!r}",
    )
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f"train.b1/b2 must be in [0, 1), got {t.b1}, {t.b2}")
    _check(t.grad_clip_norm >= 0, f"train.grad_clip_norm must be >= 0, got {t.grad_clip_norm}")
    _check(
        t.moment_dtype in MOMENT_DTYPES,
        f"train.moment_dtype must be one of {tuple(MOMENT_DTYPES)}, got {t.moment_dtype!r}",
    )
    _check(
        t.dsa_stage in DSA_STAGES,
        f"train.dsa_stage must be one of {DSA_STAGES}, got {t.dsa_stage!r}",
    )
    _check(
        t.dsa_stage == "off" or cfg.has_indexer,
        f"train.dsa_stage={t.dsa_stage!r} needs a V3.2 model with an indexer "
        f"(model.index_n_heads > 0, got {cfg.index_n_heads})",
    )
    _check(
        t.indexer_loss_coef >= 0, f"train.indexer_loss_coef must be >= 0, got {t.indexer_loss_coef}"
    )
    _check(
        t.nan_policy in NAN_POLICIES,
        f"train.nan_policy must be one of {NAN_POLICIES}, got {t.nan_policy!r}",
    )
    _check(
        t.eval_every_steps >= 0, f"train.eval_every_steps must be >= 0, got {t.eval_every_steps}"
    )
    _check(t.eval_batches >= 0, f"train.eval_batches must be >= 0, got {t.eval_batches}")
    _check(
        t.batch_size % t.grad_accum_steps == 0,
        f"train.batch_size={t.batch_size} is not divisible by "
        f"train.grad_accum_steps={t.grad_accum_steps}",
    )
    _check(
        t.seq_len <= cfg.max_position_embeddings,
        f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
        f"{cfg.max_position_embeddings}",
    )
    _check(
        config.checkpoint.every_steps > 0,
        f"checkpoint.every_steps must be > 0, got {config.checkpoint.every_steps}",
    )
    _check(
        config.checkpoint.max_to_keep >= 0,
        f"checkpoint.max_to_keep must be >= 0, got {config.checkpoint.max_to_keep}",
    )
    _check(config.log.every_steps > 0, f"log.every_steps must be > 0, got {config.log.every_steps}")
    _check(
        config.data.num_threads >= 0 and config.data.prefetch >= 0,
        "data.num_threads and data.prefetch must be >= 0",
    )
    parse_weights(config.data.path, config.data.get("weights", ""))
    _check_raw_sources(config)
    _check_context(config, cfg)
    return cfg


def _check_raw_sources(config: ml_collections.ConfigDict) -> None:
    """What raw sources (`raw:GLOB` entries of data.path) need of the run: a tokenizer, and no
    evaluation unless a token store (whose validation split is used) is mixed in."""
    data = config.data
    workers = data.get("workers", 1)
    _check(
        isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0,
        f"data.workers must be an integer >= 0, got {workers!r}",
    )
    entries = source_paths(data.path)
    raw = [e for e in entries if raw_source.is_raw(e)]
    if not raw:
        return
    for entry in raw:
        raw_source.pattern_of(entry)
    _check(
        bool(data.get("tokenizer", "")),
        f"data.tokenizer is required for the raw source {raw[0]!r} of data.path: give 'byte', "
        "a tokenizer.json, a SentencePiece .model or a HuggingFace checkpoint directory",
    )
    _check(
        config.train.eval_batches == 0 or len(raw) < len(entries),
        f"train.eval_batches={config.train.eval_batches}: raw sources have no validation "
        "split; set train.eval_batches=0, or mix in a token store (its split is used)",
    )


def _check_context(config: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """`mesh.context` (context parallelism) and what it needs of the run."""
    context = config.mesh.get("context", 1)
    _check(
        isinstance(context, int) and not isinstance(context, bool) and context >= 1,
        f"mesh.context must be a positive integer, got {context!r}",
    )
    if context == 1:
        return
    t = config.train
    _check(
        t.seq_len % (2 * context) == 0,
        f"train.seq_len={t.seq_len} is not divisible by 2 x mesh.context={context} (the "
        "zigzag layout's chunks)",
    )


def check_batch(config: ml_collections.ConfigDict, data_parallel: int, process_count: int) -> None:
    """The global (micro-)batch must split evenly over data-parallel devices and processes."""
    t = config.train
    micro = t.batch_size // t.grad_accum_steps
    _check(
        micro % data_parallel == 0,
        f"train.batch_size={t.batch_size} (micro-batch {micro} with "
        f"grad_accum_steps={t.grad_accum_steps}) is not divisible by the data-parallel size "
        f"{data_parallel} (mesh.data x mesh.fsdp x mesh.expert x mesh.dcn_*)",
    )
    _check(
        t.batch_size % process_count == 0,
        f"train.batch_size={t.batch_size} is not divisible by the {process_count} processes",
    )


# Fields that may differ between the run that wrote a checkpoint and the one resuming it.
# Everything else changes the parameters' structure or the data stream.
RESUMABLE_FIELDS = (
    "train.steps",
    "train.decay_steps",
    "train.eval_every_steps",
    "train.eval_batches",
    "train.nan_policy",
    "train.loss_chunk_tokens",
    "train.fault_nan_step",
    "data.num_threads",
    "data.prefetch",
    "checkpoint",
    "log",
    "mesh",
    "model.dtype",
    "model.remat_policy",
    "model.moe_impl",
    "model.capacity_factor",
    "model.attention_impl",
    "model.decode_attention",
)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@functools.cache
def _run_defaults() -> dict:
    """run_config's defaults for every run setting, flattened ("train.seq_len": 512, ...)."""
    return _flatten(run_config(ml_collections.ConfigDict()).to_dict())


def incompatible_fields(saved: dict, current: dict) -> list[str]:
    """'field: saved -> current' for every difference that forbids resuming."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS):
            continue
        # A field one config leaves out (written before the field existed) has its default:
        # ModelConfig's for model fields, run_config's for the run settings.
        if key.startswith("model."):
            default = MODEL_DEFAULTS.get(key.removeprefix("model."), "<absent>")
        else:
            default = _run_defaults().get(key, "<absent>")
        if a.get(key, default) == b.get(key, default):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs
