"""Fail fast and stop cleanly: ranks agree on the run before the first step, non-finite
losses stop the job with the step and rank named, and SIGTERM (what clusters send before
preemption) ends the run after the current step with a checkpoint."""

from __future__ import annotations

import hashlib
import signal

import torch
import torch.distributed as dist

from ..errors import SeqparError


def run_fingerprint(cfg_hash: str, model, mesh) -> dict:
    shapes = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()])
                            .encode()).hexdigest()[:16]
    return {"config": cfg_hash, "world_size": dist.get_world_size(), "sp_size": mesh.sp_size,
            "ulysses_size": mesh.ulysses_size, "model_shapes": shapes,
            "torch": torch.__version__}


def agree_on_run(fingerprint: dict) -> None:
    """Exchange each rank's view of the run once; any difference raises the same error on
    every rank (naming the rank and the field) instead of a hang or a silent mismatch."""
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, fingerprint)
    for rank, view in enumerate(views):
        for key, value in view.items():
            if value != views[0][key]:
                raise SeqparError(f"ranks disagree on the run: rank {rank} has {key}={value!r} but rank 0 has "
                                  f"{views[0][key]!r}. Start every rank with the same config, code and "
                                  f"overrides.")


def check_finite(loss: torch.Tensor, step: int, group=None) -> None:
    """Stop (on every rank) when any rank's loss is NaN/inf, naming the step and ranks."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    flags = [torch.zeros_like(bad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, bad, group=group)
    ranks = [r for r, f in enumerate(flags) if f.item()]
    if ranks:
        raise SeqparError(f"non-finite loss at step {step} on rank(s) {ranks}; lower train.lr, enable "
                          f"train.grad_clip, or check the data; resume from the last checkpoint with --resume.")


class GracefulStop:
    """Turns SIGTERM/SIGINT into a flag that all ranks agree on at the end of a step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
