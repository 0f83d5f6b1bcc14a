"""The accumulation dtype every seqpar kernel and algorithm uses."""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (the exact oracle path), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32
