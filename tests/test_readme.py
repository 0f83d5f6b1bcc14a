"""The README's example runs as written, through torchrun, on 4 CPU ranks."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    block = re.search(r"<!-- example:begin -->\s*```python\n(.*?)```\s*<!-- example:end -->",
                      README.read_text(), re.S)
    assert block, "README lost its example block"
    return block.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_example_runs_under_torchrun(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ring forward sent" in proc.stdout
    assert proc.stdout.count("holds tokens") == 4
