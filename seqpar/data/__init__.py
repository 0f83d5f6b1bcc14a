"""Corpus -> tokens -> packed sequences of exactly seq_len -> this DP rank's micro-batches.

    tok = load_tokenizer("byte")                      # or a HF tokenizer directory
    ds = build_packed_dataset(cfg.data, tok, seq_len) # cached on disk under cfg.data.cache_dir
    batches = BatchIterator(ds, dp_rank=r, dp_size=n, micro_batch_size=m, seed=cfg.data.seed)
    batch = next(batches)                              # input_ids, position_ids [m, seq_len]

`seqpar.model.shard_batch(batch, mesh)` then takes each SP rank's slice.
"""

from .config import DataConfig
from .loader import BatchIterator
from .packing import PackedDataset, build_packed_dataset
from .sources import load_sources
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["DataConfig", "ByteTokenizer", "load_tokenizer", "load_sources", "build_packed_dataset", "PackedDataset",
           "BatchIterator"]
