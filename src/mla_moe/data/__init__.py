"""Data: tokenizers, token stores, the default corpus and the Grain input pipeline."""

from mla_moe.data.corpus import default_corpus, iter_documents, prepare
from mla_moe.data.pipeline import PipelineConfig, eval_batches, global_batch, train_iterator
from mla_moe.data.token_store import TokenSplit, read_metadata, write_store
from mla_moe.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "PipelineConfig", "TokenSplit", "default_corpus", "eval_batches",
    "global_batch", "iter_documents", "load_tokenizer", "train_iterator",
    "prepare", "read_metadata", "write_store",
]
