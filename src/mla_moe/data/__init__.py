"""Data: corpus readers, tokenizers, token stores, raw sources tokenized on the fly, the default
corpus and the Grain pipeline."""

from mla_moe.data.corpus import default_corpus
from mla_moe.data.pipeline import PipelineConfig, eval_batches, global_batch, train_iterator
from mla_moe.data.prepare_store import prepare
from mla_moe.data.raw_source import RawSource
from mla_moe.data.readers import detect_format, expand_inputs, read_documents
from mla_moe.data.token_store import StoreWriter, TokenSplit, read_metadata, write_store
from mla_moe.data.tokenizer import ByteTokenizer, check_fits, load_tokenizer

__all__ = [
    "ByteTokenizer", "PipelineConfig", "RawSource", "StoreWriter", "TokenSplit", "check_fits",
    "default_corpus", "detect_format", "eval_batches", "expand_inputs", "global_batch",
    "load_tokenizer", "prepare", "read_documents", "read_metadata", "train_iterator",
    "write_store",
]
