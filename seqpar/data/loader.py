"""`BatchIterator`: this data-parallel rank's micro-batches, resumable mid-epoch.

Sample order: epoch e reads the packed sequences in a permutation seeded by (seed, e).
Global micro-batch k of the epoch is samples [k*G, (k+1)*G) of that order, G =
dp_size * micro_batch_size; DP rank r takes its contiguous part [r*m, (r+1)*m). So DP
ranks read disjoint sequences, and every sequence is read once per epoch (the last
len % G sequences of a permutation are skipped that epoch; the next permutation differs).
All SP ranks of one DP rank get the same micro-batch; `seqpar.model.shard_batch` then
cuts each sequence into this rank's SP slice.

`state_dict()` = {"epoch", "position", "seed"}, position counted in *samples* of the
epoch's permutation already consumed by the whole DP group: resuming yields exactly the
next micro-batch (and stays correct if dp_size * micro_batch_size is unchanged or a divisor
of the position).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SeqparError


class BatchIterator:
    """Infinite iterator of {"input_ids", "position_ids"}: LongTensor[micro_batch_size, seq_len]."""

    def __init__(self, dataset, *, dp_rank: int = 0, dp_size: int = 1, micro_batch_size: int = 1, seed: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise SeqparError(f"dp_rank must be in [0, dp_size={dp_size}); got {dp_rank}.")
        if micro_batch_size < 1:
            raise SeqparError(f"micro_batch_size must be >= 1; got {micro_batch_size}.")
        self.dataset, self.dp_rank, self.dp_size, self.micro = dataset, dp_rank, dp_size, micro_batch_size
        self.global_batch = dp_size * micro_batch_size
        if len(dataset) < self.global_batch:
            raise SeqparError(
                f"the packed dataset has {len(dataset)} sequences but one step reads dp_size x micro_batch_size "
                f"= {self.global_batch}; add data (data.sources, data.max_documents), or lower train.seq_len "
                "or train.micro_batch_size.")
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self._order = None

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch (the same on every DP rank)."""
        return len(self.dataset) // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """The global sample order of `epoch` (identical on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position + self.global_batch > len(self.dataset):  # epoch done: wrap around
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.permutation(self.epoch)
        start = self.position + self.dp_rank * self.micro
        indices = self._order[start:start + self.micro].tolist()
        self.position += self.global_batch
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(indices)
        items = [self.dataset[i] for i in indices]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off (the saved seed wins: same order as before)."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.dataset):
            raise SeqparError(f"data state {state} does not fit this dataset of {len(self.dataset)} sequences; "
                              "resume with the same data config and seq_len as the checkpoint.")
        self.seed, self.epoch, self.position, self._order = int(state["seed"]), epoch, position, None
