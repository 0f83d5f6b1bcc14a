"""`BatchIterator`: this data-parallel rank's micro-batches, resumable mid-epoch.

Sample order: epoch e reads the packed sequences in a permutation seeded by (seed, e).
Global micro-batch k of the epoch is samples [k*G, (k+1)*G) of that order, G =
dp_size * micro_batch_size; DP rank r takes its contiguous part [r*m, (r+1)*m). So DP
ranks read disjoint sequences, and every sequence is read once per epoch. An optimizer
step reads `accumulation` micro-batches, i.e. the next B = G * accumulation samples of the
order; an epoch ends only between steps, when fewer than B samples are left (those are
skipped that epoch; the next permutation differs). So which samples a step reads depends
only on B and micro_batch_size, not on how B splits into DP ranks and accumulation: a run
resumed with another DP size and the same B reads exactly the samples an uninterrupted
run would (seqpar.train.elastic).
All SP ranks of one DP rank get the same micro-batch; `seqpar.model.shard_batch` then
cuts each sequence into this rank's SP slice.

`state_dict()` = {"epoch", "position", "seed"}, position counted in *samples* of the
epoch's permutation already consumed by the whole DP group: resuming between steps
yields exactly the next step's samples, for any DP size with the same B.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SeqparError


class BatchIterator:
    """Infinite iterator of {"input_ids", "position_ids"}: LongTensor[micro_batch_size, seq_len]."""

    def __init__(self, dataset, *, dp_rank: int = 0, dp_size: int = 1, micro_batch_size: int = 1, seed: int = 0,
                 accumulation: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise SeqparError(f"dp_rank must be in [0, dp_size={dp_size}); got {dp_rank}.")
        if micro_batch_size < 1:
            raise SeqparError(f"micro_batch_size must be >= 1; got {micro_batch_size}.")
        self.dataset, self.dp_rank, self.dp_size, self.micro = dataset, dp_rank, dp_size, micro_batch_size
        if accumulation < 1:
            raise SeqparError(f"accumulation (gradient_accumulation_steps) must be >= 1; got {accumulation}.")
        self.global_batch = dp_size * micro_batch_size
        self.accumulation = accumulation
        self.step_samples = self.global_batch * accumulation
        if len(dataset) < self.step_samples:
            raise SeqparError(
                f"the packed dataset has {len(dataset)} sequences but one step reads dp_size x micro_batch_size "
                f"x gradient_accumulation_steps = {self.step_samples}; add data (data.sources, "
                "data.max_documents), or lower train.seq_len, train.micro_batch_size or "
                "train.gradient_accumulation_steps.")
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self._order = None
        self._micro = 0  # micro-batches of the current step already read

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch (the same on every DP rank)."""
        return len(self.dataset) // self.step_samples * self.accumulation

    def permutation(self, epoch: int) -> np.ndarray:
        """The global sample order of `epoch` (identical on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._micro == 0 and self.position + self.step_samples > len(self.dataset):  # epoch done
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.permutation(self.epoch)
        start = self.position + self.dp_rank * self.micro
        indices = self._order[start:start + self.micro].tolist()
        self.position += self.global_batch
        self._micro = (self._micro + 1) % self.accumulation
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
        self._micro = 0  # checkpoints are taken between steps
