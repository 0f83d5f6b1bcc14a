"""`seqpar bench kernels` (seqpar/bench/kernels.py) on the CPU, tiny sizes.

Only what the bench computes is checked (paths present, bytes and FLOPs from their
formulas, every path agreeing with the float32 reference, JSON written); never how fast
anything is.
"""
import argparse
import io
import json
import re

import pytest
import torch

from seqpar.bench import kernels
from seqpar.errors import SeqparError
from seqpar.ops import attention_backend

B, S, HQ, HK, D = 1, 128, 2, 1, 32  # GQA (2 query heads share 1 K/V head), float32
TINY = dict(device="cpu", seq_lens=str(S), batch=B, heads=HQ, kv_heads=HK, head_dim=D,
            dtype="float32", iters=1, warmup=0, compile=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "kernels.json"
    out = io.StringIO()
    rows = kernels.run_kernel_bench(json_path=str(path), out=out, log=lambda m: None, **TINY)
    return rows, json.loads(path.read_text()), out.getvalue()


def test_rope_rows(bench):
    rows = [r for r in bench[0] if r["op"] == "rope"]
    by_path = {r["path"]: r for r in rows}
    assert list(by_path) == [kernels.COPY, kernels.HF_EAGER, kernels.SEQPAR_ROPE, kernels.SEQPAR_ROPE_POS]
    qk = (B * S * HQ * D + B * S * HK * D) * 4
    tables = 2 * S * D * 4  # cos and sin [s, d] float32
    assert by_path[kernels.COPY]["bytes"] == 2 * qk
    assert by_path[kernels.HF_EAGER]["bytes"] == by_path[kernels.SEQPAR_ROPE]["bytes"] == 2 * qk + tables
    assert by_path[kernels.SEQPAR_ROPE_POS]["bytes"] == 2 * qk + S * 8 + (D // 2) * 4  # int64 pos, inv_freq
    copy = by_path[kernels.COPY]
    assert copy["max_abs_diff"] is None and copy["vs_copy"] == pytest.approx(1.0)
    for r in rows:
        assert r["error"] is None and r["seq_len"] == S and r["time_s"] > 0 and len(r["times_s"]) == 1
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        assert r["vs_copy"] == pytest.approx(r["gb_per_s"] / copy["gb_per_s"])
        if r is not copy:
            assert r["max_abs_diff"] < 1e-4


def test_attention_rows(bench):
    rows = [r for r in bench[0] if r["op"] == "attention"]
    fwd_flops = 4 * B * HQ * S * S * D / 2
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
        by_path = {r["path"]: r for r in rows if r["pass"] == mode}
        kernel_rows = [kernels.KERNEL + name for name in ("flash", "seqpar", "torch")]
        assert list(by_path) == [kernels.SEQPAR_ATTN, *kernel_rows, kernels.SDPA]
        base = by_path[kernels.SDPA]
        assert base["vs_baseline"] == pytest.approx(1.0)
        for r in by_path.values():
            assert r["error"] is None and r["baseline"] == kernels.SDPA and r["time_s"] > 0
            assert r["flops"] == flops
            assert r["tflop_per_s"] == pytest.approx(flops / r["time_s"] / 1e12)
            assert r["vs_baseline"] == pytest.approx(r["tflop_per_s"] / base["tflop_per_s"])
            assert r["max_abs_diff"] < 1e-4  # output (fwd) or dq/dk/dv (fwd+bwd) vs float32 SDPA


def test_report_and_json(bench):
    rows, saved, text = bench
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["attention_backend"] == attention_backend("cpu", torch.float32, D)
    assert saved["torch_version"] == torch.__version__ and saved["date"] and saved["device"].startswith("CPU")
    assert saved["config"]["seq_lens"] == [S] and saved["config"]["kv_heads"] == HK
    assert f"attention backend: {attention_backend('cpu', torch.float32, D)}" in text
    assert "| seq len | path | MiB moved |" in text and "| seq len | pass | path | TFLOP |" in text
    assert text.count("\n| 128 |") == len(rows)


@pytest.mark.parametrize("when", ["at torch.compile", "at the first call"])
def test_compile_failure_is_a_row_not_a_crash(monkeypatch, when):
    def fake_compile(fn, **kw):
        if when == "at torch.compile":
            raise RuntimeError("no C compiler for inductor")

        def compiled(*args):
            raise RuntimeError("no C compiler for inductor")
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    options = {**TINY, "compile": True, "ops": "rope"}
    rows = kernels.run_kernel_bench(out=io.StringIO(), log=lambda m: None, **options)
    by_path = {r["path"]: r for r in rows}
    failed = by_path.pop(kernels.HF_COMPILE)
    assert "no C compiler for inductor" in failed["error"] and failed["time_s"] is None
    assert failed["gb_per_s"] is None and failed["vs_copy"] is None
    assert all(r["error"] is None for r in by_path.values())


def _cli(argv):
    parser = argparse.ArgumentParser(prog="seqpar bench")
    kernels.add_parser(parser.add_subparsers(dest="bench"))
    return parser.parse_args(argv)


def test_cli_defaults_and_run(tmp_path, capsys):
    args = _cli(["kernels"])
    assert (args.device, args.seq_len, args.heads, args.head_dim, args.dtype) == (None,) * 5
    assert args.compile and args.ops == "rope,attention" and args.json is None

    path = tmp_path / "k.json"
    args = _cli(["kernels", "--device", "cpu", "--seq-len", "64,128", "--heads", "2", "--head-dim", "16",
                 "--iters", "1", "--warmup", "0", "--ops", "rope", "--no-compile", "--json", str(path)])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "[bench kernels] rope S=64: running..." in err and "| 128 | seqpar apply_rope |" in out
    saved = json.loads(path.read_text())
    assert {r["seq_len"] for r in saved["rows"]} == {64, 128}
    assert {r["op"] for r in saved["rows"]} == {"rope"}


def test_cuda_unavailable_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _cli(["kernels", "--device", "cuda", "--no-compile"])
    with pytest.raises(SeqparError, match="--device cuda.*--device cpu"):
        args.func(args)
    assert kernels.resolve_config()["device"] == "cpu"  # no GPU: the default is the CPU


@pytest.mark.parametrize("options, message", [
    (dict(heads=3, kv_heads=2), "--heads 3 must be a multiple of --kv-heads 2"),
    (dict(ops="rope,matmul"), "--ops 'rope,matmul'"),
    (dict(head_dim=33), "--head-dim 33 must be even"),
    (dict(seq_lens="4k,x"), "cannot read token count 'x'"),
    (dict(iters=0), "--iters must be an integer >= 1"),
    (dict(dtype="int8"), "--dtype 'int8' is not supported"),
])
def test_bad_options(options, message):
    with pytest.raises(SeqparError, match=re.escape(message)):
        kernels.resolve_config(device="cpu", **options)
