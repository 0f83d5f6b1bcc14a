"""`seqpar study extend --fast`: the whole context-extension study end to end (pretrain,
zero-shot evals, continued pretraining under SP with every method, report)."""

from __future__ import annotations

import json

import pytest

from seqpar.cli import main as seqpar_main

from seqpar.studies.report import checks


def _row(method, factor, stage, ppl, passkey=((1.0,), (0.0,), (0.0,), (0.0,))):
    return {"method": method, "factor": factor, "stage": stage, "ppl": list(ppl), "passkey": [list(a) for a in passkey]}


def test_ordering_checks_read_the_measured_numbers():
    """Each literature claim is judged on the right cells, and fails when they say so."""
    good = {"base_length": 8, "lengths": [8, 16, 32, 64], "factors": [8], "rows": [
        _row("none", None, "base", [10, 30, 90, 200]),
        _row("linear", 8, "zero-shot", [14, 15, 16, 18]), _row("linear", 8, "cpt", [11, 10, 9, 9]),
        _row("dynamic", 8, "zero-shot", [10, 12, 13, 14]), _row("yarn", 8, "zero-shot", [10, 11, 12, 13]),
        _row("yarn", 8, "cpt", [10, 9, 8, 8])]}
    got = checks(good)
    assert [c["holds"] for c in got] == [True, True, True, True, True, True], got
    bad = dict(good, rows=[dict(r) for r in good["rows"]])
    bad["rows"][0]["ppl"] = [10, 9, 9, 9]   # perplexity does not break past L (passkey still does)
    bad["rows"][3]["ppl"] = [10, 12, 13, 19]  # dynamic worse than PI at 8L
    bad["rows"][5]["ppl"] = [10, 9, 8, 11]   # YaRN + CPT above the base at 8L
    assert [c["holds"] for c in checks(bad)] == [False, True, True, False, True, False]


@pytest.mark.extended  # trains 7 small models: minutes
def test_study_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert seqpar_main(["study", "extend", "configs/studies/extend/study.yaml", "--fast", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    methods = ["none", "linear", "dynamic", "abf", "yarn", "llama3"]
    assert results["methods"] == methods and results["factors"] == [2] and results["lengths"] == [64, 128]
    stages = {(r["stage"], r["method"]) for r in results["rows"]}
    assert stages == {("base", "none")} | {("zero-shot", m) for m in methods[1:]} | {("cpt", m) for m in methods}
    for row in results["rows"]:
        assert len(row["ppl"]) == 2 and all(p > 1 for p in row["ppl"])
        assert row["scored_tokens"][0] == row["scored_tokens"][1] == 2 * 32  # same tokens at both lengths
        assert len(row["passkey"]) == 2 and len(row["passkey"][0]) == 2
    assert results["checks"] and all({"claim", "holds", "measured"} <= set(c) for c in results["checks"])
    table = (out / "table.md").read_text()
    assert "| YaRN | 2 |" in table and "qualitative ordering" in table
    assert (out / "study.png").stat().st_size > 20_000
    # A rerun reuses every finished step (no training, no evaluation).
    capsys.readouterr()
    assert seqpar_main(["study", "extend", "configs/studies/extend/study.yaml", "--fast", "--out", str(out)]) == 0
    assert "done before, reusing" in capsys.readouterr().out
