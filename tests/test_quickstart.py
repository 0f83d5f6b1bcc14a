"""The README's first command, in its reduced form (same code path, fewer steps)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.extended  # the two commands end to end (~1.5 min): the slow suite
def test_quickstart_fast(tmp_path):
    env = dict(os.environ, SEQPAR_QUICKSTART_FAST="1", SEQPAR_QUICKSTART_DIR=str(tmp_path / "qs"))
    proc = subprocess.run(["bash", "launch/quickstart.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    out = tmp_path / "qs"
    assert (out / "stage2" / "hf" / "config.json").is_file()
    assert json.loads((out / "stage2" / "hf" / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    assert any((out / "stage2" / "checkpoints").glob("step_*/COMPLETE"))
    result = json.loads((out / "eval" / "after" / "ppl.json").read_text())
    assert result  # perplexity by length was computed
    assert (out / "eval" / "after" / "ppl.png").stat().st_size > 10_000
    assert "perplexity by length" in proc.stdout and "Hugging Face export" in proc.stdout
