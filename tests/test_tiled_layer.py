"""The sequence-tiled decoder layer (`parallelize(..., tiled_layer=N)`) changes no number.

For Llama, Qwen2, Qwen3 and Mistral (tiny random models, float32) on 2 gloo ranks, the
tiled model's loss and SP-summed gradients equal the untiled parallelized model's, with
fused and transformers' RoPE, ring and Ulysses attention, gradient checkpointing and
offloaded activations, and attention in head groups (whole K/V heads, parts of one K/V
head's query heads, an o_proj bias added once); that every token-wise module really ran on
tiles of at most N tokens and the projections on one group's heads; that the recomputed
blocks wrote their input gradients over their output gradients (the memory they save);
and that other layer shapes and groups that do not fit get a clear error.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist

from seqpar import SeqparError
from seqpar.model import enable_checkpointing, parallelize, recomputed_layer, shard_batch
from seqpar.model.rope import restore_rope
from seqpar.parallel import init_mesh

from .distributed import run_distributed, sp_summed_grads
from .test_model_parallel import relative_error, tiny_model

TILE = 5  # does not divide the 16-token shards: the last tile is short
CASES = [  # family, parallelize kwargs, gradient checkpointing
    ("llama", {"attention": "ring", "fused_rope": True}, False),
    ("llama", {"attention": "ring", "fused_rope": False}, True),
    ("qwen2", {"attention": "ulysses", "fused_rope": True}, False),
    ("qwen3", {"attention": "ring", "fused_rope": True, "offload_activations": True}, True),
    ("mistral", {"attention": "ring", "fused_rope": False, "layout": "contiguous"}, False),
    # head groups: 4 groups of one query head over llama's single K/V head, with o_proj bias
    ("llama+bias", {"attention": "ring", "fused_rope": True, "head_groups": 4}, True),
    ("qwen3", {"attention": "ring", "fused_rope": False, "head_groups": 4,  # half a K/V head each
               "offload_activations": True}, False),
    ("qwen2", {"attention": "ulysses", "fused_rope": True, "head_groups": 2}, True),  # a K/V head each
]
TOKEN_WISE = ("input_layernorm", "post_attention_layernorm", "mlp")


def _loss_and_grads(model, input_ids, checkpointing, layout):
    if checkpointing:
        model.train()
        enable_checkpointing(model)
    mesh = model.seqpar_plan.mesh
    loss = model(**shard_batch({"input_ids": input_ids}, mesh, layout=layout)).loss
    loss.backward()
    return loss.item(), sp_summed_grads(model, mesh.sp_group)


def _model(family):
    if not family.endswith("+bias"):
        return tiny_model(family, yarn=family == "qwen2")
    model = tiny_model(family.removesuffix("+bias"), yarn=False)
    model.config.attention_bias = True  # q/k/v and o_proj biases
    torch.manual_seed(1)
    model = type(model)(model.config).float()
    assert model.get_decoder().layers[0].self_attn.o_proj.bias is not None
    return model


def _record_tile_lengths(model) -> tuple[list, list]:
    """Token counts every token-wise module ran on, and q_proj's output widths."""
    seen, widths = [], []
    decoder = model.get_decoder()
    modules = [getattr(layer, name) for layer in decoder.layers for name in TOKEN_WISE]
    modules += [layer.self_attn.q_proj for layer in decoder.layers]
    for m in modules:
        m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    for layer in decoder.layers:
        layer.self_attn.q_proj.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
    return seen, widths


@contextlib.contextmanager
def _record_gradient_reuse():
    """Whether each recomputed block (the final norm; in head groups every layer's MLP
    block) wrote its input gradient over its output gradient, as it should when nothing
    else holds that: the memory the blocks save depends on it."""
    reused, plain = [], recomputed_layer._over_dy

    def over_dy(x, dy, residual):
        into = plain(x, dy, residual)
        reused.append(into is dy)
        return into

    recomputed_layer._over_dy = over_dy
    try:
        yield reused
    finally:
        recomputed_layer._over_dy = plain


