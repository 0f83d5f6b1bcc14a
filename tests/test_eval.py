"""Long-context evaluation (seqpar.eval): perplexity by length and passkey retrieval.

- Under SP=2 (gloo, ring / Ulysses, every layout) perplexity and loss by position equal
  one process scoring the whole sequences (relative 1e-5), and passkey predictions match.
- `seqpar eval ppl` writes ppl.json + ppl.png, and --compare merges results.
- Passkey prompts put the key at the requested depth; a stub model that copies from its
  context scores 1.0, a random model 0.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from seqpar import SeqparError
from seqpar.cli import build_parser
from seqpar.cli import main as seqpar_main
from seqpar.data import ByteTokenizer, DataConfig, load_tokenizer
from seqpar.eval.cli import run_evals
from seqpar.eval_config import EvalConfig, PasskeyEvalConfig, PerplexityEvalConfig
from seqpar.eval.passkey import NEEDLE, build_prompt, evaluate_passkey, random_key
from seqpar.eval.perplexity import evaluate_perplexity
from seqpar.eval.runner import load_model
from seqpar.units import format_tokens, parse_token_list, parse_tokens
from seqpar.parallel import init_mesh

from .distributed import run_distributed

TOL = 1e-5
LENGTHS = [64, 128, 256]
SP_SETUPS = [("ring", "zigzag"), ("ulysses", "contiguous"), ("ring", "stripe")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama (GQA 2:1) saved with the byte tokenizer, and a small corpus."""
    root = tmp_path_factory.mktemp("eval")
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    ByteTokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    words = "the of sequence ring shard token model rope attention long context data pass key".split()
    (root / "corpus").mkdir()
    for i in range(6):
        text = ". ".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(30))
        (root / "corpus" / f"doc{i}.txt").write_text(text + ".\n")
    data = {"sources": [str(root / "corpus")], "cache_dir": str(root / "cache")}
    return root, data


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * abs(b)


def _sp_worker(model_dir, data):
    """Every SP setup and the passkey eval on this rank of 2; returns the results."""
    tokenizer = load_tokenizer(model_dir)
    mesh = init_mesh(2)
    out = {}
    for attention, layout in SP_SETUPS:
        model = load_model(model_dir, dtype="float32")
        out[attention, layout] = evaluate_perplexity(model, tokenizer, data, LENGTHS, mesh=mesh, attention=attention,
                                                     layout=layout, num_sequences=3, buckets=4)
    out["passkey"] = evaluate_passkey(load_model(model_dir, dtype="float32"), tokenizer, [256], [0.0, 1.0],
                                      trials=2, mesh=mesh)
    return out


