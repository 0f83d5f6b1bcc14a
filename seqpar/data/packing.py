"""Tokenize documents and pack them into sequences of exactly `seq_len` tokens.

Each document becomes `[bos] + tokens + [eos]` (bos/eos only where the tokenizer has them).
Documents are (optionally up-sampled, then) shuffled by seed (`datasets` shuffle) and laid end to end; the
stream is cut every `seq_len` tokens. Per sequence we store `input_ids` and
`position_ids`:
- `position_ids` restart at 0 at every document start, so attention (seqpar derives
  document ids from the zeros, see seqpar.model.shard_batch) and RoPE treat documents
  separately. A document cut by a sequence boundary continues at the start of the next
  sequence with positions restarting at 0 there too: the two pieces are trained as
  separate documents (the piece in the next sequence cannot attend to its beginning
  anyway, and every sequence starts at position 0).
- With `cross_document_attention=True` they are a plain 0..seq_len-1: documents attend
  across boundaries (eos still separates them).
The last partial sequence (< seq_len tokens) is dropped and counted in `stats`.

The packed result is saved under `<cache_dir>/packed/<key>`, key = hash of (source
paths/sizes/mtimes, tokenizer identity, seq_len, options, seed), and loaded from there
on the next build: a restart (or the other ranks, after rank 0) never re-tokenizes.
Tokenization itself goes through `datasets.map`, whose own cache keeps the token ids
when only seq_len or packing options change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from ..errors import SeqparError
from .sources import fingerprint, load_sources, resolve_sources
from .tokenizer import tokenizer_identity

CACHE_VERSION = 1
STATS_FILE = "seqpar_stats.json"


class PackedDataset:
    """Map-style dataset of packed sequences: item i -> {"input_ids", "position_ids"} LongTensor[seq_len]."""

    def __init__(self, hf_dataset, seq_len: int, stats: dict):
        self.hf = hf_dataset.with_format("numpy")  # memory-mapped Arrow on disk
        self.seq_len = seq_len
        self.stats = stats

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} packed sequences")
        row = self.hf[int(i)]
        return {k: torch.from_numpy(np.asarray(row[k], dtype=np.int64)) for k in ("input_ids", "position_ids")}

    def get_batch(self, indices) -> dict:
        """Several sequences at once, stacked: {"input_ids", "position_ids"} LongTensor[n, seq_len]."""
        rows = self.hf[[int(i) for i in indices]]
        return {k: torch.from_numpy(np.asarray(rows[k], dtype=np.int64).reshape(len(indices), self.seq_len))
                for k in ("input_ids", "position_ids")}


def _tokenize(batch, tokenizer, bos, eos):
    """datasets.map function: text -> [bos] + ids + [eos]."""
    ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    return {"input_ids": [[*head, *x, *tail] for x in ids]}


def upsample_copies(lengths: np.ndarray, *, seq_len: int, upsample_long: float, seed: int) -> np.ndarray:
    """How many times each document is packed (1 without up-sampling).

    A document of n tokens gets r = upsample_long * min(1, n / seq_len) extra copies in
    expectation (floor(r) surely, one more with probability frac(r)): the longer the
    document (up to a full sequence), the more often it is seen. Deterministic by seed.
    """
    copies = np.ones(len(lengths), dtype=np.int64)
    if upsample_long > 0:
        r = upsample_long * np.minimum(1.0, np.asarray(lengths) / seq_len)
        rng = np.random.default_rng([seed, 0x5EED])
        copies += np.floor(r).astype(np.int64) + (rng.random(len(lengths)) < r - np.floor(r))
    return copies


class Packer:
    """Cuts a stream of documents into [n, seq_len] blocks of input_ids and position_ids."""

    def __init__(self, seq_len: int, cross_document_attention: bool):
        self.seq_len, self.cross = seq_len, cross_document_attention
        self.ids = np.zeros(0, dtype=np.int32)
        self.starts = np.zeros(0, dtype=bool)  # True where a document begins

    def add(self, flat: np.ndarray, lengths: np.ndarray):
        """Append documents (tokens concatenated in `flat`); return the complete sequences."""
        starts = np.zeros(len(flat), dtype=bool)
        offsets = np.cumsum(lengths) - lengths
        starts[offsets[lengths > 0]] = True
        ids, starts = np.concatenate([self.ids, flat.astype(np.int32)]), np.concatenate([self.starts, starts])
        n = len(ids) // self.seq_len
        cut = n * self.seq_len
        self.ids, self.starts = ids[cut:], starts[cut:]
        block = ids[:cut].reshape(n, self.seq_len)
        index = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), block.shape)
        if self.cross:
            return block, np.ascontiguousarray(index)
        begin = starts[:cut].reshape(n, self.seq_len).copy()
        begin[:, 0] = True  # every sequence starts a (piece of a) document at position 0
        last_start = np.maximum.accumulate(np.where(begin, index, 0), axis=1)
        return block, (index - last_start).astype(np.int32)

    @property
    def leftover(self) -> int:
        return len(self.ids)


def _cache_key(data_cfg, groups, tokenizer, seq_len) -> str:
    payload = {"version": CACHE_VERSION, "sources": fingerprint(groups), "text_field": data_cfg.text_field,
               "max_documents": data_cfg.max_documents, "tokenizer": tokenizer_identity(tokenizer),
               "seq_len": seq_len, "cross_document_attention": bool(data_cfg.cross_document_attention),
               "upsample_long": float(data_cfg.upsample_long), "seed": int(data_cfg.seed)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _pack(data_cfg, groups, tokenizer, seq_len):
    """Tokenize + pack from scratch. Returns (datasets.Dataset of sequences, stats)."""
    import datasets  # deferred: datasets (heavy)
    import pyarrow as pa  # deferred: pyarrow, with datasets
    import pyarrow.compute as pc  # deferred: pyarrow, with datasets

    docs = load_sources(data_cfg, groups)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    tokens = docs.map(_tokenize, batched=True, remove_columns=docs.column_names, features=features,
                      fn_kwargs={"tokenizer": tokenizer, "bos": getattr(tokenizer, "bos_token_id", None),
                                 "eos": getattr(tokenizer, "eos_token_id", None)},
                      desc="tokenizing")
    lengths = pc.list_value_length(tokens.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)
    copies = upsample_copies(lengths, seq_len=seq_len, upsample_long=float(data_cfg.upsample_long),
                             seed=int(data_cfg.seed))
    # Repeats, then a seeded shuffle of whole documents: mixes sources, spreads copies apart.
    order = tokens.select(np.repeat(np.arange(len(tokens)), copies)).shuffle(seed=int(data_cfg.seed))
    packer = Packer(seq_len, bool(data_cfg.cross_document_attention))
    ids_blocks, pos_blocks = [], []
    for batch in order.with_format("arrow").iter(batch_size=1024):
        column = batch["input_ids"].combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        ids, pos = packer.add(flat, pc.list_value_length(column).to_numpy(zero_copy_only=False))
        ids_blocks.append(ids)
        pos_blocks.append(pos)
    ids, pos = np.concatenate(ids_blocks), np.concatenate(pos_blocks)
    if len(ids) == 0:
        raise SeqparError(f"the corpus has {int(lengths.sum())} tokens, fewer than one sequence of seq_len="
                          f"{seq_len}; add data (data.sources / data.max_documents) or lower train.seq_len.")

    def column(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), seq_len)

    table = pa.table({"input_ids": column(ids), "position_ids": column(pos)})
    stats = {"documents": len(docs), "documents_packed": int(copies.sum()),
             "tokens": int((lengths * copies).sum()),
             "sequences": int(len(ids)), "dropped_tokens": packer.leftover, "seq_len": seq_len,
             "files": sum(len(g.files) for g in groups), "tokenizer": tokenizer_identity(tokenizer)[:80],
             "cross_document_attention": bool(data_cfg.cross_document_attention),
             "upsample_long": float(data_cfg.upsample_long)}
    return datasets.Dataset(datasets.table.InMemoryTable(table)), stats


def build_packed_dataset(data_cfg, tokenizer, seq_len: int) -> PackedDataset:
    """Tokenized, packed `PackedDataset` for `data_cfg` (a seqpar DataConfig), from the
    on-disk cache when an identical build exists. `stats`: documents, documents_packed
    (with up-sampled repeats), tokens, sequences, dropped_tokens, cache_hit, cache_path,
    build_seconds. Safe to call from several processes (the cache entry appears atomically)."""
    start = time.perf_counter()
    import datasets  # deferred: datasets (heavy)

    if int(seq_len) < 2:
        raise SeqparError(f"seq_len must be at least 2 to pack sequences; got {seq_len}.")
    seq_len = int(seq_len)
    groups = resolve_sources(data_cfg)
    path = Path(data_cfg.cache_dir, "packed", _cache_key(data_cfg, groups, tokenizer, seq_len)).resolve()
    if not (path / STATS_FILE).is_file():
        hf, stats = _pack(data_cfg, groups, tokenizer, seq_len)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        hf.save_to_disk(str(tmp))
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        try:
            os.rename(tmp, path)  # atomic: readers see a complete entry or none
        except OSError:  # another process finished the same build first; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
        cache_hit = False
    else:
        cache_hit = True
    stats = json.loads((path / STATS_FILE).read_text())
    stats.update(cache_hit=cache_hit, cache_path=str(path), build_seconds=round(time.perf_counter() - start, 3))
    return PackedDataset(datasets.load_from_disk(str(path)), seq_len, stats)
