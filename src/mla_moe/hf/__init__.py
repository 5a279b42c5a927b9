"""HuggingFace interop: `load_pretrained` and `save_pretrained` (safetensors only)."""

from mla_moe.hf.load import load_pretrained
from mla_moe.hf.save import save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
