"""The `data:` section of a run config: where the corpus is and how it is packed (used by
training, the evaluations and the studies alike)."""

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
