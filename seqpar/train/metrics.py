"""Per-step metrics: throughput, FLOPs/MFU (GPU), peak memory; JSONL + console + TensorBoard."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def training_flops_per_token(config, seq_len: int) -> float:
    """6 x parameters (matmuls, fwd+bwd) + causal attention's quadratic term.

    Attention scores and the weighted sum cost 2 x 2 x seq x head_dim x heads FLOPs per
    token per layer forward; causal halves it; backward doubles it twice (x3 total).
    """
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    attn_proj = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * inter
    params = layers * (attn_proj + mlp) + 2 * config.vocab_size * hidden
    attention = layers * 2 * seq_len * head_dim * heads  # causal fwd: 4*s*d*h / 2
    return 6 * params + 3 * attention


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:  # CPU: the process high-water mark
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def drop_records_after(path: Path, step: int) -> None:
    """A run resumed at `step` logs steps step+1.. again: drop the records of those steps
    that the interrupted run logged after its last checkpoint, so every step appears once.
    The file as it was is kept beside it (metrics.jsonl.before-step-N)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut by a crash
            pass
    if len(keep) == len(lines):
        return
    os.replace(path, path.with_name(f"{path.name}.before-step-{step}"))
    path.write_text("".join(line + "\n" for line in keep))


class MetricsLogger:
    """Rank 0 writes metrics.jsonl always, TensorBoard when installed, and a line per step."""

    def __init__(self, log_dir: str, total_steps: int, enabled: bool, tensorboard: bool = True,
                 start_step: int = 0):
        self.enabled = enabled
        self.total = total_steps
        self.start = time.time()
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(log_dir) / "metrics.jsonl"
        drop_records_after(path, start_step)
        self.jsonl = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # deferred: optional tensorboard
                self.tb = SummaryWriter(log_dir)
            except Exception:  # tensorboard not installed: JSONL is enough
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        print(self.format(step, metrics), file=sys.stdout, flush=True)

    def format(self, step: int, m: dict) -> str:
        elapsed = time.time() - self.start
        parts = [f"step {step}/{self.total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
                 f"grad_norm {m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "grad_norm -",
                 f"tok/s {m['tokens_per_s']:.0f}"]
        if m.get("tflops") is not None:
            parts.append(f"TFLOP/s {m['tflops']:.1f}")
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        parts.append(f"mem {m['peak_mem_gib']:.2f}GiB")
        parts.append(f"[{elapsed:.0f}s]")
        return " | ".join(parts)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
