"""Dynamic NTK RoPE under sequence parallelism: scale by the GLOBAL sequence length.

transformers' dynamic rope (`dynamic_rope_update`) rescales the rotary frequencies from
`max(position_ids) + 1` of the tensor it is given. Under sequence parallelism each rank
holds only a shard, so every rank would pick a different base (and a rank whose shard
ends early would even reset to the original one). Here each rank first takes the
largest position over its SP group (one all-reduce of one integer per forward), feeds
exactly that to transformers' own update (so its growth cache and reset rules apply as
on one device), and then computes cos/sin for its local positions with transformers'
undecorated rotary forward. The result equals the single-device model on the unsharded
batch, forward and backward (`tests/test_model_parallel.py`). No rope formula is
re-implemented: both steps are transformers' code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.comm import all_reduce

DYNAMIC_TYPES = ("dynamic",)


def _rotary_modules(model):
    """Rotary embedding modules with a dynamic rope type (transformers' decorated forward)."""
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        forward = getattr(type(module), "forward", None)
        if isinstance(rope_type, str) and rope_type in DYNAMIC_TYPES and hasattr(forward, "__wrapped__"):
            yield module


def use_global_dynamic_rope(model, sp_group) -> int:
    """Make every dynamic-NTK rotary module of `model` scale by the SP group's largest
    position. Returns how many modules were changed (0: the model has no dynamic rope)."""
    count = 0
    for module in _rotary_modules(model):
        decorated = type(module).forward  # dynamic_rope_update(raw forward)
        raw = decorated.__wrapped__

        def forward(x, position_ids, *args, _module=module, _decorated=decorated, _raw=raw, **kwargs):
            longest = position_ids.max().reshape(1).to(torch.int64)
            if sp_group is not None and dist.get_world_size(sp_group) > 1:
                all_reduce(longest, sp_group, op=dist.ReduceOp.MAX)
            # transformers' update, on the global length (the cos/sin of this call are dropped)
            _decorated(_module, x, longest.reshape(1, 1).to(position_ids.device), *args, **kwargs)
            return _raw(_module, x, position_ids, *args, **kwargs)

        module.forward = forward
        count += 1
    return count
