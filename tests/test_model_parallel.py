"""Hugging Face models under sequence parallelism: loss and gradients equal SP=1.

Tiny Llama (GQA 4:1), Qwen2 (qkv bias) and Qwen3 (q/k norm) models are built from
configs with random weights, identically on every rank. The parallelized copy runs on
this rank's shard; its loss must equal the single-process loss of the unsharded batch
on every rank, and the SP-summed gradient of every parameter the single-process
gradient (float32, relative error < 1e-5).
"""

from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch
import torch.distributed as dist
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from seqpar import SeqparError
from seqpar.model import enable_checkpointing, parallelize, shard_batch
from seqpar.model.rope import restore_rope
from seqpar.parallel import init_mesh

from .distributed import run_distributed, sp_summed_grads

TOL = 1e-5
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
# Dynamic NTK from 8 positions: every test sequence (>= 16 tokens) is rescaled, while the
# first contiguous shard alone (< 8 positions at SP 4) would not be.
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}


def tiny_model(family: str, yarn, seed: int = 0):
    """yarn: False (plain rope), True (YaRN) or "dynamic" (dynamic NTK from 8 positions)."""
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, head_dim=16, max_position_embeddings=64,
                  attention_dropout=0.0, tie_word_embeddings=False)
    if yarn == "dynamic":
        common.update(rope_parameters=dict(DYNAMIC), max_position_embeddings=8)
    elif yarn:
        common["rope_parameters"] = dict(YARN)
    if family == "llama":
        config, cls = LlamaConfig(num_key_value_heads=1, **common), LlamaForCausalLM
    elif family == "qwen2":
        config, cls = Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **common), Qwen2ForCausalLM
    elif family == "mistral":
        config, cls = MistralConfig(num_key_value_heads=2, sliding_window=None, **common), MistralForCausalLM
    else:
        config, cls = Qwen3Config(num_key_value_heads=2, use_sliding_window=False, **common), Qwen3ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config).float()


def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_model(family, yarn, algorithm, layout, ulysses_size, seq_len, fused_rope=False, tiled_loss=True):
    """Returns failure strings for one model/parallel setup on this rank."""
    name = f"{family} yarn={yarn} {algorithm} {layout} U={ulysses_size} fused_rope={fused_rope}"
    world = dist.get_world_size()
    restore_rope()  # the reference runs transformers' own rotary code
    reference = tiny_model(family, yarn)
    fresh = copy.deepcopy(reference)  # before the reference runs: dynamic rope caches its longest length
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    input_ids = torch.randint(0, reference.config.vocab_size, (2, seq_len), generator=gen)
    ref_loss = reference(input_ids=input_ids, labels=input_ids).loss
    ref_loss.backward()

    model = parallelize(fresh, init_mesh(world, ulysses_size), attention=algorithm,
                        layout=layout, fused_rope=fused_rope, tiled_loss=tiled_loss)
    model.zero_grad()
    mesh = model.seqpar_plan.mesh
    shard = shard_batch({"input_ids": input_ids}, mesh, layout=layout)
    loss = model(**shard).loss
    loss.backward()

    failures = []
    if abs(loss.item() - ref_loss.item()) > TOL * abs(ref_loss.item()):
        failures.append(f"{name}: loss {loss.item():.8f} != single-process {ref_loss.item():.8f}")
    for (pname, _), grad, ref_p in zip(model.named_parameters(), sp_summed_grads(model, mesh.sp_group),
                                       reference.parameters()):
        err = relative_error(grad, ref_p.grad)
        if not err < TOL:
            failures.append(f"{name}: grad of {pname} relative error {err:.2e}")
    return failures


def model_cases(world: int):
    families = ("llama", "qwen2", "qwen3")
    if world == 2:
        algos = [("ring", "zigzag", 1), ("ulysses", "zigzag", 1), ("ring", "contiguous", 1)]
    elif world == 3:
        algos = [("ring", "contiguous", 1), ("ring", "stripe", 1), ("ring", "zigzag", 1)]
    else:
        algos = [("ring", "zigzag", 1), ("ulysses", "contiguous", 1), ("hybrid", "zigzag", 2)]
    cases = []
    for (family, yarn), algo in zip(itertools.product(families, (False, True)), itertools.cycle(algos)):
        cases.append((family, yarn, *algo))
    # Every algorithm on every family at least once, YaRN on the hybrid.
    cases += [(f, True, *a) for f, a in zip(families, algos[::-1])]
    # Dynamic NTK scales by the global length: contiguous (rank 0's shard alone would not
    # be rescaled) and zigzag, at every world size.
    cases += [("llama", "dynamic", "ring", "contiguous", 1), ("qwen2", "dynamic", "ring", "zigzag", 1)]
    return cases


def run_model_cases(cases, seq_len):
    failures = []
    for i, (family, yarn, algorithm, layout, ulysses) in enumerate(cases):
        # Alternate the fused RoPE op with transformers' own rotary code.
        failures += check_model(family, yarn, algorithm, layout, ulysses, seq_len, fused_rope=i % 2 == 0)
    return failures


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sp_loss_and_grads_equal_single_process(world):
    cases = model_cases(world)
    results = run_distributed(run_model_cases, world, cases, 2 * world * 4, timeout=900)
    failures = sorted({f for rank in results for f in rank})
    assert not failures, "\n".join(failures)


