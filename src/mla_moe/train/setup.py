"""Run setup: the mesh, the data, and the optimizer, state layout and jitted steps on it.

Nothing here compiles except `jitted_steps`: `run_mesh` and `open_data` fail on bad input
first, `build` only traces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from mla_moe import paths, sharding
from mla_moe.data import (
    PipelineConfig,
    TokenSplit,
    default_corpus,
    eval_batches,
    train_iterator,
)
from mla_moe.errors import MissingInputError
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import optimizer as optimizer_lib
from mla_moe.train import preemption
from mla_moe.train import train_step as step_lib
from mla_moe.train.config import ConfigError

if TYPE_CHECKING:
    import ml_collections

    from mla_moe.config import ModelConfig


@contextlib.contextmanager
def run_mesh(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Iterator[tuple[ModelConfig, jax.sharding.Mesh]]:
    """Validates `config`, builds its mesh over `devices` (default: all of this job's; or the
    compile-only devices of another machine) and activates it with the config's rules
    (`config.mesh.rules`). Yields (ModelConfig, mesh); fails before compiling on bad input."""
    cfg = config_lib.validate(config)
    try:
        mesh = sharding.make_mesh(config.mesh, devices, config=cfg)
    except ValueError as e:  # sizes that do not fit the devices or the model, naming the axis
        raise ConfigError(str(e)) from None
    rules = config.mesh.get("rules") if hasattr(config.mesh, "get") else None
    with sharding.use_mesh(mesh, rules.to_dict() if hasattr(rules, "to_dict") else rules):
        yield cfg, mesh


@dataclasses.dataclass(frozen=True)
class RunData:
    """The run's token store: its train split, the pipeline reading it, the train iterator
    (checkpointed with the state) and the validation batches (empty without evaluation)."""

    path: str
    train: TokenSplit
    pipe: PipelineConfig
    iterator: Any
    val: list


def open_data(config: ml_collections.ConfigDict, cfg: ModelConfig) -> RunData:
    """Opens `config.data.path` (default: the bundled corpus; several comma-separated stores
    are mixed by `data.weights`) for this process; a missing, empty or too small store, or one
    whose vocabulary the model cannot embed, raises."""
    from mla_moe.data import mixture, raw_source

    weights = mixture.parse_weights(config.data.path, config.data.get("weights", ""))
    sources = [_resolve_data(p) for p in mixture.source_paths(config.data.path)]
    sources = sources or [default_corpus()]
    stores = [p for p in sources if not raw_source.is_raw(p)]
    if len(stores) < len(sources):
        train_split = _open_with_raw(config, cfg, sources, weights)
    else:
        train_split = mixture.open_split(sources, "train", weights)
    if train_split.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"data.path uses a vocabulary of {train_split.vocab_size} tokens but "
            f"model.vocab_size={cfg.vocab_size}"
        )
    t = config.train
    pipe = PipelineConfig(
        seq_len=t.seq_len,
        global_batch=t.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=config.data.num_threads,
        prefetch=config.data.prefetch,
        workers=config.data.get("workers", 1),
    )
    iterator = train_iterator(train_split, pipe)  # raises if the data is too small
    val = []
    if t.eval_batches:  # a raw source has no validation split: the stores' by their weights
        val_weights = [w for p, w in zip(sources, weights) if not raw_source.is_raw(p)]
        val_weights = [w / sum(val_weights) for w in val_weights]
        val = eval_batches(mixture.open_split(stores, "val", val_weights), pipe, t.eval_batches)
    return RunData(path=",".join(sources), train=train_split, pipe=pipe, iterator=iterator,
                   val=val)


def _open_with_raw(config, cfg: ModelConfig, sources: list[str], weights: list[float]):
    """The train split of sources some of which are raw (`raw:GLOB`): the tokenizer is
    loaded and checked against the model and the stores before any file is tokenized."""
    from mla_moe.data import load_tokenizer, mixture, raw_source, read_metadata
    from mla_moe.data.tokenizer import check_fits

    spec = config.data.tokenizer
    tokenizer = load_tokenizer(spec)
    check_fits(tokenizer, cfg.vocab_size)
    splits = []
    for path in sources:
        if raw_source.is_raw(path):
            splits.append(raw_source.RawSource(path, spec, config.data.get("text_key", "text")))
            continue
        store_tokenizer = read_metadata(path).get("tokenizer")
        if store_tokenizer not in (None, tokenizer.spec):
            raise ConfigError(
                f"data.tokenizer={spec!r} differs from the tokenizer of the store {path!r} "
                f"({store_tokenizer!r}); mixed sources must share one tokenizer")
        splits.append(TokenSplit(path, "train"))
    return splits[0] if len(splits) == 1 else mixture.TokenMixture(splits, weights)


def _resolve_data(path: str) -> str:
    from mla_moe.data import raw_source

    if raw_source.is_raw(path):
        return path
    hint = f"; to train on raw files write raw:{path} (and set data.tokenizer)"
    if not paths.resolve(path).exists():
        raise MissingInputError(
            f"data.path={path!r} does not exist"
            f"{hint if any(c in path for c in '*?[') else ''}; pass a token store from "
            "`python -m launch.prepare_data`, raw files as raw:GLOB, or '' for the default "
            "corpus"
        )
    if paths.resolve(path).is_file():
        raise MissingInputError(f"data.path={path!r} is a file, not a token store{hint}")
    return path


def optimizer_key(train_cfg: ml_collections.ConfigDict) -> tuple:
    """The optimizer settings of `config.train` as a hashable tuple (the key of `build`). The
    schedule reads train.steps only as the decay length when decay_steps is 0, so both enter
    as that length: a run continued past its decay builds (and compiles) the same program."""
    decay = int(train_cfg.decay_steps or train_cfg.steps)
    names = (
        "warmup_steps",
        "learning_rate",
        "min_lr_ratio",
        "weight_decay",
        "b1",
        "b2",
        "eps",
        "grad_clip_norm",
        "moment_dtype",
        "dsa_stage",
    )
    return (("steps", decay), ("decay_steps", decay), *((n, train_cfg[n]) for n in names))


@dataclasses.dataclass(frozen=True)
class Built:
    """One run setup: optimizer, the state's abstract layout and shardings, jitted functions.

    Nothing here holds device memory: `init_fn` allocates the state only when called, and
    `step_fn` / `eval_fn` compile on first call or through `.lower(...).compile()`.
    """

    tx: object
    abstract_state: object
    state_sh: object
    batch_sh: object
    init_fn: Callable
    step_fn: Callable
    eval_fn: Callable
    # (batch_size, seq_len) -> the compiled (step, eval), filled by `jitted_steps`: runs of one
    # setup in one process (tests, restarts) compile once.
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def state_spec(self) -> Any:
        """The train state as ShapeDtypeStructs carrying the run's shardings."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_sh,
        )

    def batch_spec(self, batch_size: int, seq_len: int) -> dict:
        """A global [batch_size, seq_len] batch as ShapeDtypeStructs over the batch axes."""
        return step_lib.batch_spec(batch_size, seq_len, self.batch_sh)


