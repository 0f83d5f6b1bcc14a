"""The `data:` section of the run config: which corpus, how it is packed and cached.

It lives with the data layer (not in train/) so that evaluation and the data pipeline can
use it without importing train.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    sources: list = field(default_factory=list)  # files/dirs (txt, jsonl, parquet); "stdlib" = Python's own sources
    text_field: str = "text"
    cache_dir: str = ".seqpar_cache"
    cross_document_attention: bool = False  # True: packed documents attend across boundaries
    upsample_long: float = 0.0  # >0 favours long documents (long-context data recipes)
    max_documents: int | None = None
    seed: int = 0
