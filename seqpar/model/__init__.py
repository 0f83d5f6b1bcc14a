"""Hugging Face integration: attention hook, fused RoPE, sharded batches and loss."""

from .batch import shard_batch
from .loss import sharded_cross_entropy
from .parallelize import enable_checkpointing, hidden_states, parallelize

__all__ = ["parallelize", "enable_checkpointing", "hidden_states", "shard_batch", "sharded_cross_entropy"]
