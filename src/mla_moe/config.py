"""`ModelConfig`: the model's hyperparameters, named as in HuggingFace's DeepSeek configs.

Every field is checked at construction (`config_checks.py`, one check per topic); a bad value
raises `ValueError` naming the field, before any array is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from mla_moe.config_checks import DTYPES, check_model_config
from mla_moe.errors import InputError, MissingInputError

HF_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")  # deepseek_v32 is a deepseek_v3 prefix
# transformers' DeepseekV32Config defaults, for a V3.2 config.json that omits them.
HF_V32_INDEXER = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}


def _hf_config_path(source: str | os.PathLike) -> str:
    path = os.fspath(source)
    hint = "pass a HuggingFace checkpoint directory (config.json and *.safetensors)"
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise MissingInputError(f"{path!r} has no config.json; {hint}")
        return config
    if not os.path.exists(path):
        raise MissingInputError(f"{path!r} does not exist; {hint}")
    return path


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise InputError(
            f"{path} holds a JSON {type(data).__name__}, not an object of config fields"
        )
    return data


def _as_mapping(value) -> Mapping[str, Any] | None:
    """`value` as a Mapping when it is one or behaves like one (an ml_collections ConfigDict,
    which is not registered as a Mapping); None otherwise."""
    if isinstance(value, Mapping):
        return value
    if hasattr(value, "to_dict") and hasattr(value, "items") and not isinstance(value, type):
        return value.to_dict()
    return None


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (`rope_scaling` / `rope_parameters` in HF configs)."""

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RopeScaling:
        """From an HF `rope_scaling` / `rope_parameters` dict; only YaRN is supported, unknown
        keys and None values are ignored."""
        kind = d.get("rope_type", d.get("type", "yarn"))
        if kind not in ("yarn",):
            raise ValueError(f"rope_scaling.type: only 'yarn' is supported, got {kind!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and k != "type" and v is not None}
        return cls(type=kind, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The HF dict (both `type` and `rope_type`), without the fields that are None."""
        d = {"type": self.type, "rope_type": self.type}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "type" and v is not None:
                d[f.name] = v
        return d


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2/V3 model hyperparameters. Defaults are DeepSeek-V2-Lite's."""

    # --- HuggingFace DeepSeek config fields -------------------------------------------------
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | Mapping[str, Any] | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.02
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    aux_loss_alpha: float = 0.001  # V2 expert-level balance loss (alpha_1)
    seq_aux: bool = True  # balance statistics per sequence (True) or per batch (False)
    # V3.2 lightning indexer (DeepSeek Sparse Attention, indexer.py); index_n_heads=0: none.
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 2048

    # --- ours: numerics ---------------------------------------------------------------------
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # master weights

    # --- ours: balance --------------------------------------------------------------------
    device_balance_alpha: float = 0.0  # V2 device-level balance loss (alpha_2)
    comm_balance_alpha: float = 0.0  # V2 communication balance loss (alpha_3)
    expert_devices: int | None = None  # D for the device/comm losses; None -> n_group
    device_limit: int | None = None  # M for the comm loss; None -> topk_group
    seq_balance_alpha: float = 0.0  # V3 sequence-wise balance loss (alpha)
    router_z_loss_coef: float = 0.0
    expert_bias_update_rate: float = 0.0  # V3 aux-loss-free bias step (gamma)

    # --- ours: MoE execution --------------------------------------------------------------
    moe_impl: str = "dropless"  # "dropless" (ragged_dot) or "capacity" (drop beyond capacity)
    capacity_factor: float = 1.0
    # expert parallelism (see moe_parallel.py): token dispatch over the mesh's `expert` axis
    moe_dispatch: str = "auto"  # "all_to_all", "ragged_all_to_all", "allgather", "auto"
    dispatch_capacity_factor: float | None = None  # all_to_all buffers; None: never drop
    device_limited_routing: bool = False  # V2: experts on <= device_limit EP shards
    # Expert weights gathered over the FSDP axes this many local experts at a time (0: all
    # at once): bounds the gathered weights and their gradients to one chunk (moe_parallel).
    expert_gather_chunk: int = 0

    # --- ours: V3.2 sparse attention ---------------------------------------------------------
    # "sparse": the main attention sees only the indexer's top-k keys (the model as released);
    # "dense": every causal key (the dense warm-up stage, where only the indexer trains).
    index_attention: str = "sparse"
    # Without a cache, sequences longer than index_dense_max_len run DSA blocked
    # (dsa_blocked.py: top-k, attention and KL a query block at a time, no [B, T, S] array);
    # shorter ones the dense forms (indexer.py, dsa_loss.py; the reference). Queries per
    # block, and keys per block of the top-k scan and the dense-stage KL:
    index_dense_max_len: int = 1024
    index_block_q: int = 64
    index_block_k: int = 2048

    # --- ours: MTP ------------------------------------------------------------------------
    mtp_loss_weight: float = 0.3  # lambda

    # --- ours: execution ------------------------------------------------------------------
    # "xla": attention in this package; "pallas": pallas_kernels on the default backend (its
    # chunked XLA reference off TPU/GPU); "auto": pallas on TPU/GPU, else "xla" (and "xla"
    # under mesh.context > 1, where the kernel would hold the whole sequence's keys and values);
    # "interpret" / "tpu_interpret": the GPU- / TPU-layout kernels in interpret mode (CPU tests).
    attention_impl: str = "xla"
    decode_attention: str = "absorbed"  # attention form used when a cache is given
    remat_policy: str = "none"
    scan_layers: bool = False

    # ----------------------------------------------------------------------------------------
    def __post_init__(self):
        rope = _as_mapping(self.rope_scaling)
        if rope is not None:
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(rope))
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"rope_scaling must be a mapping (e.g. {{'type': 'yarn', "
                f"'factor': 40}}) or None, got {self.rope_scaling!r}"
            )
        if self.q_lora_rank == 0:  # the reference code spells "no q LoRA" as 0
            object.__setattr__(self, "q_lora_rank", None)
        if self.n_routed_experts == 0:
            object.__setattr__(self, "n_routed_experts", None)
        check_model_config(self)

    # --- derived -----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Query/key head dim with rope: qk_nope_head_dim + qk_rope_head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        """Whether every layer has a V3.2 lightning indexer (index_n_heads > 0)."""
        return self.index_n_heads > 0

    @property
    def num_expert_devices(self) -> int:
        """D of the device/comm balance losses: `expert_devices`, else `n_group`."""
        return self.expert_devices or self.n_group

    @property
    def num_device_limit(self) -> int:
        """M of the comm balance loss: `device_limit`, else `topk_group`."""
        return self.device_limit or self.topk_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE iff past the dense prefix and on the MoE stride (the remote code's rule)."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- HuggingFace interop -----------------------------------------------------------------
    @classmethod
    def from_hf(
        cls, source: Mapping[str, Any] | str | os.PathLike, **overrides: Any
    ) -> ModelConfig:
        """Builds a config from an HF `config.json` dict, a path to one, or its directory.

        A missing or unreadable file, another architecture (its `model_type`), or a bad value
        raises `mla_moe.errors.InputError` naming the file and the field."""
        where = "config"
        if not isinstance(source, Mapping):
            where = path = _hf_config_path(source)
            source = _read_json(path)
        hf = dict(source)
        model_type = hf.get("model_type", "deepseek_v3")
        if not str(model_type).startswith(HF_MODEL_TYPES):
            raise InputError(
                f"{where}: model_type={model_type!r} is not a DeepSeek model; supported: "
                f"{', '.join(HF_MODEL_TYPES)} (DeepSeek-V2, V2-Lite, V2.5, V3, R1)"
            )
        try:
            return cls._from_hf_dict(hf, model_type, overrides)
        except (ValueError, TypeError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{where}: {e}") from None

    @classmethod
    def _from_hf_dict(cls, hf: dict, model_type: str, overrides: dict) -> ModelConfig:
        if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
            raise ValueError(
                "num_key_value_heads must equal num_attention_heads for MLA, got "
                f"{hf['num_key_value_heads']} vs {hf.get('num_attention_heads')}"
            )
        # transformers v5 folds rope_theta and the scaling into `rope_parameters`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling")
        if rope is not None:
            rope = dict(rope)
            if "rope_theta" in rope:
                hf.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", rope.get("type", "default")) == "default":
                rope = None
        hf["rope_scaling"] = rope
        if model_type.startswith("deepseek_v3"):
            # HF's DeepseekV3 has no topk_method/scoring_func: it is always sigmoid + noaux_tc.
            hf.setdefault("topk_method", "noaux_tc")
            hf.setdefault("scoring_func", "sigmoid")
            hf.setdefault("norm_topk_prob", True)
            hf.setdefault("moe_layer_freq", 1)
        if model_type == "deepseek_v32":
            for k, v in HF_V32_INDEXER.items():
                hf.setdefault(k, v)
        else:
            hf.setdefault("rope_interleave", True)  # V2 rotates interleaved pairs
        if hf.get("n_group") is None:
            hf["n_group"] = 1
        if hf.get("topk_group") is None:
            hf["topk_group"] = 1
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            hf["eos_token_id"] = eos[0] if eos else None
        dtype = hf.get("dtype") or hf.get("torch_dtype")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in known and k not in ("dtype", "param_dtype")}
        if dtype in DTYPES:
            kwargs["dtype"] = kwargs["param_dtype"] = dtype
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def hf_model_type(self) -> str:
        """HF's `model_type`: deepseek_v32 with an indexer, deepseek_v3 for sigmoid noaux_tc
        routing (or no MoE), else deepseek_v2."""
        if self.has_indexer:
            return "deepseek_v32"
        v3 = self.topk_method == "noaux_tc" and self.scoring_func == "sigmoid"
        return "deepseek_v3" if v3 or self.n_routed_experts is None else "deepseek_v2"

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers v5 names, plus the legacy ones)."""
        # Our own fields ride along (HF keeps unknown keys), so a save/load keeps them.
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("dtype", "param_dtype", "rope_scaling")
        }
        model_type = self.hf_model_type
        d["n_routed_experts"] = self.n_routed_experts or 0
        d.update(
            model_type=model_type,
            architectures=[
                {
                    "deepseek_v32": "DeepseekV32ForCausalLM",
                    "deepseek_v3": "DeepseekV3ForCausalLM",
                }.get(model_type, "DeepseekV2ForCausalLM")
            ],
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            dtype=self.param_dtype,
            use_cache=True,
        )
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_dict()
            rope = {**self.rope_scaling.to_dict(), "rope_theta": self.rope_theta}
            del rope["type"]
        else:
            d["rope_scaling"] = None
        d["rope_parameters"] = rope
        return d