def packed_documents_equal_separate_runs(algorithm, layout, ulysses_size):
    """A packed batch of documents gives the loss of running each document alone."""
    reference = tiny_model("llama", yarn=True)
    lengths = [5, 9, 3, 7]  # boundaries inside and across shards of 24 tokens
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 97, (1, n), generator=gen) for n in lengths]
    total, count = 0.0, 0
    for doc in docs:
        total += reference(input_ids=doc, labels=doc).loss.item() * (doc.shape[1] - 1)
        count += doc.shape[1] - 1
    expected = total / count

    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    mesh = init_mesh(dist.get_world_size(), ulysses_size)
    model = parallelize(copy.deepcopy(reference), mesh, attention=algorithm, layout=layout, fused_rope=False)
    shard = shard_batch({"input_ids": packed, "position_ids": position_ids}, mesh, layout=layout)
    return model(**shard).loss.item(), expected


@pytest.mark.parametrize("algorithm,layout,ulysses,world", [
    ("ring", "zigzag", 1, 2), ("ulysses", "zigzag", 1, 2), ("hybrid", "zigzag", 2, 4)])
def test_packed_documents_equal_separate_runs(algorithm, layout, ulysses, world):
    for loss, expected in run_distributed(packed_documents_equal_separate_runs, world, algorithm, layout,
                                          ulysses, timeout=300):
        assert abs(loss - expected) < 1e-5 * expected, (loss, expected)


def bad_model_setups():
    mesh = init_mesh(2)
    errors = {}
    model = tiny_model("llama", False)
    for name, call in {
        "algorithm": lambda: parallelize(copy.deepcopy(model), mesh, attention="tree"),
        "layout": lambda: parallelize(copy.deepcopy(model), mesh, layout="spiral"),
        "seq len": lambda: shard_batch({"input_ids": torch.zeros(1, 10, dtype=torch.long)}, mesh),
        "no plan inputs": lambda: parallelize(copy.deepcopy(model), mesh, fused_rope=False)(input_ids=torch.zeros(1, 8, dtype=torch.long)),
    }.items():
        try:
            call()
            errors[name] = None
        except SeqparError as err:
            errors[name] = str(err)
    return errors


def test_bad_setups_raise_clear_errors():
    errors = run_distributed(bad_model_setups, 2, timeout=120)[0]
    assert "choose one of ring" in errors["algorithm"]
    assert "choose one of contiguous" in errors["layout"]
    assert "multiple of 4" in errors["seq len"]
    assert "shard_batch" in errors["no plan inputs"]


def checkpointing_and_bf16():
    """Gradient checkpointing gives the same loss and grads; bf16 runs and stays close."""
    failures = check_model("mistral", False, "ring", "zigzag", 1, 16, fused_rope=True)
    world = dist.get_world_size()
    for dtype, checkpointing, tol in ((torch.float32, True, 1e-5), (torch.bfloat16, False, 3e-2)):
        restore_rope()
        reference = tiny_model("llama", yarn=True)
        input_ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
        ref_loss = reference(input_ids=input_ids, labels=input_ids).loss
        ref_loss.backward()
        model = copy.deepcopy(reference).to(dtype)
        model.zero_grad()
        model = parallelize(model, init_mesh(world), attention="ring", layout="zigzag")
        if checkpointing:
            model.train()
            enable_checkpointing(model)
        mesh = model.seqpar_plan.mesh
        loss = model(**shard_batch({"input_ids": input_ids}, mesh)).loss
        loss.backward()
        if abs(loss.item() - ref_loss.item()) > tol * ref_loss.item():
            failures.append(f"{dtype} checkpointing={checkpointing}: loss {loss.item()} vs {ref_loss.item()}")
        grads = sp_summed_grads(model, mesh.sp_group, torch.float32)
        for (name, _), grad, ref_p in zip(model.named_parameters(), grads, reference.parameters()):
            err = relative_error(grad, ref_p.grad)
            if not err < tol:
                failures.append(f"{dtype} checkpointing={checkpointing}: grad {name} relative error {err:.2e}")
    return failures


def test_mistral_gradient_checkpointing_and_bf16():
    failures = sorted({f for rank in run_distributed(checkpointing_and_bf16, 2, timeout=300) for f in rank})
    assert not failures, "\n".join(failures)


def tiled_mlp_and_offload():
    """Tiled MLP (recomputed per tile) and CPU-offloaded saved activations change no number."""
    restore_rope()
    world = dist.get_world_size()
    reference = tiny_model("qwen3", yarn=False)
    input_ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(4))
    results = []
    for kw in ({}, {"tiled_mlp": 5}, {"offload_activations": True, "tiled_mlp": 3}):
        model = parallelize(copy.deepcopy(reference), init_mesh(world), attention="ring", layout="zigzag", **kw)
        tiled = [getattr(layer.mlp.forward, "seqpar_tiled", False) for layer in model.get_decoder().layers]
        assert all(tiled) == bool(kw.get("tiled_mlp")), tiled
        mesh = model.seqpar_plan.mesh
        loss = model(**shard_batch({"input_ids": input_ids}, mesh)).loss
        loss.backward()
        results.append((loss.item(), sp_summed_grads(model, mesh.sp_group)))
    failures = []
    base_loss, base_grads = results[0]
    for (loss, grads), kw in zip(results[1:], ("tiled_mlp", "offload+tiled")):
        if abs(loss - base_loss) > 1e-6 * base_loss:
            failures.append(f"{kw}: loss {loss} != {base_loss}")
        worst = max(relative_error(a, b) for a, b in zip(grads, base_grads))
        if not worst < 1e-6:
            failures.append(f"{kw}: grads differ by {worst:.2e}")
    return failures


def test_tiled_mlp_and_activation_offload_are_exact():
    failures = sorted({f for rank in run_distributed(tiled_mlp_and_offload, 2, timeout=300) for f in rank})
    assert not failures, "\n".join(failures)
