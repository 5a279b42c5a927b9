"""Forward+backward tokens/s: our jitted model vs HuggingFace's PyTorch model, same weights.

    python bench/model_cpu.py [--batch 8 --seq 256 --repeats 7]

Both run on this machine's CPU in one process, interleaved, median of repeats; the table's last
column is our speed over theirs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny  # noqa: E402
from mla_moe import DeepSeekModel, ModelConfig  # noqa: E402
from mla_moe.hf import save_pretrained  # noqa: E402
from mla_moe.losses import cross_entropy  # noqa: E402

# The tiny model (configs/tiny.py) at twice its widths with a 4096-token vocabulary, without MTP
# and the balancing terms, which the timed step (and transformers' model) leaves out.
CONFIG = tiny.model_config(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    moe_intermediate_size=128,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    max_position_embeddings=4096,
    num_nextn_predict_layers=0,
    seq_balance_alpha=0.0,
    expert_bias_update_rate=0.0,
).to_dict()


def jax_step(model):
    """(step, params): step(params, tokens_BT) -> (mean next-token loss, its gradient), the
    forward+backward that is timed here (bench/profile_cpu.py profiles the same function)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, tokens_BT):
        def loss(params):
            out = nnx.merge(graphdef, params)(tokens_BT)
            with jax.named_scope("loss"):
                # Position t predicts token t + 1; the last position has no target (weight 0),
                # as in the trainer and in transformers' loss (which pads the labels).
                targets_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
                weights_BT = jnp.ones(tokens_BT.shape).at[:, -1].set(0.0)
                s, n = cross_entropy(out.logits, targets_BT, weights_BT)
                return s / n

        return jax.value_and_grad(loss)(params)

    return step, params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = ModelConfig(**CONFIG)
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, os.path.join(d, "m"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(d, "m"), dtype=torch.float32
        )
    hf.config._attn_implementation = "sdpa"
    hf.train()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    tokens_j = jnp.asarray(tokens)
    tokens_t = torch.as_tensor(tokens)
    ours_step, params = jax_step(model)

    def ours():
        jax.block_until_ready(ours_step(params, tokens_j))

    def theirs():
        hf.zero_grad(set_to_none=True)
        out = hf(input_ids=tokens_t, labels=tokens_t)
        out.loss.backward()

    # correctness first: same loss on the same weights
    l_ours = float(ours_step(params, tokens_j)[0])
    l_theirs = float(hf(input_ids=tokens_t, labels=tokens_t).loss)
    print(f"loss ours {l_ours:.6f} transformers {l_theirs:.6f}")
    ours(), theirs()  # warm up
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):
        for fn, acc in ((ours, t_ours), (theirs, t_theirs)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    n_tok = args.batch * args.seq
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"batch {args.batch} x seq {args.seq}, median of {args.repeats}"
    )
    print(f"{'case':<28}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}{'target':>10}")
    print(
        f"{'fwd+bwd 4L h256 E16 top4':<28}{n_tok / mo:>12.0f}{n_tok / mt:>12.0f}"
        f"{mt / mo:>8.2f}{'> 1':>10}"
    )


if __name__ == "__main__":
    main()