def test_sp_equals_single_process(tiny):
    root, data = tiny
    model_dir = str(root / "model")
    tokenizer = load_tokenizer(model_dir)
    reference = evaluate_perplexity(load_model(model_dir, dtype="float32"), tokenizer, data, LENGTHS,
                                    num_sequences=3, buckets=4)
    ref_keys = evaluate_passkey(load_model(model_dir, dtype="float32"), tokenizer, [256], [0.0, 1.0], trials=2)
    ranks = run_distributed(_sp_worker, 2, model_dir, data, timeout=240)

    assert reference["stride"] == 32 and reference["sequence_length"] == 256
    for row in reference["lengths"]:  # the last 32 tokens of each sequence, at every length
        assert row["sequences"] == 3 and row["tokens"] == 3 * 32 and row["context"] == [row["length"] - 32,
                                                                                         row["length"] - 1]
        assert sum(b["tokens"] for b in row["buckets"]) == 3 * (row["length"] - 1)  # every window token
        assert [b["start"] for b in row["buckets"]] == [i * row["length"] // 4 for i in range(4)]
        assert math.isclose(row["ppl"], math.exp(row["nll"]))
    for got in ranks:
        for setup in SP_SETUPS:
            result = got[setup]
            assert result["sp_size"] == 2 and (result["attention"], result["layout"]) == setup
            for row, ref in zip(result["lengths"], reference["lengths"]):
                assert row["tokens"] == ref["tokens"]
                assert _close(row["nll"], ref["nll"]), (setup, row["length"], row["nll"], ref["nll"])
                for b, rb in zip(row["buckets"], ref["buckets"]):
                    assert b["tokens"] == rb["tokens"] and _close(b["nll"], rb["nll"]), (setup, b, rb)
        keys = got["passkey"]
        assert [s["predicted"] for c in keys["cells"] for s in c["samples"]] == \
               [s["predicted"] for c in ref_keys["cells"] for s in c["samples"]]
    assert ref_keys["accuracy"] == [[0.0, 0.0]]  # a random model does not find the key


class _ContextFree(nn.Module):
    """A causal LM whose next-token distribution depends on the current token only."""

    def __init__(self, vocab=260, hidden=16):
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.head = nn.Embedding(vocab, hidden), nn.Linear(hidden, vocab, bias=False)
        self.decoder = lambda input_ids, **kw: (self.embed(input_ids),)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def test_same_tokens_scored_at_every_length(tiny):
    """The scored tokens are one fixed set (context only grows with the length), so a model
    that ignores context has exactly the same perplexity at every length."""
    from seqpar.eval.perplexity import window_ends

    total, ends = window_ends([64, 128, 256], stride=16, windows=3)
    assert total == 256 + 2 * 16 and ends == [256, 272, 288]
    for length in (64, 128, 256):  # windows [end - L, end) score [end - 16, end): the same positions
        scored = {p for end in ends for p in range(end - length, end)[-16:]}
        assert scored == set(range(288 - 48, 288))
    root, data = tiny
    result = evaluate_perplexity(_ContextFree(), ByteTokenizer(), data, [64, 128, 256], num_sequences=2,
                                 stride=16, windows=3, buckets=4)
    rows = result["lengths"]
    assert [r["tokens"] for r in rows] == [2 * 3 * 16] * 3
    assert max(r["nll"] for r in rows) - min(r["nll"] for r in rows) < 1e-9, [r["nll"] for r in rows]
    real = evaluate_perplexity(load_model(str(root / "model"), dtype="float32"), ByteTokenizer(), data,
                               [64, 128, 256], num_sequences=2, stride=16, windows=3, buckets=4)["lengths"]
    assert len({round(r["nll"], 6) for r in real}) == 3  # a model that reads context: it differs
    for bad in (dict(stride=64), dict(stride=0), dict(windows=0)):
        with pytest.raises(SeqparError, match="stride|windows"):
            evaluate_perplexity(_ContextFree(), ByteTokenizer(), data, [64, 128], **bad)


def test_cli_ppl_writes_json_plot_and_compares(tiny, tmp_path, capsys):
    root, data = tiny
    common = ["eval", "ppl", "--model", str(root / "model"), "--lengths", "64,128", "--data", data["sources"][0],
              "--cache-dir", data["cache_dir"], "--num-sequences", "2", "--buckets", "4"]
    assert seqpar_main(common + ["--label", "before", "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "ppl.json").read_text())
    assert first["label"] == "before" and [r["length"] for r in first["lengths"]] == [64, 128]
    assert {"nll", "ppl", "tokens", "buckets"} <= set(first["lengths"][0]) and first["compare"] == []
    assert (tmp_path / "a" / "ppl.png").stat().st_size > 10_000

    # SP=2 from a single process: the ranks are spawned; same numbers, merged with the first.
    assert seqpar_main(common + ["--label", "after", "--out", str(tmp_path / "b"), "--sp-size", "2",
                                 "--compare", str(tmp_path / "a" / "ppl.json")]) == 0
    merged = json.loads((tmp_path / "b" / "ppl.json").read_text())
    assert merged["label"] == "after" and merged["sp_size"] == 2
    assert [c["label"] for c in merged["compare"]] == ["before"]
    for row, ref in zip(merged["lengths"], first["lengths"]):
        assert _close(row["nll"], ref["nll"])
    assert (tmp_path / "b" / "ppl.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| length | scored tokens | after ppl | before ppl |" in table and "| 128 | 64 |" in table

    # Only merging existing results (no --model).
    assert seqpar_main(["eval", "ppl", "--compare", str(tmp_path / "b"), "--compare", str(tmp_path / "a"),
                        "--out", str(tmp_path / "c")]) == 0
    only = json.loads((tmp_path / "c" / "ppl.json").read_text())
    assert only["label"] == "after" and [c["label"] for c in only["compare"]] == ["before"]
    with pytest.raises(SystemExit):
        seqpar_main(["eval", "ppl", "--model", str(root / "model"), "--lengths", "64,66", "--sp-size", "2",
                     "--data", data["sources"][0], "--cache-dir", data["cache_dir"], "--out", str(tmp_path / "d")])


def test_cli_defaults_are_the_eval_config_defaults():
    """`seqpar eval ppl | passkey` and the run config's `eval:` section share their defaults."""
    parser = build_parser()
    ppl = parser.parse_args(["eval", "ppl"])
    passkey = parser.parse_args(["eval", "passkey", "--model", "m", "--lengths", "1k"])
    want, data = PerplexityEvalConfig(lengths=""), DataConfig(sources=["stdlib"])
    assert (ppl.num_sequences, ppl.buckets, ppl.stride, ppl.windows) == (
        want.num_sequences, want.buckets, want.stride, want.windows)
    assert want.data == data and (ppl.text_field, ppl.cache_dir, ppl.data_seed, ppl.max_documents) == (
        data.text_field, data.cache_dir, data.seed, data.max_documents)
    pk = PasskeyEvalConfig(lengths="")
    assert [float(d) for d in passkey.depths.split(",")] == pk.depths
    assert (passkey.trials, passkey.seed) == (pk.trials, pk.seed)
    assert (ppl.dtype, ppl.attention, ppl.layout) == (EvalConfig.dtype, EvalConfig.attention, EvalConfig.layout)


def test_run_evals_from_a_typed_config(tiny, tmp_path):
    """The trainer's hook (`run_evals`, one process): the sections configured run and write
    their files; the defaults left out come from the dataclasses."""
    root, data = tiny
    cfg = EvalConfig(ppl=PerplexityEvalConfig(lengths="64,128", data=DataConfig(**data), num_sequences=2, buckets=4),
                     passkey=PasskeyEvalConfig(lengths="512", depths=[0.5], trials=1),
                     out=str(tmp_path / "out"), dtype="float32")
    results = run_evals(root / "model", cfg, log=lambda line: None)
    assert [r["length"] for r in results["ppl"]["lengths"]] == [64, 128] and results["ppl"]["windows"] == 1
    assert results["ppl"]["data"]["sources"] == data["sources"] and results["ppl"]["label"] == "model"
    assert results["passkey"]["depths"] == [0.5] and results["passkey"]["trials"] == 1
    assert (tmp_path / "out" / "ppl.json").is_file() and (tmp_path / "out" / "passkey.json").is_file()
    assert run_evals(root / "model", EvalConfig(out=str(tmp_path / "none"))) == {}


@pytest.mark.parametrize("args, message", [
    (["--sp-size", "0"], "--sp-size must be at least 1, got 0"),
    (["--sp-size", "-2"], "--sp-size must be at least 1, got -2"),
    (["--sp-size", "4", "--ulysses-size", "3"], "--ulysses-size must be at least 1 and divide --sp-size 4"),
    (["--model", "runs/no-such-export/hf"], "--model 'runs/no-such-export/hf' is not a model directory"),
])
def test_eval_cli_bad_input_is_named_before_any_rank_starts(args, message, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = {"--model": str(model), "--lengths": "64"}
    extra = []
    for key, value in zip(args[::2], args[1::2]):
        if key == "--model":
            argv[key] = value
        else:
            extra += [key, value]
    for command in ("ppl", "passkey"):
        with pytest.raises(SystemExit) as exc:
            seqpar_main(["eval", command] + [x for kv in argv.items() for x in kv] + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err, command


def test_passkey_prompt_places_key_at_depth():
    tok = ByteTokenizer()
    starts = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        key = random_key(0, 512, depth, 0)
        p = build_prompt(tok, 512, depth, key)
        assert len(p.input_ids) == 512 and len(key) == 5 and key.isdigit()
        needle = NEEDLE.format(key=key)
        assert tok.decode(p.input_ids[p.needle_start:p.needle_start + len(needle)]) == needle
        assert abs(p.depth - depth) <= 1 / p.filler_tokens
        assert tok.decode(p.input_ids).endswith(f"What is the pass key? The pass key is {key}")
        assert p.input_ids[p.answer_start:] == p.answer == list(f" {key}".encode())
        starts.append(p.needle_start)
    assert starts == sorted(starts) and starts[0] == p.filler_start
    question = " What is the pass key? The pass key is"
    assert starts[-1] + len(NEEDLE.format(key="00000")) == p.answer_start - len(question)
    with pytest.raises(SeqparError, match="too short"):
        build_prompt(tok, 128, 0.5, "12345")
    with pytest.raises(SeqparError, match="depth"):
        build_prompt(tok, 512, 1.5, "12345")


class _CopyDecoder(nn.Module):
    """An induction head by lookup: at each token, predict what followed the last earlier
    occurrence of the preceding `k` tokens (one-hot hidden states over the vocabulary)."""

    def __init__(self, vocab: int, k: int = 8):
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, input_ids, position_ids=None, use_cache=None, **kwargs):
        ids = input_ids[0].tolist()
        hidden = torch.zeros(1, len(ids), self.vocab)
        seen = {}
        for t in range(len(ids)):
            gram = tuple(ids[max(0, t - self.k + 1):t + 1])
            if gram in seen:
                hidden[0, t, seen[gram]] = 1.0
            if t + 1 < len(ids):
                seen[gram] = ids[t + 1]
        return (hidden,)


class _CopyModel(nn.Module):
    def __init__(self, vocab: int = 260):
        super().__init__()
        self.decoder = _CopyDecoder(vocab)
        self.head = nn.Linear(vocab, vocab, bias=False)
        nn.init.eye_(self.head.weight)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def test_passkey_scores_a_copying_model_perfectly():
    result = evaluate_passkey(_CopyModel(), ByteTokenizer(), [256, 512], [0.0, 0.5, 1.0], trials=3, seed=1)
    assert result["accuracy"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    samples = [s for c in result["cells"] for s in c["samples"]]
    assert len(samples) == 18 and all(s["predicted"] == " " + s["key"] for s in samples)
    assert len({s["key"] for s in samples}) > 1  # different keys per trial


def test_length_parsing():
    assert parse_tokens("4096") == 4096 and parse_tokens("1k") == 1024 and parse_tokens("32K") == 32768
    assert parse_tokens("1m") == 1 << 20 and parse_tokens("1.5k") == 1536 and parse_tokens(" 2K ") == 2048
    assert parse_token_list("4k,1k,2k,1K") == [1024, 2048, 4096]
    assert parse_token_list(["128", 64]) == [64, 128]
    assert parse_tokens("3.7m") == round(3.7 * (1 << 20)) and parse_tokens("1.3k") == 1331  # nearest token
    assert parse_tokens(".5k") == 512 and parse_tokens(4096) == 4096
    for bad in ("", "k", "1x", "-5", "1", "1.5.2k", "3.7 mb"):
        with pytest.raises(SeqparError):
            parse_token_list(bad)
    assert [format_tokens(n) for n in (1024, 3 << 20, 1000, 1536)] == ["1K", "3M", "1000", "1536"]
