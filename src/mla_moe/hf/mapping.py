"""Our parameter layout <-> HuggingFace DeepSeek tensor names and layouts.

For each of our per-layer parameters this module knows the HF tensor(s) it comes from and the
transform between the layouts (HF linears are [out, in]; ours are einsum-ready [in, ..., out]).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from mla_moe.config import ModelConfig

Getter = Callable[[str], np.ndarray]  # HF name -> array (float32, dequantised)


def _heads_in(w: np.ndarray, n: int) -> np.ndarray:
    """[N*A, In] -> [In, N, A]."""
    return w.reshape(n, -1, w.shape[-1]).transpose(2, 0, 1)


def _heads_in_inv(w: np.ndarray) -> np.ndarray:
    """[In, N, A] -> [N*A, In]."""
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])


def layer_readers(config: ModelConfig, moe: bool) -> dict[tuple, Callable]:
    """{relative path: reader(get, prefix, experts_slice) -> our array for one layer}."""
    c = config
    n, h = c.num_attention_heads, c.qk_nope_head_dim

    def lin(name):  # [out, in] -> [in, out]
        return lambda get, p, es: np.asarray(get(p + name)).T

    def same(name):
        return lambda get, p, es: np.asarray(get(p + name))

    def kv_b(part):
        def read(get, p, es):
            w = np.asarray(get(p + "self_attn.kv_b_proj.weight"))
            w = w.reshape(n, -1, w.shape[-1])  # [N, H + V, C]
            w = w[:, :h] if part == "k" else w[:, h:]
            return w.transpose(2, 0, 1)  # [C, N, H|V]
        return read

    r = {
        ("attn_norm", "weight"): same("input_layernorm.weight"),
        ("ffn_norm", "weight"): same("post_attention_layernorm.weight"),
        ("attn", "wkv_a_DL"): lin("self_attn.kv_a_proj_with_mqa.weight"),
        ("attn", "kv_norm", "weight"): same("self_attn.kv_a_layernorm.weight"),
        ("attn", "wk_b_CNH"): kv_b("k"),
        ("attn", "wv_b_CNV"): kv_b("v"),
        ("attn", "wo_NVD"): lambda get, p, es: np.asarray(get(p + "self_attn.o_proj.weight"))
        .reshape(c.hidden_size, n, c.v_head_dim).transpose(1, 2, 0),
    }
    if c.q_lora_rank is None:
        r[("attn", "wq_DNA")] = lambda get, p, es: _heads_in(
            np.asarray(get(p + "self_attn.q_proj.weight")), n)
    else:
        r[("attn", "wq_a_DQ")] = lin("self_attn.q_a_proj.weight")
        r[("attn", "q_norm", "weight")] = same("self_attn.q_a_layernorm.weight")
        r[("attn", "wq_b_QNA")] = lambda get, p, es: _heads_in(
            np.asarray(get(p + "self_attn.q_b_proj.weight")), n)
    if c.has_indexer:  # V3.2's lightning indexer
        ix = "self_attn.indexer."
        r[("attn", "indexer", "wq_b_QHI")] = lambda get, p, es: _heads_in(
            np.asarray(get(p + ix + "wq_b.weight")), c.index_n_heads)
        r[("attn", "indexer", "wk_DI")] = lin(ix + "wk.weight")
        r[("attn", "indexer", "k_norm_weight")] = same(ix + "k_norm.weight")
        r[("attn", "indexer", "k_norm_bias")] = same(ix + "k_norm.bias")
        r[("attn", "indexer", "weights_proj_DH")] = lin(ix + "weights_proj.weight")
    if not moe:
        r[("ffn", "gate_DF")] = lin("mlp.gate_proj.weight")
        r[("ffn", "up_DF")] = lin("mlp.up_proj.weight")
        r[("ffn", "down_FD")] = lin("mlp.down_proj.weight")
        return r
    r[("ffn", "router", "w_DE")] = lin("mlp.gate.weight")
    if c.topk_method == "noaux_tc":
        r[("ffn", "router", "e_score_correction_bias")] = same("mlp.gate.e_score_correction_bias")
    if c.n_shared_experts:
        for ours, theirs in (("gate_DF", "gate_proj"), ("up_DF", "up_proj"),
                             ("down_FD", "down_proj")):
            r[("ffn", "shared", ours)] = lin(f"mlp.shared_experts.{theirs}.weight")
    f = c.moe_intermediate_size

    def experts(ours):
        def read(get, p, es):
            ids = range(c.n_routed_experts)[es]
            fused = p + ("mlp.experts.down_proj" if ours == "down" else "mlp.experts.gate_up_proj")
            try:
                w = get(fused)  # fused layout (transformers v5): [E, 2F, D] / [E, D, F]
            except KeyError:
                w = None
            if w is not None:
                w = np.asarray(w[es])
                if ours == "gate":
                    return w[:, :f].transpose(0, 2, 1)
                if ours == "up":
                    return w[:, f:].transpose(0, 2, 1)
                return w.transpose(0, 2, 1)
            name = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[ours]
            return np.stack([np.asarray(get(f"{p}mlp.experts.{j}.{name}.weight")).T for j in ids])
        return read

    r[("ffn", "gate_EDF")] = experts("gate")
    r[("ffn", "up_EDF")] = experts("up")
    r[("ffn", "down_EFD")] = experts("down")
    return r


def layer_writers(config: ModelConfig, moe: bool) -> list[tuple[str, Callable]]:
    """[(HF suffix, writer(arrays) -> HF tensor)] for one layer, `arrays` keyed by our relative
    path (numpy arrays of that layer)."""
    c = config
    out: list[tuple[str, Callable]] = [
        ("input_layernorm.weight", lambda a: a[("attn_norm", "weight")]),
        ("post_attention_layernorm.weight", lambda a: a[("ffn_norm", "weight")]),
        ("self_attn.kv_a_proj_with_mqa.weight", lambda a: a[("attn", "wkv_a_DL")].T),
        ("self_attn.kv_a_layernorm.weight", lambda a: a[("attn", "kv_norm", "weight")]),
        ("self_attn.kv_b_proj.weight", lambda a: jnp.concatenate(
            [a[("attn", "wk_b_CNH")], a[("attn", "wv_b_CNV")]], axis=-1
        ).transpose(1, 2, 0).reshape(-1, c.kv_lora_rank)),
        ("self_attn.o_proj.weight", lambda a: a[("attn", "wo_NVD")].transpose(2, 0, 1).reshape(
            c.hidden_size, -1)),
    ]
    if c.q_lora_rank is None:
        out.append(("self_attn.q_proj.weight", lambda a: _heads_in_inv(a[("attn", "wq_DNA")])))
    else:
        out += [
            ("self_attn.q_a_proj.weight", lambda a: a[("attn", "wq_a_DQ")].T),
            ("self_attn.q_a_layernorm.weight", lambda a: a[("attn", "q_norm", "weight")]),
            ("self_attn.q_b_proj.weight", lambda a: _heads_in_inv(a[("attn", "wq_b_QNA")])),
        ]
    if c.has_indexer:
        ix = ("attn", "indexer")
        out += [
            ("self_attn.indexer.wq_b.weight", lambda a: _heads_in_inv(a[ix + ("wq_b_QHI",)])),
            ("self_attn.indexer.wk.weight", lambda a: a[ix + ("wk_DI",)].T),
            ("self_attn.indexer.k_norm.weight", lambda a: a[ix + ("k_norm_weight",)]),
            ("self_attn.indexer.k_norm.bias", lambda a: a[ix + ("k_norm_bias",)]),
            ("self_attn.indexer.weights_proj.weight", lambda a: a[ix + ("weights_proj_DH",)].T),
        ]
    if not moe:
        out += [
            ("mlp.gate_proj.weight", lambda a: a[("ffn", "gate_DF")].T),
            ("mlp.up_proj.weight", lambda a: a[("ffn", "up_DF")].T),
            ("mlp.down_proj.weight", lambda a: a[("ffn", "down_FD")].T),
        ]
        return out
    out.append(("mlp.gate.weight", lambda a: a[("ffn", "router", "w_DE")].T))
    if c.topk_method == "noaux_tc":
        out.append(("mlp.gate.e_score_correction_bias",
                    lambda a: a[("ffn", "router", "e_score_correction_bias")]))
    if c.n_shared_experts:
        for ours, theirs in (("gate_DF", "gate_proj"), ("up_DF", "up_proj"),
                             ("down_FD", "down_proj")):
            out.append((f"mlp.shared_experts.{theirs}.weight",
                        lambda a, o=ours: a[("ffn", "shared", o)].T))
    for j in range(c.n_routed_experts):
        for ours, theirs in (("gate_EDF", "gate_proj"), ("up_EDF", "up_proj"),
                             ("down_EFD", "down_proj")):
            out.append((f"mlp.experts.{j}.{theirs}.weight",
                        lambda a, o=ours, j=j: a[("ffn", o)][j].T))
    return out


MTP_READERS = {
    ("enorm", "weight"): "enorm.weight",
    ("hnorm", "weight"): "hnorm.weight",
    ("norm", "weight"): "shared_head.norm.weight",
}