def tiled_layer_cases():
    failures = []
    world = dist.get_world_size()
    for family, kw, checkpointing in CASES:
        name = f"{family} {kw} ckpt={checkpointing}"
        restore_rope()
        reference = _model(family)
        input_ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(7))
        layout = kw.get("layout", "zigzag")
        plain_kw = {k: v for k, v in kw.items() if k != "head_groups"}
        base = parallelize(copy.deepcopy(reference), init_mesh(world), **plain_kw)
        want_loss, want_grads = _loss_and_grads(base, input_ids, checkpointing, layout)
        tiled = parallelize(copy.deepcopy(reference), init_mesh(world), tiled_layer=TILE, **kw)
        lengths, widths = _record_tile_lengths(tiled)
        with _record_gradient_reuse() as reused:
            loss, grads = _loss_and_grads(tiled, input_ids, checkpointing, layout)
        if not reused or not all(reused):
            failures.append(f"{name}: an input gradient was not written over its output gradient: {reused}")
        config = reference.config
        group_width = config.num_attention_heads // kw.get("head_groups", 1) * config.head_dim
        if set(widths) != {group_width}:
            failures.append(f"{name}: q_proj computed {sorted(set(widths))} features, not one group's {group_width}")
        if not getattr(tiled.get_decoder().norm.forward, "seqpar_tiled", False):
            failures.append(f"{name}: the final norm is not tiled")
        if not lengths or max(lengths) > TILE:
            failures.append(f"{name}: token-wise modules ran on {sorted(set(lengths))} tokens, not tiles")
        if abs(loss - want_loss) > 1e-6 * want_loss:
            failures.append(f"{name}: loss {loss} != untiled {want_loss}")
        worst = max(relative_error(a, b) for a, b in zip(grads, want_grads))
        if not worst < 1e-6:
            failures.append(f"{name}: grads differ from untiled by {worst:.2e}")
    return failures + _rejects_other_layer_shapes() + _rejects_groups_that_do_not_fit()


def _rejects_other_layer_shapes():
    model = tiny_model("llama", yarn=False)
    del model.get_decoder().layers[0].post_attention_layernorm
    try:
        parallelize(model, init_mesh(dist.get_world_size()), tiled_layer=8)
    except SeqparError as err:
        if "post_attention_layernorm" in str(err) and "tiled_mlp" in str(err):
            return []
    return ["a layer without post_attention_layernorm was tiled, or the error names no fix"]


def _cuda_head_groups_case():
    """One nccl rank on GPU 0: Llama (one K/V head, 4 groups) and Qwen3 (2 groups of a K/V
    head), float32 with checkpointing, tiled in head groups vs untiled, on the CUDA kernels
    the registry picks."""
    failures = []
    for family, groups in (("llama", 4), ("qwen3", 2)):
        reference = tiny_model(family, yarn=False).cuda()
        ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(3))
        results = []
        for kw in ({}, {"tiled_layer": TILE, "head_groups": groups}):
            model = parallelize(copy.deepcopy(reference), init_mesh(1), **kw)
            model.train()
            enable_checkpointing(model)
            batch = shard_batch({"input_ids": ids}, model.seqpar_plan.mesh)
            loss = model(**{k: v.cuda() for k, v in batch.items()}).loss
            loss.backward()
            results.append((loss.item(), [p.grad.detach().cpu() for p in model.parameters()]))
        (want, want_grads), (got, grads) = results
        worst = max(relative_error(a, b) for a, b in zip(grads, want_grads))
        if abs(got - want) > 1e-4 * want or not worst < 1e-3:
            failures.append(f"{family} in {groups} head groups on CUDA: loss {got} vs {want}, grads {worst:.1e}")
    return failures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_head_groups_on_cuda_equal_the_untiled_layer():
    (failures,) = run_distributed(_cuda_head_groups_case, 1, backend="nccl", timeout=600)
    assert not failures, "\n".join(failures)


def test_tiled_layer_equals_untiled_layer():
    failures = sorted({f for rank in run_distributed(tiled_layer_cases, 2, timeout=600) for f in rank})
    assert not failures, "\n".join(failures)


def _rejects_groups_that_do_not_fit():
    failures = []
    for kw, words in [({"tiled_layer": 8, "head_groups": 3}, ("3 head groups", "choose one of [1, 2, 4]")),
                      ({"head_groups": 2}, ("tiled_layer",))]:
        try:
            parallelize(tiny_model("qwen3", yarn=False), init_mesh(dist.get_world_size()), **kw)
            failures.append(f"{kw}: accepted")
        except SeqparError as err:
            if not all(w in str(err) for w in words):
                failures.append(f"{kw}: the error does not name the fix: {err}")
    return failures
