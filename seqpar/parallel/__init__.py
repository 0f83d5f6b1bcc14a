"""Process groups, sequence layouts and the exact sequence-parallel attentions."""

from .comm import CommCounter, count_comm
from .hybrid import hybrid_attention
from .layout import LAYOUTS, check_layout, shard, shard_chunks, shard_positions, unshard
from .mesh import DeepSpeedMPU, SeqParallelMesh, check_mesh_sizes, init_mesh
from .ring import ring_attention
from .ulysses import ulysses_attention

# The sequence-parallel attention algorithms, named once: config validation, CLIs and bench import it.
ALGORITHMS = ("ring", "ulysses", "hybrid")

__all__ = [
    "ALGORITHMS", "LAYOUTS", "CommCounter", "DeepSpeedMPU", "SeqParallelMesh", "check_layout", "check_mesh_sizes",
    "count_comm", "hybrid_attention", "init_mesh", "ring_attention", "shard", "shard_chunks",
    "shard_positions", "ulysses_attention", "unshard",
]
