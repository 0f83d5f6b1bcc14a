"""Fixtures for the cluster tests: this machine made into a small cluster by setup.sh
(sshd + pdsh hostfile of two loopback "nodes"; a one-host Slurm), or a skip naming why."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = Path(__file__).with_name("setup.sh")


def cluster(what: str) -> dict:
    """Run `setup.sh WHAT`; its KEY=VALUE lines, or pytest.skip with its reason."""
    proc = subprocess.run(["bash", str(SETUP), what], capture_output=True, text=True, timeout=1200)
    lines = proc.stdout.splitlines()
    if proc.returncode == 3:
        reason = next((line[len("SKIP: "):] for line in lines if line.startswith("SKIP: ")), proc.stdout)
        pytest.skip(f"cluster setup ({what}): {reason}")
    assert proc.returncode == 0, f"tests/cluster/setup.sh {what} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("["))


def _cluster_fixture(what: str):
    env = cluster(what)
    yield env
    if env.get("STARTED") == "1":  # leave daemons that were running before as they were
        subprocess.run(["bash", str(SETUP), "stop", what], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def ssh_cluster():
    yield from _cluster_fixture("ssh")


@pytest.fixture(scope="session")
def slurm_cluster():
    yield from _cluster_fixture("slurm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    """What every CPU rank needs (launch/cpu_gloo.sh sets the same), plus `extra`."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               CUDA_VISIBLE_DEVICES="", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.update(extra)
    return env
