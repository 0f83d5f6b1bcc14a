"""Process groups: data parallel (DP) x sequence parallel (SP), SP = ring x Ulysses.

Ranks are laid out as a DeviceMesh of shape (dp, ring, ulysses), Ulysses innermost so
its all-to-alls stay between neighbouring ranks (inside a node on a cluster). The
sequence shard index of a rank is its SP rank = ring_rank * ulysses_size + ulysses_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import SeqparError
from ..runtime import init_distributed


def check_mesh_sizes(world_size: int, sp_size: int, ulysses_size: int = 1) -> None:
    if sp_size < 1 or ulysses_size < 1:
        raise SeqparError(f"sp_size ({sp_size}) and ulysses_size ({ulysses_size}) must be >= 1.")
    if world_size % sp_size != 0:
        raise SeqparError(
            f"world size {world_size} is not divisible by sp_size {sp_size}; launch a multiple "
            f"of {sp_size} processes or choose an sp_size that divides {world_size}.")
    if sp_size % ulysses_size != 0:
        raise SeqparError(
            f"sp_size {sp_size} is not divisible by ulysses_size {ulysses_size}; the hybrid "
            f"splits SP into ulysses_size x ring_size, so pick a divisor of {sp_size}.")


def _ensure_initialized() -> None:
    """Join the job described by the launcher's env vars (torchrun/deepspeed) if needed."""
    init_distributed(deepspeed=False)


@dataclass
class SeqParallelMesh:
    device_mesh: DeviceMesh
    dp_size: int
    sp_size: int
    ring_size: int
    ulysses_size: int
    dp_group: dist.ProcessGroup
    sp_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup

    @property
    def sp_rank(self) -> int:
        return dist.get_rank(self.sp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def ring_rank(self) -> int:
        return dist.get_rank(self.ring_group)

    @property
    def ulysses_rank(self) -> int:
        return dist.get_rank(self.ulysses_group)

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


def init_mesh(sp_size: int, ulysses_size: int = 1) -> SeqParallelMesh:
    """Build DP x SP (SP = ring x Ulysses) groups over all ranks of the default group."""
    _ensure_initialized()
    world = dist.get_world_size()
    check_mesh_sizes(world, sp_size, ulysses_size)
    ring_size = sp_size // ulysses_size
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // sp_size, ring_size, ulysses_size),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    # The SP group (ring x Ulysses) is made with new_subgroups_by_enumeration rather than
    # DeviceMesh._flatten: a flattened gloo group aborts the process at exit (torch 2.13).
    sp_group, _ = dist.new_subgroups_by_enumeration(
        [row.flatten().tolist() for row in mesh.mesh.reshape(-1, sp_size)])
    return SeqParallelMesh(
        device_mesh=mesh, dp_size=world // sp_size, sp_size=sp_size, ring_size=ring_size,
        ulysses_size=ulysses_size, dp_group=mesh.get_group("dp"), sp_group=sp_group,
        ring_group=mesh.get_group("ring"), ulysses_group=mesh.get_group("ulysses"))


class DeepSpeedMPU:
    """The `mpu` object `deepspeed.initialize(mpu=...)` expects for sequence parallelism.

    It mirrors DeepSpeed's own `deepspeed.runtime.sequence_parallel.parallel_state_sp`
    (including `initialize_sequence_parallel`, whose presence tells ZeRO there is no
    tensor parallelism): DeepSpeed then partitions ZeRO state and averages gradients over
    the sequence-data-parallel group (all DP x SP ranks) and scales by the SP size.

    Deliberately NO `get_data_parallel_group`: DeepSpeed would partition ZeRO-3
    parameters over that group while reducing gradients over all DP x SP ranks, which
    silently corrupts ZeRO-3 gradients under SP (tests/test_train_equivalence.py).
    """

    def __init__(self, mesh: SeqParallelMesh):
        self._mesh = mesh

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        if sequence_parallel_size != self._mesh.sp_size:
            raise SeqparError(
                f"DeepSpeed asked for sequence_parallel_size={sequence_parallel_size} but the "
                f"seqpar mesh has sp_size={self._mesh.sp_size}; make them equal.")

    def get_sequence_parallel_group(self):
        return self._mesh.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self._mesh.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self._mesh.sp_rank

    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    # No tensor parallelism; DeepSpeed's checkpoint metadata asks for its degree.
    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_rank(self) -> int:
        return 0
