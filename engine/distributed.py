"""Tensor-parallel process groups: one rank per device, torch.distributed for everything.

Two groups span the same ranks: the data group (NCCL on CUDA, gloo on the CPU) carries the
all-reduces of the row-parallel layers; a gloo control group carries rank 0's per-step
messages to the other ranks (pickled objects), so the same code drives workers on one node
(spawned by the engine) and on several nodes (launched by torchrun, initialised from
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @staticmethod
    def from_env() -> ParallelEnv | None:
        """The torchrun variables, or None when the process was not launched by torchrun."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return ParallelEnv(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", "29500")),
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPGroup:
    """This process's place in the tensor-parallel group (size 1: no process group at all)."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None):
        self.rank, self.size = rank, size
        self.device = device or torch.device("cpu")
        self._control: Any = None  # a ProcessGroup, or WORLD (gloo everywhere)

    @staticmethod
    def init(env: ParallelEnv, device: torch.device) -> TPGroup:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank, world_size=env.world_size
        )
        group = TPGroup(env.rank, env.world_size, device)
        group._control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        return group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place (the row-parallel layers' partial outputs)."""
        if self.size > 1:
            dist.all_reduce(x, group=None)
        return x

    def broadcast(self, obj: object = None) -> Any:  # whatever rank 0 sent
        """Rank 0's object, on every rank (the control group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, obj: object) -> list[Any] | None:
        """Every rank's object, on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self._control)

    def destroy(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
