"""Corpus sources -> a `datasets.Dataset` of documents (`text`, `source` columns).

`DataConfig.sources` entries, in order:
- a file or directory (searched recursively, sorted): .txt/.md/.py/.rst = one document
  per file; .jsonl/.json = one document per record, its `text_field`; .parquet = one
  document per row, its `text_field`. Hidden files/dirs and __pycache__ are skipped.
- a glob pattern (`data/*.jsonl`).
- "stdlib": the *.py sources of the running interpreter's standard library (real, long,
  offline text on any machine with Python; site-packages excluded).
- "hf:NAME[:SPLIT]" or "hf:NAME:CONFIG:SPLIT": a Hugging Face hub dataset (only with a
  hub; its cache key is the name, so a changed hub revision needs a new cache_dir).
Loading goes through `datasets.load_dataset`'s text/json/parquet builders, so the raw
corpus is cached as Arrow under `cache_dir`. Empty and blank documents are dropped; at
most `max_documents` documents are kept, the first ones in this order.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import SeqparError

TEXT_EXTS = {".txt", ".md", ".py", ".rst"}
JSON_EXTS = {".jsonl", ".json"}
PARQUET_EXTS = {".parquet"}
KINDS = {**{e: "text" for e in TEXT_EXTS}, **{e: "json" for e in JSON_EXTS}, **{e: "parquet" for e in PARQUET_EXTS}}
SUPPORTED = "a file or directory of .txt/.md/.py/.rst (one document per file), .jsonl/.json or " \
            ".parquet (one document per record), 'stdlib' (Python's own sources) or 'hf:NAME'"


@dataclass
class SourceGroup:
    """Files of one kind from one `sources` entry (loaded by one load_dataset call)."""

    entry: str
    kind: str  # text | json | parquet | hub
    files: list


def stdlib_files() -> list[str]:
    """The interpreter's standard-library *.py files, sorted (deterministic per interpreter)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out, key=lambda f: os.path.relpath(f, root))


