"""Export the trained model as a Hugging Face directory that `from_pretrained` loads,
with the extended RoPE config; ZeRO-3 weights are gathered first. Written atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch.distributed as dist


def export_hf(model, out_dir: str, tokenizer=None, zero3: bool = False) -> Path | None:
    """Collective under ZeRO-3 (every rank gathers); rank 0 writes. Returns the directory."""
    import deepspeed  # deferred: deepspeed (heavy), only when exporting

    out = Path(out_dir)
    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    with gather:
        if dist.get_rank() == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        config = model.config
        impl = config._attn_implementation
        config._attn_implementation = "sdpa"  # the exported model runs without seqpar
        try:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        finally:
            config._attn_implementation = impl
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return out
