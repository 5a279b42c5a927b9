"""Text generation from a HuggingFace DeepSeek directory or a training workdir.

    python -m launch.generate --hf=DIR --prompt="Hello" --prompt="Bye" --max_new_tokens=32
    python -m launch.generate --checkpoint=WORKDIR --tokenizer=byte --temperature=0.8 --top_p=0.9
    python -m launch.generate --hf=DIR --mesh=expert=4,tensor=2 --prompt="Hello"

--mesh shards the model over the devices as in training (experts over `expert`, heads over
`tensor`, the batch over `data`/`fsdp`; unnamed axes are 1, one axis may be -1): an HF
checkpoint is loaded straight into its shards. Greedy unless --temperature > 0. Prints each
prompt's continuation as text and the decode throughput (new tokens / wall time of the
`generate` call; the first call includes compilation, --timed_runs=2 adds a run with
everything compiled).
"""

from __future__ import annotations

import sys
import time

from absl import flags

from launch import cli
from mla_moe.errors import InputError

_HF = flags.DEFINE_string("hf", "", "HuggingFace DeepSeek checkpoint directory.")
_CKPT = flags.DEFINE_string("checkpoint", "", "Training workdir (launch/train.py --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample at this temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte",
                                 "'byte' (token = byte value), a tokenizer.json or a .model file.")
_EOS = flags.DEFINE_integer("eos_id", None, "Stop token (default: the model config's; -1: none).")
_FP8 = flags.DEFINE_bool("fp8_cache", False, "FP8 latent cache (656 B per token per layer).")
_SPEC = flags.DEFINE_bool("speculative", False, "Greedy MTP speculative decoding.")
_RUNS = flags.DEFINE_integer("timed_runs", 1, "Runs of the same generation (>= 2: warm timing).")
_MESH = flags.DEFINE_string("mesh", "", "Device mesh, e.g. 'expert=4,tensor=2' (default: none, "
                            "one device).")


def parse_mesh(text: str) -> dict[str, int] | None:
    """'expert=4,tensor=2' -> {'expert': 4, 'tensor': 2}; '' -> None."""
    from mla_moe.sharding import MESH_AXES

    if not text.strip():
        return None
    sizes = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise InputError(f"--mesh: unknown axis {name!r} in {item!r}; the axes are "
                             f"{', '.join(MESH_AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise InputError(f"--mesh: {item!r} needs an integer size, e.g. expert=4") from None
    return sizes


def check_flags() -> None:
    """The generation flags, before any model is read."""
    if bool(_HF.value) == bool(_CKPT.value):
        raise InputError("pass exactly one of --hf=DIR or --checkpoint=DIR")
    if not _PROMPT.value:
        raise InputError("pass at least one --prompt")
    if _MAX_NEW.value < 1:
        raise InputError(f"--max_new_tokens must be >= 1, got {_MAX_NEW.value}")
    if _TEMP.value < 0:
        raise InputError(f"--temperature must be >= 0 (0: greedy), got {_TEMP.value}")
    if _TOP_K.value < 0:
        raise InputError(f"--top_k must be >= 0 (0: all tokens), got {_TOP_K.value}")
    if not 0 < _TOP_P.value <= 1:
        raise InputError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
    if _RUNS.value < 1:
        raise InputError(f"--timed_runs must be >= 1, got {_RUNS.value}")
    if _STEP.value is not None and _HF.value:
        raise InputError("--step applies to --checkpoint only")
    if _SPEC.value and _TEMP.value > 0:
        raise InputError("--speculative is greedy only (--temperature=0)")


def _make_mesh(sizes, config):
    from mla_moe import sharding

    try:
        return sharding.make_mesh(sizes, config=config)
    except ValueError as e:  # sizes that do not fit the devices or the model, naming the axis
        raise InputError(f"--mesh={_MESH.value}: {e}") from None


def main(argv: list[str]) -> None:
    """Loads the model, generates for every --prompt and prints the text and throughput."""
    check_flags()

    from mla_moe.config import ModelConfig
    from mla_moe.data.tokenizer import load_tokenizer
    from mla_moe.generation import generate
    from mla_moe.sampling import Sampling
    from mla_moe.speculative import speculative_generate
    from mla_moe.train.checkpoint import load_checkpoint, workdir_model_config

    mesh_sizes = parse_mesh(_MESH.value)
    tokenizer = load_tokenizer(_TOKENIZER.value)  # checked before any weight is read
    mesh = None
    if _HF.value:
        from mla_moe.hf import load_pretrained

        if mesh_sizes:  # checked against the model before any weight is read
            mesh = _make_mesh(mesh_sizes, ModelConfig.from_hf(_HF.value))
        model, source = load_pretrained(_HF.value, mesh=mesh), _HF.value
    else:
        if mesh_sizes:
            mesh = _make_mesh(mesh_sizes, workdir_model_config(_CKPT.value))
        model, step = load_checkpoint(_CKPT.value, _STEP.value)
        source = f"{_CKPT.value} step {step}"
    config = model.config
    prompts = [tokenizer.encode(p) for p in _PROMPT.value]
    for text, ids in zip(_PROMPT.value, prompts):
        if not ids:
            raise InputError(f"--prompt={text!r} encodes to no tokens; give some text")
        if max(ids) >= config.vocab_size:
            raise InputError(f"--prompt={text!r} encodes to ids outside the model's vocab "
                             f"({config.vocab_size}); is --tokenizer={_TOKENIZER.value!r} the "
                             "one the model was trained with?")
        if len(ids) + _MAX_NEW.value > config.max_position_embeddings:
            raise InputError(f"--prompt={text!r} ({len(ids)} tokens) plus --max_new_tokens="
                             f"{_MAX_NEW.value} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
    eos = config.eos_token_id if _EOS.value is None else _EOS.value
    eos = None if eos is None or eos < 0 else eos
    sampling = None
    if _TEMP.value > 0:
        sampling = Sampling(temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
    if _SPEC.value and not config.num_nextn_predict_layers:
        raise InputError(f"--speculative needs MTP modules; {source} has none "
                         "(num_nextn_predict_layers=0)")

    where = "one device" if mesh is None else " x ".join(
        f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "a 1-device mesh"
    print(f"model: {source} ({config.hf_model_type}, {config.num_hidden_layers} layers) on "
          f"{where}; {len(prompts)} prompt(s); {'fp8' if _FP8.value else config.dtype} latent "
          "cache", flush=True)
    stats = None
    for run in range(max(1, _RUNS.value)):
        start = time.perf_counter()
        if _SPEC.value:
            outputs, stats = speculative_generate(model, prompts, max_new_tokens=_MAX_NEW.value,
                                                  eos_id=eos, fp8=_FP8.value, mesh=mesh)
        else:
            outputs = generate(model, prompts, max_new_tokens=_MAX_NEW.value, sampling=sampling,
                               eos_id=eos, seed=_SEED.value, fp8=_FP8.value, mesh=mesh)
        seconds = time.perf_counter() - start
        total = sum(len(o) for o in outputs)
        label = "with compilation" if run == 0 else "compiled"
        print(f"run {run}: {total} new tokens in {seconds:.2f} s = {total / seconds:.1f} "
              f"tokens/s ({label})", flush=True)
    for text, ids in zip(_PROMPT.value, outputs):
        print(f"--- prompt: {text!r}\n{tokenizer.decode(ids)!r}\ntokens: {ids}")
    if stats is not None:
        print(f"MTP acceptance rate: {stats.acceptance_rate:.3f} "
              f"({stats.tokens_per_step:.2f} tokens per main-model step)")
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run(main)
