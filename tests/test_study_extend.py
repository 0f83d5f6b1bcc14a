"""`seqpar study extend --fast`: the whole context-extension study end to end (pretrain,
zero-shot evals, continued pretraining under SP with every method, report)."""

from __future__ import annotations

import json

import pytest

from seqpar.cli import main as seqpar_main

pytestmark = pytest.mark.extended  # trains 7 small models: minutes


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