def build(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, cfg: ModelConfig | None = None
) -> Built:
    """The run's optimizer, state layout and jitted step functions on `mesh`, used by `train`
    and by `launch.compile` alike. Reads no data, allocates nothing; call it inside
    `run_mesh(config, ...)` so that the rules in effect are the run's. `cfg`: the
    ModelConfig `run_mesh` yielded (derived from `config` when None)."""
    t = config.train
    if cfg is None:
        cfg = config_lib.model_config(config)
    return _build(
        cfg,
        optimizer_key(t),
        config.seed,
        mesh,
        t.grad_accum_steps,
        sharding.current_rules(),
        t.loss_chunk_tokens,
        t.dsa_stage,
        float(t.indexer_loss_coef),
    )


def _under_rules(fn: Callable, rules: sharding.Rules) -> Callable:
    """`fn` run (traced) under `rules`, whatever rules are in effect where it is called."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.use_rules(rules):
            return fn(*args, **kwargs)

    return wrapped


@functools.lru_cache(maxsize=4)
def _build(
    cfg,
    optimizer_key: tuple,
    seed: int,
    mesh,
    grad_accum_steps: int,
    rules: sharding.Rules,
    loss_chunk_tokens: int = 0,
    dsa_stage: str = "off",
    indexer_loss_coef: float = 1.0,
) -> Built:
    """`build`, cached so that runs of the same setup in one process (tests, benchmarks,
    restarts) trace and compile once. Everything in the result depends on the logical rules
    (the shardings, and the constraints traced into the steps), so they are part of the key
    and every function is traced under them."""
    import ml_collections

    tx, schedule = optimizer_lib.make_optimizer(ml_collections.ConfigDict(dict(optimizer_key)))
    graphdef, _, _ = step_lib.abstract_model(cfg)
    init = _under_rules(step_lib.make_init_fn(cfg, tx, seed), rules)
    abstract_state = jax.eval_shape(init)
    state_sh = sharding.state_shardings(abstract_state, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    step_cfg = step_lib.StepConfig(
        grad_accum_steps=grad_accum_steps,
        loss_chunk_tokens=loss_chunk_tokens,
        dsa_stage=dsa_stage,
        indexer_loss_coef=indexer_loss_coef,
    )
    train_step = functools.partial(
        step_lib.train_step, graphdef=graphdef, cfg=cfg, tx=tx, schedule=schedule, step_cfg=step_cfg
    )
    step_fn = jax.jit(
        _under_rules(train_step, rules),
        in_shardings=(state_sh, batch_sh, None),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    eval_step = functools.partial(
        step_lib.eval_step, graphdef=graphdef, loss_chunk_tokens=loss_chunk_tokens
    )
    eval_fn = jax.jit(_under_rules(eval_step, rules), in_shardings=(state_sh, batch_sh))
    return Built(
        tx=tx,
        abstract_state=abstract_state,
        state_sh=state_sh,
        batch_sh=batch_sh,
        init_fn=jax.jit(init, out_shardings=state_sh),
        step_fn=step_fn,
        eval_fn=eval_fn,
    )


def init_from_hf(path: str, cfg: ModelConfig, built: Built):
    """Initial state from a HuggingFace checkpoint whose shapes match the configured model."""
    from mla_moe.hf import load_pretrained

    # Each tensor goes straight into its sharding on the run's mesh.
    mesh = jax.tree.leaves(built.state_sh)[0].mesh
    model = load_pretrained(path, dtype=cfg.param_dtype, mesh=mesh)
    _, params, extra = nnx.split(model, nnx.Param, ...)
    want = ckpt_lib.flatten_state(built.abstract_state["params"])
    got = ckpt_lib.flatten_state(params)
    mismatch = [k for k in want if k not in got or tuple(got[k].shape) != tuple(want[k].shape)]
    if mismatch or set(got) != set(want):
        raise ConfigError(
            f"--init_from_hf={path!r} does not match the configured model (e.g. "
            f"{(mismatch or sorted(set(got) ^ set(want)))[:3]}); set model.* to its config"
        )
    tx = built.tx

    def build(params, extra):
        return {
            "step": jax.numpy.zeros((), jax.numpy.int32),
            "params": params,
            "extra": extra,
            "opt_state": tx.init(params),
        }

    return jax.jit(build, out_shardings=built.state_sh)(params, extra)


def jitted_steps(
    built: Built, state, data: RunData, fault_step: np.int32, train_cfg, *, verbose: bool = True
) -> tuple[Callable, Callable]:
    """(step_fn, eval_fn) for the loop, compiled here for the run's batch, with a line before
    and after on the console (`verbose`): at real sizes the first compile takes minutes.

    With several processes the processes then meet: Gloo gives processes 30 s to meet at their
    first collective, and compilation times can differ by more on a loaded machine, so compile
    first, then meet at a barrier of the coordination service (no collective), then warm up
    the stop-signal all-gather."""
    key = (train_cfg.batch_size, train_cfg.seq_len, bool(data.val))
    if key not in built.compiled:
        what = "the train step" + (" and the evaluation step" if data.val else "")
        if verbose:
            print(f"compiling {what} ...", flush=True)
        t0 = time.perf_counter()
        batch = built.batch_spec(*key[:2])
        step_fn = built.step_fn.lower(state, batch, fault_step).compile()
        eval_fn = built.eval_fn.lower(state, batch).compile() if data.val else built.eval_fn
        built.compiled[key] = step_fn, eval_fn
        if verbose:
            print(f"compiled {what} in {time.perf_counter() - t0:.1f} s", flush=True)
    step_fn, eval_fn = built.compiled[key]
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp

        ocp.multihost.sync_global_processes("mla_moe_train_compiled", timeout=1800)
        preemption.stop_signal(None)
    return step_fn, eval_fn
