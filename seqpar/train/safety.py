"""Fail fast and stop cleanly: ranks agree on the run before the first step, non-finite
losses stop the job with the step and rank named, and SIGTERM (what clusters send before
preemption) ends the run after the current step with a checkpoint.

Every check here is collective and decides the same way on every rank: each rank's view
is exchanged (one small all_gather) and every rank raises the same SeqparError, so no
rank is left waiting in a collective that its peers never reach.
"""

from __future__ import annotations

import hashlib
import os
import signal

import torch
import torch.distributed as dist

from ..errors import SeqparError

# Debug switch: repeat the batch-shape agreement every step (one tiny all_gather per step).
CHECK_EVERY_STEP_ENV = "SEQPAR_CHECK_EVERY_STEP"


def check_every_step() -> bool:
    return os.environ.get(CHECK_EVERY_STEP_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def run_fingerprint(cfg_hash: str, model, mesh) -> dict:
    shapes = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()])
                            .encode()).hexdigest()[:16]
    return {"config": cfg_hash, "world_size": dist.get_world_size(), "sp_size": mesh.sp_size,
            "ulysses_size": mesh.ulysses_size, "model_shapes": shapes,
            "torch": torch.__version__}


def config_fingerprint(dumped: dict, prefix: str = "") -> dict:
    """Flatten `config_io.dump_config(cfg)` to dotted keys (`train.lr`), so a mismatch
    names the setting that differs rather than a hash."""
    flat = {}
    for key, value in dumped.items():
        if isinstance(value, dict) and value:
            flat.update(config_fingerprint(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def batch_fingerprint(shard: dict) -> dict:
    """Shapes and dtypes of this rank's sharded micro batch."""
    return {f"batch.{k}": (tuple(v.shape), str(v.dtype)) for k, v in sorted(shard.items())
            if isinstance(v, torch.Tensor)}


def agree_on_run(fingerprint: dict, what: str = "the run", group=None) -> None:
    """Exchange each rank's view of the run once; any difference raises the same error on
    every rank (naming the ranks and the fields) instead of a hang or a silent mismatch."""
    views = [None] * dist.get_world_size(group)
    dist.all_gather_object(views, fingerprint, group=group)
    base = views[0]
    diffs = []
    for rank, view in enumerate(views[1:], start=1):
        for key in sorted(set(base) | set(view)):
            if view.get(key, "<missing>") != base.get(key, "<missing>"):
                diffs.append(f"rank {rank} has {key}={view.get(key, '<missing>')!r} but rank 0 has "
                             f"{base.get(key, '<missing>')!r}")
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise SeqparError(f"ranks disagree on {what}: {shown}. Start every rank with the same config, "
                          f"code and overrides.")


def raise_together(fn, *args, **kwargs):
    """Run `fn` on every rank; if it raises SeqparError on any rank, raise it on every rank
    (naming the ranks) so that no rank goes on alone into a collective. Returns fn's result."""
    try:
        result, message = fn(*args, **kwargs), None
    except SeqparError as e:
        result, message = None, str(e)
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    failed = [r for r, m in enumerate(messages) if m is not None]
    if failed:
        first = messages[failed[0]]
        same = all(messages[r] == first for r in failed)
        where = f"rank(s) {failed}" if len(failed) < len(messages) else "every rank"
        detail = first if same else " | ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise SeqparError(f"{detail} (on {where})")
    return result


RESUME_ADVICE = "resume from the last checkpoint with --resume"


def check_finite(value: torch.Tensor, step: int, group=None, name: str = "loss",
                 advice: str = RESUME_ADVICE) -> None:
    """Stop (on every rank) when any rank's `name` is NaN/inf, naming the step and ranks;
    `advice` says how to go on (the loop says so when no checkpoint exists yet)."""
    value = torch.as_tensor(value)
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=value.device)
    flags = [torch.zeros_like(bad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, bad, group=group)
    ranks = [r for r, f in enumerate(flags) if f.item()]
    if ranks:
        raise SeqparError(f"non-finite {name} at step {step} on rank(s) {ranks}; lower train.lr, enable "
                          f"train.grad_clip, or check the data; {advice}.")


class GracefulStop:
    """Turns SIGTERM/SIGINT into a flag that all ranks agree on at the end of a step."""

    def __init__(self):
        self.requested = False
        self.stopped = False  # set by the loop once it acted on the request
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
