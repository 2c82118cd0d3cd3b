"""Joining and leaving a torchrun process group, for `dflash train` and `dflash bench`.

Plain torch.distributed rather than accelerate's PartialState: that is a process-wide singleton
(the first device choice sticks for every later run in the process, as the tests start many) and
it changes the environment and, on CPU, the thread count. dflash needs only the rank, the world
size, this process's device and the group itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dflash.errors import DFlashError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False  # whether init_distributed joined a process group (close_distributed leaves it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str | None) -> tuple[Dist, torch.device]:
    """Under torchrun (RANK in the environment) join the process group, NCCL on this process's
    GPU or gloo on CPU; else one process on `device_flag` (default: CUDA if there is one)."""
    wanted = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise DFlashError(f"--device: no such device {wanted!r} (cpu, cuda, cuda:1 ...)") from None
    if "RANK" not in os.environ:
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d, torch.device(f"cuda:{d.local_rank}" if use_cuda else "cpu")


def close_distributed(d: Dist) -> None:
    """Leave the group once every rank is done (no rank tears it down while another still saves)."""
    if d.joined and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
