"""The memory planner (`seqpar plan`, seqpar/plan/): its activation count against the
tensors autograd really saves, its arithmetic, its CLI, and one measured training run."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from seqpar.cli import main
from seqpar.errors import SeqparError
from seqpar.parallel.spawn import run_distributed
from seqpar.plan.cli import max_seq_len
from seqpar.units import parse_bytes, parse_tokens
from seqpar.plan.memory import DS_REDUCE_BUCKET, ModelShape, RunShape, estimate, saved_per_layer_token

TINY = "configs/models/tiny_llama.json"
SHAPE_8B = "configs/models/llama3_8b_shape.json"


def _config(layers):
    cfg = AutoConfig.from_pretrained(TINY)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = layers, 96, 320
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size = 6, 2, 16, 300
    return cfg


def _saved_bytes(model, inputs) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward (not weights)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def _per_layer_saved(dtype_name, seqpar, checkpointing, tiled_mlp, seq, tiled_layer=None):
    """Saved bytes per token of one decoder layer: a 2-layer minus a 1-layer model."""
    from seqpar.model import enable_checkpointing, parallelize, shard_batch
    from seqpar.parallel import init_mesh

    mesh = init_mesh(1)
    totals = []
    for layers in (1, 2):
        torch.manual_seed(0)
        cfg = _config(layers)
        if not seqpar:
            cfg._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype_name))
        if seqpar:
            parallelize(model, mesh, tiled_mlp=tiled_mlp, tiled_layer=tiled_layer)
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        ids = torch.randint(0, cfg.vocab_size, (1, seq))
        inputs = shard_batch({"input_ids": ids}, mesh) if seqpar else {"input_ids": ids, "labels": ids}
        totals.append(_saved_bytes(model, inputs))
    return (totals[1] - totals[0]) / seq


CASES = [(dtype, seqpar, ckpt, mlp, layer) for dtype in ("float32", "bfloat16")
         for seqpar, ckpt, mlp, layer in ((True, False, None, None), (True, False, 64, None), (True, True, None, None),
                                          (False, False, None, None), (True, False, None, 64))]


def test_saved_activations_per_layer_match_autograd():
    seq = 256
    measured = run_distributed(_per_layer_saved_all, 1, CASES, seq)[0]
    shape = ModelShape.from_config(_config(1))
    for (dtype, seqpar, ckpt, mlp, layer), got in zip(CASES, measured):
        b = 4 if dtype == "float32" else 2
        want = b * shape.hidden if ckpt else saved_per_layer_token(shape, b, tiled_mlp=bool(mlp),
                                                                   tiled_layer=bool(layer))
        assert got == want, (dtype, seqpar, ckpt, mlp, layer)


def _per_layer_saved_all(cases, seq):
    return [_per_layer_saved(dtype, seqpar, ckpt, mlp, seq, layer) for dtype, seqpar, ckpt, mlp, layer in cases]


def test_model_shape_counts_every_parameter():
    cfg = _config(3)
    shape = ModelShape.from_config(cfg)
    model = AutoModelForCausalLM.from_config(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (3, 96, 6, 2, 16)
    assert shape.largest_layer_params == max(sum(p.numel() for p in model.model.layers[0].parameters()),
                                             cfg.vocab_size * cfg.hidden_size)


def test_estimate_terms_follow_the_run():
    shape = ModelShape.from_config(AutoConfig.from_pretrained(SHAPE_8B))
    assert 8.0e9 < shape.params < 8.1e9
    base = RunShape(seq_len=262144, world=8, sp_size=8, zero=3, gradient_checkpointing=True, tiled_mlp=4096)
    est = estimate(shape, base)
    assert est.total == est.parameters + est.optimizer + est.gradients + est.activations \
        + est.transient + est.comm_buffers
    # ZeRO-3 partitions optimizer states (12 bytes/param: fp32 master + Adam) over all ranks.
    assert est.optimizer == 12 * shape.params // 8
    # More SP ranks, less activation memory per rank; ZeRO-3 less than ZeRO-1.
    totals = [estimate(shape, replace(base, sp_size=sp)).total for sp in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True)
    assert estimate(shape, replace(base, zero=1)).total > est.total
    # Without checkpointing / tiled MLP / tiled loss each run needs more.
    for change in ({"gradient_checkpointing": False}, {"tiled_mlp": None}, {"tiled_loss": False}):
        assert estimate(shape, replace(base, **change)).total > est.total, change
    # Offloads move states off the GPU and report them as host memory.
    off = estimate(shape, replace(base, offload_optimizer=True, offload_params=True))
    assert off.optimizer == 0 and off.cpu_offloaded > 0 and off.total < est.total


def test_max_seq_len_is_the_boundary():
    shape = ModelShape.from_config(AutoConfig.from_pretrained(SHAPE_8B))
    run = RunShape(seq_len=0, world=8, sp_size=8, zero=3, gradient_checkpointing=True, tiled_mlp=8192)
    capacity = parse_bytes("80GiB")
    n = max_seq_len(shape, run, capacity, 8192)
    assert n > 0 and n % 8192 == 0
    assert estimate(shape, replace(run, seq_len=n)).total <= capacity
    assert estimate(shape, replace(run, seq_len=n + 8192)).total > capacity


def test_plan_cli_prints_every_choice(capsys):
    assert main(["plan", "--model", SHAPE_8B, "--seq-len", "128k", "--gpus", "8", "--gpu-mem", "80GiB",
                 "--zero", "2,3"]) == 0
    out = capsys.readouterr().out
    assert "8.03B parameters" in out and "131072 tokens" in out
    for sp in (1, 2, 4, 8):
        assert f"| seqpar SP={sp} | 3 |" in out and f"| seqpar SP={sp} | 2 |" in out
    assert out.count("| transformers (DP, no SP) |") == 2


@pytest.mark.parametrize("args, message", [
    (["--gpu-mem", "80XB"], "cannot read memory size '80XB'"),
    (["--seq-len", "12q"], "cannot read token count '12q'"),
    (["--sp-size", "3"], "--sp-size 3 must divide --gpus 8"),
    (["--zero", "4"], "stages are 0, 1, 2, 3"),
    (["--model", "/nonexistent/config.json"], "cannot read a model config"),
    (["--seq-len", "0"], "token count '0' must be at least 2"),
    (["--gpu-mem", "0GiB"], "--gpu-mem must be more than 0 bytes"),
    (["--seq-len", "7"], "no SP size fits"),
])
def test_plan_cli_bad_input(args, message, capsys):
    argv = {"--model": SHAPE_8B, "--seq-len": "64k", "--gpus": "8"}
    for key, value in zip(args[::2], args[1::2]):
        argv[key] = value
    with pytest.raises(SystemExit) as exc:
        main(["plan"] + [x for kv in argv.items() for x in kv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_plan_names_the_sp_sizes_it_leaves_out(capsys):
    assert main(["plan", "--model", SHAPE_8B, "--seq-len", "20", "--gpus", "6", "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert "note: SP sizes 3, 6 are not shown: they divide --gpus but not half of --seq-len 20" in out
    assert "| seqpar SP=1 |" in out and "| seqpar SP=2 |" in out


def test_parsers():
    assert parse_bytes("80GiB") == 80 << 30 and parse_bytes("141GB") == 141 * 10 ** 9
    assert parse_bytes("1.5G") == 3 << 29
    assert parse_tokens("128k") == 131072 and parse_tokens("1m") == 1 << 20 and parse_tokens("4096") == 4096
    with pytest.raises(SeqparError):
        parse_tokens("-5")


def test_bench_memory_prediction_within_15_percent(tmp_path, capsys):
    """One real ZeRO-2 run on 2 gloo ranks: measured peak vs the planner (bench_small)."""
    path = tmp_path / "memory.json"
    assert main(["bench", "memory", "--model", "configs/models/bench_small.json", "--seq-len", "2048",
                 "--world-size", "2", "--zero", "2", "--variants", "seqpar", "--json", str(path)]) == 0
    assert "| seqpar | 2048 | 2 | 2 |" in capsys.readouterr().out
    (row,) = json.loads(path.read_text())["rows"]
    assert row["error"] is None and row["measured_peak_bytes"] > 100 << 20
    assert abs(row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1) < 0.15


@pytest.mark.extended  # about 3 minutes on 2 cores
def test_head_groups_lower_the_tiled_layer_peak_as_planned(tmp_path, capsys):
    """bench_layer on 2 CPU ranks (one K/V head, so 4 groups of one query head): the tiled
    layer in head groups peaks below the tiled layer, and both within 10% of the planner."""
    path = tmp_path / "memory.json"
    assert main(["bench", "memory", "--model", "configs/models/bench_layer.json", "--seq-len", "8192",
                 "--world-size", "2", "--zero", "2", "--tiled-mlp", "512", "--loss-chunk", "512",
                 "--variants", "+tiled-layer,+head-groups", "--head-groups", "4", "--json", str(path)]) == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["+head-groups"]["measured_peak_bytes"] < rows["+tiled-layer"]["measured_peak_bytes"]
    for row in rows.values():
        assert abs(row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1) < 0.10, row["variant"]


@pytest.mark.extended  # about 5 minutes on 2 cores
def test_head_groups_halve_the_peak_with_the_8b_head_structure(tmp_path, capsys):
    """bench_gqa (Llama-3-8B's 4:1 heads scaled down) on one CPU rank at 16K tokens: the
    tiled layer in 16 head groups peaks near half of `+tiled-mlp` (0.51x measured; 0.47x
    at 32K, README "Memory"), both within 10% of the planner."""
    path = tmp_path / "memory.json"
    assert main(["bench", "memory", "--model", "configs/models/bench_gqa.json", "--seq-len", "16384",
                 "--world-size", "1", "--zero", "2", "--tiled-mlp", "512", "--loss-chunk", "512",
                 "--variants", "+tiled-mlp,+head-groups", "--head-groups", "16", "--json", str(path)]) == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    ratio = rows["+head-groups"]["measured_peak_bytes"] / rows["+tiled-mlp"]["measured_peak_bytes"]
    assert ratio < 0.55, ratio
    for row in rows.values():
        assert abs(row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1) < 0.10, row["variant"]


def test_plan_head_groups_need_the_tiled_layer_and_whole_groups(capsys):
    for extra, words in [(["--head-groups", "8"], "--head-groups needs --tiled-layer"),
                         (["--tiled-layer", "8192", "--head-groups", "3"], "choose one of")]:
        with pytest.raises(SystemExit) as exc:
            main(["plan", "--model", SHAPE_8B, "--seq-len", "64k", "--gpus", "1", *extra])
        assert exc.value.code == 2 and words in capsys.readouterr().err
    assert main(["plan", "--model", SHAPE_8B, "--seq-len", "1m", "--gpus", "8", "--zero", "3", "--offload",
                 "--offload-activations", "--sp-size", "8", "--no-baseline", "--tiled-layer", "8192",
                 "--head-groups", "8"]) == 0
    assert "8 head groups" in capsys.readouterr().out


def test_bench_memory_refuses_head_groups_that_do_not_fit(capsys):
    with pytest.raises(SystemExit) as exc:  # before any rank starts
        main(["bench", "memory", "--model", "configs/models/bench_layer.json", "--seq-len", "1024",
              "--variants", "+head-groups", "--head-groups", "3"])
    assert exc.value.code == 2 and "choose one of [1, 2, 4]" in capsys.readouterr().err


def _until_oom_with_fake_oom(*args):
    """`_rank_until_oom` on a rank where every step longer than 1024 tokens runs out of memory."""
    import seqpar.bench.memory as memory
    real_steps = memory._steps

    def steps(engine, mesh, variant, config, scale, seq_len, *rest):
        if seq_len > 1024:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_steps(engine, mesh, variant, config, scale, seq_len, *rest)
    memory._steps = steps
    return memory._rank_until_oom(*args)


def test_bench_memory_until_oom_builds_once_and_stops_at_the_first_oom(monkeypatch, tmp_path, capsys):
    """--until-oom: lengths in ascending order in one process, a row per length up to the
    first that runs out of memory (simulated on this CPU rank), none after it."""
    import seqpar.bench.memory as memory
    monkeypatch.setattr(memory, "run_distributed",
                        lambda fn, *a, **k: run_distributed(_until_oom_with_fake_oom, *a, **k))
    rows = memory.run_memory_bench("configs/models/bench_small.json", [2048, 512, 1024, 4096], world_size=1,
                                   variant_names=["seqpar"], steps=1, until_oom=True, timeout=300,
                                   json_path=tmp_path / "m.json", gpu_mem=8 << 30)
    assert [(r["seq_len"], r["error"]) for r in rows] == [(512, None), (1024, None), (2048, "out of memory")]
    assert 0 < rows[0]["measured_peak_bytes"] < rows[1]["measured_peak_bytes"]
    assert rows[1]["phases"].keys() == {"step 1"}  # its own step, not the build
    out = capsys.readouterr().out
    assert "| seqpar | 2048 | 1 | 2 | out of memory |" in out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert len(saved["rows"]) == 3
    (limit,) = saved["limits"]
    assert (limit["longest_ran"], limit["out_of_memory_at"]) == (1024, 2048) and limit["planner_longest"] > 4096
    assert f"| seqpar | 8.0 | 1024 | 2048 | {limit['planner_longest']} |" in out


def test_bench_memory_until_oom_needs_one_gpu_rank(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "memory", "--until-oom", "--seq-len", "1024"])
    assert info.value.code == 2
    assert "--until-oom needs --device cuda --world-size 1" in capsys.readouterr().err


def test_train_memory_report_warns_with_fixes(monkeypatch):
    import seqpar.plan.check as check
    from seqpar.train.config import RunConfig
    from seqpar.train.model_loader import model_config

    cfg = RunConfig()
    cfg.model.config_file = SHAPE_8B
    cfg.model.dtype = "bfloat16"
    cfg.train.seq_len = 131072
    cfg.train.deepspeed_config = "configs/deepspeed/zero3.json"
    cfg.parallel.sp_size = 8
    config = model_config(cfg)
    monkeypatch.setattr(check, "rank_capacity", lambda device: 80 << 30)
    line, fits = check.memory_report(cfg, 8, config, "cuda")
    assert not fits and "predicted NOT to fit" in line
    assert "model.gradient_checkpointing=true" in line and "parallel.tiled_mlp=8192" in line
    assert "parallel.head_groups=8 (with parallel.tiled_layer" in line  # one per K/V head
    assert "seqpar plan --model configs/models/llama3_8b_shape.json --seq-len 131072 --gpus 8" in line
    cfg.model.gradient_checkpointing, cfg.parallel.tiled_mlp = True, 8192
    line, fits = check.memory_report(cfg, 8, config, "cuda")
    assert fits and line.startswith("[seqpar] memory plan: ~") and "warning" not in line


def test_tiled_layer_and_zero3_offload_terms():
    shape = ModelShape.from_config(AutoConfig.from_pretrained(SHAPE_8B))
    base = RunShape(seq_len=1 << 20, world=1, sp_size=1, zero=3, gradient_checkpointing=True, tiled_mlp=8192,
                    offload_optimizer=True, offload_params=True, offload_activations=True)
    alst, tiled = estimate(shape, base), estimate(shape, replace(base, tiled_layer=8192))
    # Only attention's full-length tensors and their gradients stay: 0.54x at 1M tokens.
    assert tiled.total < 0.6 * alst.total and tiled.activations == 0
    # ZeRO-3 with optimizer offload keeps only the reduce bucket of gradients on the GPU
    # (stage3.py: grad_partitions_flat_buffer on the host, in the model dtype by default).
    assert alst.gradients == 2 * DS_REDUCE_BUCKET
    on_gpu = estimate(shape, replace(base, offload_optimizer=False, offload_params=False))
    assert on_gpu.detail["gradients_full"] == 2 * DS_REDUCE_BUCKET + 2 * shape.params
    fp32 = estimate(shape, replace(base, offload_optimizer=False, offload_params=False, grad_accum_dtype="float32"))
    assert fp32.detail["gradients_full"] == 2 * DS_REDUCE_BUCKET + 4 * shape.params


def test_tiled_layer_counts_ring_accumulators_and_gqa_calls():
    """Measured on an H200: ring attention's backward keeps dq in float32 beside the
    kernels' bfloat16 dq/dk/dv (a ring of one rank runs one block of attention, without).
    On CUDA the fused ops run GQA as one call per query-head group offset: a 1/g slice of
    q, out, dout and dq per call, dK/dV summed in float32 (no K/V expanded to q's heads)."""
    shape = ModelShape.from_config(AutoConfig.from_pretrained(SHAPE_8B))
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    one = RunShape(seq_len=1 << 16, world=1, sp_size=1, zero=3, gradient_checkpointing=True, tiled_layer=8192,
                   device="cpu")
    assert estimate(shape, one).detail["act_attention_grads"] == (1 << 16) * 2 * (q + 2 * kv)
    short = replace(one, seq_len=1 << 16, world=8, sp_size=8, tiled_layer=1024)  # 8K tokens a rank: one pass
    assert estimate(shape, short).detail["act_attention_grads"] == (1 << 13) * (2 * (q + 2 * kv) + 4 * q)
    # 64K tokens a rank: 4 passes of 2 K/V heads (a pass's float32 dq: 256 MiB), each with
    # its own accumulators and contiguous copies of its heads.
    ring = replace(one, seq_len=1 << 19, world=8, sp_size=8)
    assert estimate(shape, ring).detail["act_attention_grads"] == (1 << 16) * (
        2 * (q + 2 * kv) + 4 * q // 4 + 2 * (4 * q + 4 * kv) // 4)
    gpu = replace(one, device="cuda")
    assert estimate(shape, gpu).detail["act_attention_grads"] == (1 << 16) * (2 * (q + 2 * kv) + 4 * 2 * kv + 8 * kv)


def test_layer_backward_in_phases():
    """A layer's backward: the MLP's part first (everything that layer saved, the
    gradients of its output and of the MLP input, the norm's float32 ones, the MLP's),
    then attention's, after the MLP's and the post-attention norm's saved tensors are
    freed. The final norm's and the loss's saved tensors are gone by the last layer's
    backward. (Measured: README "Memory", bench_layer on CPU ranks and the 1B shape on
    an H200, all within 10%.)"""
    shape = ModelShape.from_config(AutoConfig.from_pretrained("configs/models/bench_layer.json"))
    h, q, kv, b, t = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, 4, 8192
    run = RunShape(seq_len=2 * t, world=2, sp_size=2, zero=2, dtype="float32", gradient_checkpointing=True,
                   tiled_mlp=512, device="cpu")
    est = estimate(shape, run)
    assert est.peak_moment == "last layer backward"
    final_norm = (4 + 2 * b) * h
    assert est.activations == est.detail["act_saved"] - t * final_norm
    layer = saved_per_layer_token(shape, b, tiled_mlp=True)
    attention = b * t * (q + 2 * kv) + t * 4 * q + b * t * (h + q) - t * ((4 + 2 * b) * h + 4)  # + ring's fp32 dq
    assert est.detail["act_attention_phase"] == attention
    mlp = t * (4 * h + b * 2 * h) + b * 6 * shape.intermediate * 512  # float32: one norm upcast; one MLP tile's
    assert (est.detail["act_norm_grads"] + est.detail["act_mlp_grads"]) == mlp
    recompute = t * (layer - b * h)  # float32: the first norm's upcast is the checkpoint
    comm = t * (2 * 2 * kv * b + 2 * 2 * kv * 4)  # K/V blocks in flight, float32 dK/dV
    assert est.transient + est.comm_buffers == recompute + max(mlp, attention + comm)
    plain = estimate(shape, replace(run, gradient_checkpointing=False, tiled_mlp=None))
    assert plain.detail["act_attention_phase"] < 0  # the MLP's saved tensors outweigh it: the MLP part peaks
    assert plain.transient == plain.detail["act_norm_grads"] + plain.detail["act_mlp_grads"]
