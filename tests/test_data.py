"""seqpar.data: sources, byte tokenizer, packing (every token once, positions), cache, DP batches, resume."""

from __future__ import annotations

import json
import os
import random
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

from seqpar.data import BatchIterator, ByteTokenizer, PackedDataset, build_packed_dataset, load_sources, load_tokenizer
from seqpar.data import packing
from seqpar.data.packing import upsample_copies
from seqpar.errors import SeqparError
from seqpar.train.config import DataConfig

BOS, EOS = ByteTokenizer.bos_token_id, ByteTokenizer.eos_token_id


def make_corpus(root: Path, n_docs: int = 23, seq_len: int = 64, seed: int = 0) -> list[str]:
    """Text files of varied length (some longer than several sequences), non-ASCII included;
    a last file pads the total token count to a multiple of seq_len (nothing dropped)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_docs):
        n = rng.choice([1, 5, 30, 63, 64, 65, 150, 400])
        texts.append("".join(rng.choice("abcdefgh é\n") for _ in range(n)) + f"#{i}")
    total = sum(len(t.encode()) + 2 for t in texts)
    texts.append("p" * (seq_len - (total + 2) % seq_len + seq_len))  # + 2: its own bos/eos
    for i, t in enumerate(texts):
        (root / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    return texts


def cfg(tmp_path, sources, **kw) -> DataConfig:
    return DataConfig(sources=[str(s) for s in sources], cache_dir=str(tmp_path / "cache"), **kw)


def sequences(ds: PackedDataset):
    for i in range(len(ds)):
        item = ds[i]
        yield item["input_ids"].tolist(), item["position_ids"].tolist()


def reconstruct(ds: PackedDataset) -> list[tuple]:
    """Documents from the packed stream: a piece starts where position_ids == 0; a piece
    not ending in eos continues in the next piece (next sequence)."""
    docs, current = [], []
    for ids, pos in sequences(ds):
        assert pos[0] == 0
        for tok, p in zip(ids, pos):
            if p == 0 and current and current[-1] == EOS:
                docs.append(tuple(current))
                current = []
            current.append(tok)
    if current:
        docs.append(tuple(current))
    return docs


def expected(texts) -> list[tuple]:
    return [(BOS, *t.encode("utf-8"), EOS) for t in texts]


# --- tokenizer ----------------------------------------------------------------------------------

def test_byte_tokenizer_roundtrip_batched_and_saved(tmp_path):
    tok = load_tokenizer("byte")
    text = "héllo\n\twörld ✓"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(tok) == 260 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok(["ab", "c"])["input_ids"] == [[97, 98], [99]]
    assert tok.decode([104, 105, 257], skip_special_tokens=True) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 is replaced, not raised
    tok.save_pretrained(tmp_path / "export")
    assert isinstance(load_tokenizer(tmp_path / "export"), ByteTokenizer)
    # The export also loads with plain transformers and gives the same ids.
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (256, 257, 258)


def test_hugging_face_tokenizer_packs_like_the_byte_tokenizer(tmp_path):
    """The transformers path (AutoTokenizer from a local directory) through the same packing."""
    ByteTokenizer().save_pretrained(tmp_path / "hf_tok")
    (tmp_path / "hf_tok" / "seqpar_tokenizer.json").unlink()  # now only the HF files remain
    hf = load_tokenizer(str(tmp_path / "hf_tok"))
    assert not isinstance(hf, ByteTokenizer)
    make_corpus(tmp_path / "corpus", seq_len=64)
    config = cfg(tmp_path, [tmp_path / "corpus"])
    a, b = build_packed_dataset(config, ByteTokenizer(), 64), build_packed_dataset(config, hf, 64)
    assert a.stats["cache_path"] != b.stats["cache_path"]  # tokenizer identity is part of the key
    assert len(a) == len(b) and all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))
    assert build_packed_dataset(config, load_tokenizer(str(tmp_path / "hf_tok")), 64).stats["cache_hit"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(SeqparError, match="model.tokenizer"):
        load_tokenizer(None)
    with pytest.raises(SeqparError, match="'byte'"):
        load_tokenizer(str(tmp_path / "no_such_tokenizer"))


# --- packing ------------------------------------------------------------------------------------

def test_packing_every_token_exactly_once_with_correct_positions(tmp_path):
    texts = make_corpus(tmp_path / "corpus", seq_len=64)
    ds = build_packed_dataset(cfg(tmp_path, [tmp_path / "corpus"]), ByteTokenizer(), 64)
    total = sum(len(e) for e in expected(texts))
    assert ds.stats["dropped_tokens"] == 0 and ds.stats["tokens"] == total == len(ds) * 64
    assert ds.stats["documents"] == len(texts) and ds.stats["sequences"] == len(ds)
    for ids, pos in sequences(ds):
        assert len(ids) == len(pos) == 64
        for t in range(1, 64):  # positions count up inside a document, restart only at a bos
            assert pos[t] == pos[t - 1] + 1 or (pos[t] == 0 and ids[t] == BOS and ids[t - 1] == EOS)
    assert Counter(reconstruct(ds)) == Counter(expected(texts))
    # Documents were shuffled before packing (seeded): not simply the file order.
    assert reconstruct(ds) != expected(texts)


def test_split_document_restarts_positions_in_next_sequence(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "long.txt").write_text("x" * 100)
    ds = build_packed_dataset(cfg(tmp_path, [tmp_path / "c"]), ByteTokenizer(), 40)
    # 102 tokens -> 2 sequences of 40, each starting a piece at position 0; 22 tokens dropped.
    assert len(ds) == 2 and ds.stats["dropped_tokens"] == 22
    assert ds[0]["position_ids"].tolist() == list(range(40)) == ds[1]["position_ids"].tolist()
    assert ds[0]["input_ids"][0] == BOS and ds[1]["input_ids"].tolist() == [ord("x")] * 40
    assert ds[0]["input_ids"].dtype == torch.long


def test_cross_document_attention_positions_are_plain_arange(tmp_path):
    make_corpus(tmp_path / "corpus", seq_len=64)
    sep = build_packed_dataset(cfg(tmp_path, [tmp_path / "corpus"]), ByteTokenizer(), 64)
    cross = build_packed_dataset(cfg(tmp_path, [tmp_path / "corpus"], cross_document_attention=True),
                                 ByteTokenizer(), 64)
    assert len(cross) == len(sep)
    for i in range(len(cross)):
        assert cross[i]["position_ids"].tolist() == list(range(64))
        assert torch.equal(cross[i]["input_ids"], sep[i]["input_ids"])  # same stream, same order


def test_dropped_tail_is_counted(tmp_path):
    (tmp_path / "c").mkdir()
    for i, n in enumerate([50, 70, 33]):
        (tmp_path / "c" / f"{i}.md").write_text("y" * n)
    ds = build_packed_dataset(cfg(tmp_path, [tmp_path / "c"]), ByteTokenizer(), 32)
    total = 50 + 70 + 33 + 3 * 2
    assert ds.stats["tokens"] == total and len(ds) == total // 32 and ds.stats["dropped_tokens"] == total % 32


def test_upsample_long_repeats_long_documents(tmp_path):
    lengths = [10, 50, 100, 200, 400, 1000] * 200
    import numpy as np
    copies = upsample_copies(np.array(lengths), seq_len=400, upsample_long=1.0, seed=3)
    mean = {n: copies[np.array(lengths) == n].mean() for n in set(lengths)}
    assert mean[400] == mean[1000] == 2.0  # a full sequence or more: one extra copy surely
    assert 1.0 < mean[50] < mean[100] < mean[200] < 2.0  # shorter: extra copy with probability n/seq_len
    assert (copies == upsample_copies(np.array(lengths), seq_len=400, upsample_long=1.0, seed=3)).all()
    assert (upsample_copies(np.array(lengths), seq_len=400, upsample_long=0.0, seed=3) == 1).all()

    texts = make_corpus(tmp_path / "corpus", seq_len=64)
    ds = build_packed_dataset(cfg(tmp_path, [tmp_path / "corpus"], upsample_long=1.0), ByteTokenizer(), 64)
    docs = expected(texts)
    copies = upsample_copies(np.array([len(d) for d in docs]), seq_len=64, upsample_long=1.0, seed=0)
    want = Counter({d: int(c) for d, c in zip(docs, copies)})
    assert ds.stats["documents_packed"] == sum(want.values()) > ds.stats["documents"] == len(texts)
    assert all(want[d] == 2 for d in docs if len(d) >= 64)
    got = reconstruct(ds)
    if got[-1][-1] != EOS:  # the dropped tail cut the last document: complete it
        cut = next(d for d in docs if d[:len(got[-1])] == got[-1])
        assert len(cut) - len(got[-1]) == ds.stats["dropped_tokens"]
        got[-1] = cut
    assert Counter(got) == want


def test_cache_hit_does_not_retokenize_and_changes_invalidate(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus", seq_len=64)
    config = cfg(tmp_path, [tmp_path / "corpus"])
    first = build_packed_dataset(config, ByteTokenizer(), 64)
    assert first.stats["cache_hit"] is False and Path(first.stats["cache_path"]).is_dir()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized although the packed cache exists")

    monkeypatch.setattr(packing, "_tokenize", no_tokenizing)
    second = build_packed_dataset(config, ByteTokenizer(), 64)
    assert second.stats["cache_hit"] is True and second.stats["cache_path"] == first.stats["cache_path"]
    assert all(torch.equal(first[i]["input_ids"], second[i]["input_ids"]) for i in range(len(first)))
    monkeypatch.undo()
    # Another seq_len, seed or a changed file is another cache entry.
    assert build_packed_dataset(config, ByteTokenizer(), 32).stats["cache_hit"] is False
    assert build_packed_dataset(cfg(tmp_path, [tmp_path / "corpus"], seed=1), ByteTokenizer(), 64).stats["cache_hit"] is False
    (tmp_path / "corpus" / "doc000.txt").write_text("changed text, another length")
    changed = build_packed_dataset(config, ByteTokenizer(), 64)
    assert changed.stats["cache_hit"] is False and changed.stats["cache_path"] != first.stats["cache_path"]


# --- sources ------------------------------------------------------------------------------------

def test_txt_jsonl_parquet_sources_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha doc")
    (d / "b.md").write_text("# beta\n\ntwo paragraphs, one document")
    (d / "c.jsonl").write_text("\n".join(json.dumps({"content": t, "id": i}) for i, t in
                                         enumerate(["gamma one", "   ", "gamma two"])) + "\n")
    pq.write_table(pa.table({"content": ["delta one", "delta two"], "n": [1, 2]}), d / "sub" / "d.parquet")
    (d / "notes.csv").write_text("ignored,in,directories\n")
    (d / "empty.py").write_text("")
    ds = load_sources(cfg(tmp_path, [d], text_field="content"))
    assert ds["text"] == ["alpha doc", "# beta\n\ntwo paragraphs, one document", "gamma one", "gamma two",
                          "delta one", "delta two"]  # blank record dropped, order = sorted paths
    assert set(ds["source"]) == {str(d)}
    assert load_sources(cfg(tmp_path, [d], text_field="content", max_documents=3))["text"][-1] == "gamma one"
    # Single files and glob patterns work too.
    assert load_sources(cfg(tmp_path, [d / "sub" / "d.parquet"], text_field="content"))["text"] == ["delta one", "delta two"]
    assert load_sources(cfg(tmp_path, [str(d / "*.txt"), str(d / "c.jsonl")], text_field="content"))["text"] == \
        ["alpha doc", "gamma one", "gamma two"]


def test_stdlib_source_finds_python_files(tmp_path):
    ds = load_sources(cfg(tmp_path, ["stdlib"], max_documents=5))
    assert len(ds) == 5 and all(len(t) > 0 for t in ds["text"]) and set(ds["source"]) == {"stdlib"}
    from seqpar.data.sources import resolve_sources, stdlib_files
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    assert len(files) > 500 and os.path.join(root, "os.py") in files and files == sorted(files)
    assert not any("site-packages" in f for f in files)
    assert len(resolve_sources(cfg(tmp_path, ["stdlib"], max_documents=5))[0].files) == 5
    packed = build_packed_dataset(cfg(tmp_path, ["stdlib"], max_documents=5), ByteTokenizer(), 256)
    assert packed.stats["documents"] == 5 and len(packed) > 0


def test_source_errors_name_the_fix(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(SeqparError, match="does not exist.*data.sources"):
        load_sources(cfg(tmp_path, [tmp_path / "missing"]))
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(SeqparError, match="unsupported extension"):
        load_sources(cfg(tmp_path, [tmp_path / "x.docx"]))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SeqparError, match="holds no supported files"):
        load_sources(cfg(tmp_path, [tmp_path / "empty_dir"]))
    with pytest.raises(SeqparError, match="data.sources is empty"):
        load_sources(cfg(tmp_path, []))
    with pytest.raises(SeqparError, match="matches no supported files"):
        load_sources(cfg(tmp_path, [tmp_path / "*.jsonl"]))
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SeqparError, match="data.text_field"):
        load_sources(cfg(tmp_path, [tmp_path / "r.jsonl"]))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "b.txt").write_text("  \n ")
    with pytest.raises(SeqparError, match="no non-blank documents"):
        load_sources(cfg(tmp_path, [tmp_path / "blank"]))
    (tmp_path / "blank" / "empty.md").write_text("")
    with pytest.raises(SeqparError, match="no non-blank documents"):
        load_sources(cfg(tmp_path, [tmp_path / "blank" / "empty.md"]))
    with pytest.raises(SeqparError, match="no non-blank documents"):
        load_sources(cfg(tmp_path, ["stdlib"], max_documents=0))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "t.txt").write_text("short")
    with pytest.raises(SeqparError, match="fewer than one sequence"):
        build_packed_dataset(cfg(tmp_path, [tmp_path / "tiny"]), tok, 4096)


# --- batches ------------------------------------------------------------------------------------

class IndexDataset:
    """Sequence i is filled with i: batches show which samples they hold."""

    def __init__(self, n, seq_len=8):
        self.n, self.seq_len = n, seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.full((self.seq_len,), i), "position_ids": torch.arange(self.seq_len)}


def samples(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_dp_ranks_read_disjoint_complete_contiguous_slices():
    n, dp, micro = 24, 3, 2
    iters = [BatchIterator(IndexDataset(n), dp_rank=r, dp_size=dp, micro_batch_size=micro, seed=5) for r in range(dp)]
    assert iters[0].steps_per_epoch == n // (dp * micro)
    for epoch in range(2):
        order = iters[0].permutation(epoch).tolist()
        seen = []
        for k in range(iters[0].steps_per_epoch):
            step = [samples(next(it)) for it in iters]
            assert sum(step, []) == order[k * dp * micro:(k + 1) * dp * micro]  # rank r: its contiguous part
            seen += sum(step, [])
        assert sorted(seen) == list(range(n))  # disjoint and complete over the epoch
    assert iters[0].permutation(0).tolist() != iters[0].permutation(1).tolist()


def test_batches_from_packed_dataset_have_the_right_shapes(tmp_path):
    make_corpus(tmp_path / "corpus", seq_len=64)
    ds = build_packed_dataset(cfg(tmp_path, [tmp_path / "corpus"]), ByteTokenizer(), 64)
    it = BatchIterator(ds, dp_rank=1, dp_size=2, micro_batch_size=2, seed=0)
    batch = next(it)
    assert set(batch) == {"input_ids", "position_ids"}
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, 64)
    assert batch["input_ids"].dtype == batch["position_ids"].dtype == torch.long
    order = it.permutation(0)
    assert torch.equal(batch["input_ids"][1], ds[int(order[3])]["input_ids"])


def test_packed_batches_meet_the_model_contract(tmp_path):
    """seqpar.model derives document ids from position_ids == 0: no label crosses a document."""
    from seqpar.model.batch import IGNORE_INDEX, prepare_batch

    make_corpus(tmp_path / "corpus", seq_len=64)
    ds = build_packed_dataset(cfg(tmp_path, [tmp_path / "corpus"]), ByteTokenizer(), 64)
    batch = next(BatchIterator(ds, micro_batch_size=4, seed=0))
    full = prepare_batch(batch)
    ids, pos, labels = batch["input_ids"], batch["position_ids"], full["labels"]
    boundary = pos[:, 1:] == 0
    assert (labels[:, :-1][boundary] == IGNORE_INDEX).all()
    assert torch.equal(labels[:, :-1][~boundary], ids[:, 1:][~boundary])
    assert (ids[:, :-1][boundary & (ids[:, 1:] == BOS)] == EOS).all()


def test_resume_mid_epoch_continues_with_the_next_micro_batch():
    kw = dict(dp_rank=1, dp_size=2, micro_batch_size=2, seed=7)
    ref = BatchIterator(IndexDataset(10), **kw)  # 2 steps per epoch, 2 samples skipped per epoch
    for stop in (1, 2, 3, 5):
        run = BatchIterator(IndexDataset(10), **kw)
        for _ in range(stop):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint as plain JSON
        assert set(state) == {"epoch", "position", "seed"}
        resumed = BatchIterator(IndexDataset(10), **{**kw, "seed": 0})
        resumed.load_state_dict(state)
        expect = [samples(next(run)) for _ in range(4)]
        assert [samples(next(resumed)) for _ in range(4)] == expect
    with pytest.raises(SeqparError, match="same data config"):
        ref.load_state_dict({"epoch": 0, "position": 99, "seed": 7})


def test_same_seed_same_batches_different_seed_different_order():
    def first(seed, steps=6):
        it = BatchIterator(IndexDataset(32), dp_rank=0, dp_size=2, micro_batch_size=2, seed=seed)
        return [samples(next(it)) for _ in range(steps)]

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_batch_iterator_rejects_too_small_datasets():
    with pytest.raises(SeqparError, match="micro_batch_size"):
        BatchIterator(IndexDataset(3), dp_rank=0, dp_size=2, micro_batch_size=2)
    with pytest.raises(SeqparError, match="dp_rank"):
        BatchIterator(IndexDataset(8), dp_rank=2, dp_size=2)