def _files_under(directory: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        out += [os.path.join(dirpath, f) for f in filenames
                if not f.startswith(".") and Path(f).suffix.lower() in KINDS]
    return sorted(out)


def _group(entry: str, files: list[str]) -> list[SourceGroup]:
    """Split an entry's files into runs of one kind, keeping their order."""
    groups: list[SourceGroup] = []
    for f in files:
        kind = KINDS[Path(f).suffix.lower()]
        if kind == "text" and os.path.getsize(f) == 0:
            continue  # e.g. empty __init__.py: no document
        if groups and groups[-1].kind == kind:
            groups[-1].files.append(f)
        else:
            groups.append(SourceGroup(entry, kind, [f]))
    return groups


def resolve_sources(data_cfg) -> list[SourceGroup]:
    """Expand `data_cfg.sources` into file groups, in order; raise SeqparError naming the fix."""
    sources = data_cfg.sources
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise SeqparError(f"data.sources is empty; give at least one source: {SUPPORTED}.")
    groups: list[SourceGroup] = []
    for entry in map(str, sources):
        if entry == "stdlib":
            groups += _group(entry, stdlib_files())
        elif entry.startswith("hf:"):
            groups.append(SourceGroup(entry, "hub", [entry[3:]]))
        elif any(c in entry for c in "*?["):
            matched = sorted(f for f in glob.glob(entry, recursive=True) if Path(f).suffix.lower() in KINDS)
            if not matched:
                raise SeqparError(f"data source pattern '{entry}' matches no supported files; {SUPPORTED}.")
            groups += _group(entry, matched)
        else:
            path = Path(entry).expanduser()
            if not path.exists():
                raise SeqparError(f"data source '{entry}' does not exist (looked in {path.resolve()}); fix "
                                  f"the path in data.sources, or use {SUPPORTED}.")
            if path.is_dir():
                files = _files_under(path)
                if not files:
                    raise SeqparError(f"data source directory '{entry}' holds no supported files; {SUPPORTED}.")
            elif path.suffix.lower() not in KINDS:
                raise SeqparError(f"data source '{entry}' has an unsupported extension '{path.suffix}'; "
                                  f"rename or convert it: {SUPPORTED}.")
            else:
                files = [str(path)]
            groups += _group(entry, files)
    return _cap_text_groups(groups, data_cfg.max_documents)


def _cap_text_groups(groups, max_documents):
    """Leading text files are one document each: read only the first max_documents of them."""
    if max_documents is None:
        return groups
    remaining, out = int(max_documents), []
    for g in groups:
        if remaining <= 0:
            break
        if g.kind != "text":  # records per file unknown before reading: keep the rest as is
            return out + groups[len(out):]
        out.append(SourceGroup(g.entry, g.kind, g.files[:remaining]))
        remaining -= len(out[-1].files)
    return out


def fingerprint(groups: list[SourceGroup]) -> list:
    """What identifies the corpus without reading it: paths, sizes and modification times."""
    fp = [sys.version]  # 'stdlib' differs between interpreters
    for g in groups:
        if g.kind == "hub":
            fp.append([g.entry])
            continue
        fp.append([g.entry, g.kind] + [(f, (s := os.stat(f)).st_size, s.st_mtime_ns) for f in g.files])
    return fp


def _load_group(g: SourceGroup, text_field: str, cache_dir: str):
    import datasets  # deferred: datasets (heavy)

    if g.kind == "hub":
        name, *rest = g.files[0].split(":")
        config, split = rest if len(rest) == 2 else (None, rest[0] if rest else None)
        try:
            ds = datasets.load_dataset(name, config, split=split or "train", cache_dir=cache_dir)
        except Exception as exc:  # offline, unknown name, gated...
            raise SeqparError(f"cannot load hub dataset '{name}' ({exc}); without a hub, point data.sources "
                              "at local files or use 'stdlib'.") from exc
    elif g.kind == "text":
        # sample_by="document": exactly one row per file, in file order.
        ds = datasets.load_dataset("text", data_files=g.files, split="train", sample_by="document",
                                   encoding_errors="replace", cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset(g.kind, data_files=g.files, split="train", cache_dir=cache_dir)
    if g.kind != "text" and text_field not in ds.column_names:
        raise SeqparError(f"data source '{g.entry}' has no field '{text_field}' (it has {ds.column_names}); "
                          "set data.text_field to the column holding the text.")
    field = "text" if g.kind == "text" else text_field
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if getattr(ds.features["text"], "dtype", None) == "large_string":  # concatenate needs one type
        ds = ds.cast_column("text", datasets.Value("string"))
    if getattr(ds.features["text"], "dtype", None) != "string":
        raise SeqparError(f"field '{field}' of data source '{g.entry}' does not hold strings "
                          f"({ds.features['text']}); set data.text_field to the text column.")
    return ds.add_column("source", [g.entry] * len(ds))


def _has_text(batch):
    return [isinstance(t, str) and not t.isspace() and t != "" for t in batch["text"]]


def load_sources(data_cfg, groups: list[SourceGroup] | None = None):
    """The corpus as a `datasets.Dataset` with `text` and `source` columns, deterministic order."""
    import datasets  # deferred: datasets (heavy)

    groups = resolve_sources(data_cfg) if groups is None else groups
    cache_dir = str(Path(data_cfg.cache_dir, "datasets").resolve())
    parts = [_load_group(g, data_cfg.text_field, cache_dir) for g in groups]
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
    if ds is not None:
        ds = ds.filter(_has_text, batched=True, desc="dropping blank documents")
        if data_cfg.max_documents is not None:
            ds = ds.select(range(min(len(ds), int(data_cfg.max_documents))))
    if ds is None or len(ds) == 0:
        raise SeqparError(f"the corpus {list(map(str, data_cfg.sources))} has no non-blank documents; check "
                          "data.sources, data.text_field and data.max_documents.")
    return ds
