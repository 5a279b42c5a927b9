"""Pallas kernels for DeepSeek-style MLA attention.

mla_attention: training / prefill flash attention with a shared rope key (forward + backward).
latent_attention: absorbed-MLA decode over the latent cache (split-KV, forward only);
  latent_attention_cache takes the model's packed [B, S, C + R] cache, read in place on TPU.
sparse_latent_attention_cache: the same decode over K cache slots per query chosen by index
  (DeepSeek-V3.2's sparse attention), the rows gathered inside the kernel.
Each has a chunked pure-XLA `*_reference` (implementation="xla") and a dense `*_naive` oracle.
See `pallas_kernels.dispatch` for how `implementation` is resolved.
"""

from pallas_kernels.dispatch import IMPLEMENTATIONS, resolve
from pallas_kernels.latent_attention import BlockSizes as LatentBlockSizes
from pallas_kernels.latent_attention import latent_attention, latent_attention_cache
from pallas_kernels.latent_attention_reference import (
    latent_attention_naive,
    latent_attention_reference,
)
from pallas_kernels.mla_attention import BlockSizes as MLABlockSizes
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.mla_attention_reference import mla_attention_naive, mla_attention_reference
from pallas_kernels.sparse_latent_attention import BlockSizes as SparseLatentBlockSizes
from pallas_kernels.sparse_latent_attention import sparse_latent_attention_cache
from pallas_kernels.sparse_latent_attention_reference import (
    sparse_latent_attention_naive,
    sparse_latent_attention_reference,
)

__all__ = [
    "IMPLEMENTATIONS",
    "LatentBlockSizes",
    "MLABlockSizes",
    "SparseLatentBlockSizes",
    "latent_attention",
    "latent_attention_cache",
    "latent_attention_naive",
    "latent_attention_reference",
    "mla_attention",
    "mla_attention_naive",
    "mla_attention_reference",
    "resolve",
    "sparse_latent_attention_cache",
    "sparse_latent_attention_naive",
    "sparse_latent_attention_reference",
]
