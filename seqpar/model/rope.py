"""Route a Hugging Face model's rotary embedding through the fused `seqpar.ops.apply_rope`.

transformers applies RoPE with the module-level function `apply_rotary_pos_emb` of each
modeling file (Llama, Qwen2, Qwen3, Mistral, ...). We swap that function for one that
calls the fused op: same numbers, one pass over q and k. Models whose rotary embedding
covers only part of head_dim, or that lack this function, keep their own. The patch is
per modeling module (so per process, for every model of that family); `restore_rope`
undoes it.
"""

from __future__ import annotations

import sys

from ..ops import apply_rope

_ORIGINALS: dict = {}


def _fused_apply_rotary_pos_emb(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if cos.shape[-1] != q.shape[-1]:  # partial rotary: leave it to the model
            return original(q, k, cos, sin, *args, **kwargs)
        q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    apply_rotary_pos_emb.seqpar_fused = True
    return apply_rotary_pos_emb


def use_fused_rope(model) -> bool:
    """Patch the modeling module of `model`'s attention layers; True if it was patched."""
    patched = False
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None or getattr(original, "seqpar_fused", False):
            patched = patched or original is not None
            continue
        _ORIGINALS[modeling.__name__] = original
        modeling.apply_rotary_pos_emb = _fused_apply_rotary_pos_emb(original)
        patched = True
    return patched


def restore_rope() -> None:
    """Undo `use_fused_rope` for every patched modeling module (e.g. to compare with it)."""
    for name, original in _ORIGINALS.items():
        modeling = sys.modules.get(name)
        if modeling is not None:
            modeling.apply_rotary_pos_emb = original
    _ORIGINALS.clear()
