"""`seqpar bench attention` through the CLI entry point (`seqpar.cli.main`)."""
import json

import pytest

import seqpar
import seqpar.parallel.spawn as spawn
from seqpar.cli import main


def test_bench_attention_tiny_run(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["bench", "attention", "--algo", "ring,ulysses", "--world-size", "2",
               "--seq-len", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
               "--iters", "1", "--warmup", "0", "--kernel", "auto,torch", "--json", str(path)])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "[bench] ring W=2 S=64 kernel=auto: running..." in err
    assert "kernels: auto,torch" in out and "| algo |" in out and "| time vs kernel auto |" in out

    result = json.loads(path.read_text())
    assert result["torch_version"] and result["date"] and result["device"].startswith("CPU gloo")
    assert [(r["algo"], r["kernel"]) for r in result["rows"]] == [
        (algo, kernel) for algo in ("single", "ring", "ulysses") for kernel in ("auto", "torch")]
    # Each row says which kernel served its blocks: PyTorch's flash under auto, pure torch when forced.
    by_kernel = {k: [r for r in result["rows"] if r["kernel"] == k] for k in ("auto", "torch")}
    assert all("causal: flash" in r["attention_backend"] for r in by_kernel["auto"])
    assert all("causal: torch" in r["attention_backend"] and r["time_ratio_vs_first_kernel"] > 0
               for r in by_kernel["torch"])
    rows = {r["algo"]: r for r in by_kernel["auto"]}
    assert list(rows) == ["single", "ring", "ulysses"]
    assert rows["single"]["world_size"] == 1 and rows["single"]["bytes_sent_per_rank"] == 0

    for algo in ("ring", "ulysses"):
        row = rows[algo]
        assert row["world_size"] == 2 and row["layout"] == "zigzag"
        # The counters are filled by the real communication calls; theory must match exactly,
        # on every rank, per op and per direction.
        theory = row["theoretical"]
        assert theory["total_bytes"] > 0
        assert row["bytes_sent_by_rank"] == [theory["total_bytes"]] * 2
        assert row["measured_over_theoretical"] == 1.0
        for comm in row["comm_by_rank"]:
            for direction in ("fwd", "bwd"):
                assert comm[direction] == theory[direction]

    for row in rows.values():
        assert row["time_s"] > 0
        assert all(t > 0 for times in row["iter_times_per_rank_s"] for t in times)
        assert row["time_ratio_vs_single"] > 0
        assert isinstance(row["peak_mem_bytes_per_rank"], int) and row["peak_mem_bytes_per_rank"] >= 0
        assert len(row["memory_by_rank"]) == row["world_size"]
        for mem in row["memory_by_rank"]:
            assert mem["baseline_bytes"] > 0 and mem["peak_bytes"] >= mem["peak_extra_bytes"]
            assert mem["method"] in ("VmHWM", "ru_maxrss")
        assert row["mem_ratio_vs_single"] is None or row["mem_ratio_vs_single"] >= 0


def test_bench_attention_ring_in_passes_side_by_side(tmp_path, capsys):
    """One row per --kv-heads-per-pass; each pass goes around the ring again (more messages,
    the same bytes), and the counted traffic equals the theory for that pass count."""
    path = tmp_path / "bench.json"
    rc = main(["bench", "attention", "--world-size", "2", "--seq-len", "64", "--heads", "4", "--kv-heads", "2",
               "--head-dim", "16", "--iters", "1", "--warmup", "0", "--no-baseline",
               "--kv-heads-per-pass", "2,1", "--json", str(path)])
    assert rc == 0
    assert "| ring (1 kv heads/pass) |" in capsys.readouterr().out
    one, two = json.loads(path.read_text())["rows"]
    assert (one["kv_heads_per_pass"], two["kv_heads_per_pass"]) == (2, 1)
    for row in (one, two):
        assert all(c[d] == row["theoretical"][d] for c in row["comm_by_rank"] for d in ("fwd", "bwd"))
    assert two["theoretical"]["bwd"]["calls"]["p2p"] == 2 * one["theoretical"]["bwd"]["calls"]["p2p"]
    assert two["bytes_sent_per_rank"] == one["bytes_sent_per_rank"]


@pytest.mark.parametrize("args, message", [
    (["--algo", "ring", "--world-size", "2", "--seq-len", "63"],
     "--seq-len 63 is not divisible by 2 x --world-size = 4, which --layout zigzag needs"),
    (["--algo", "ulysses", "--world-size", "4", "--seq-len", "64", "--heads", "6",
      "--kv-heads", "6"], "--heads 6 is not divisible by the Ulysses size 4"),
    (["--algo", "ring,hybrid", "--world-size", "6", "--seq-len", "48", "--ulysses-size", "4"],
     "--world-size 6 is not divisible by --ulysses-size 4"),
    (["--algo", "ring,star", "--world-size", "2", "--seq-len", "64"], "unknown --algo 'star'"),
    (["--world-size", "2", "--seq-len", "64", "--kv-heads", "4", "--kv-heads-per-pass", "0,3"],
     "--kv-heads-per-pass 3 must divide --kv-heads 4"),
])
def test_bad_arguments_fail_before_spawning(monkeypatch, capsys, args, message):
    def no_spawn(*a, **k):
        raise AssertionError("spawned despite invalid arguments")

    monkeypatch.setattr(spawn, "run_distributed", no_spawn)
    with pytest.raises(SystemExit) as info:
        main(["bench", "attention", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "seqpar: error:" in err and message in err, err
    assert "spawned" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"seqpar {seqpar.__version__}"


def test_every_command_is_registered_one_way(capsys):
    """Each command and bench comes from a module's `add_parser(subparsers)` listed in
    seqpar/cli.py; a group named without its subcommand prints its help and exits 2."""
    from seqpar import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert sorted(commands) == sorted(["train", "bench", "eval", "study", "plan", "ckpt", "doctor", "build-ext"])
    assert all(fn.__name__ in ("add_parser", "_add_train", "_add_bench", "_add_build_ext")
               for fn in cli.COMMANDS + cli.BENCHES)
    for group, members in [("bench", {"attention", "loss", "memory", "kernels"}), ("eval", {"ppl", "passkey"}),
                           ("study", {"extend"}), ("ckpt", {"info", "convert"})]:
        sub = next(a for a in commands[group]._actions if a.dest == group).choices
        assert set(sub) == members
        assert main([group]) == 2
        assert f"usage: seqpar {group}" in capsys.readouterr().err
