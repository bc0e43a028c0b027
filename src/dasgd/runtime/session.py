"""The torch.distributed side of a run: process groups, a shared time origin, end-of-run collectives.

Training itself uses only point-to-point messages (no barrier). Collectives happen twice, outside training:
once at start (agree on the time origin) and once at the end, after every worker drained (gather results).
They run on a separate Gloo group so that they never interleave with the transport's threads on the
point-to-point group (docs/design.md, Transport).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistributedSession", "in_torchrun"]

# Long on purpose: a Gloo send that waits longer than the group timeout closes the pair for good, and a slow
# peer is not a dead one. Dead peers are detected by closed connections instead.
_PG_TIMEOUT = timedelta(hours=6)


def in_torchrun() -> bool:
    """True when this process was started by torchrun (or by dasgd's launcher, which sets the same env)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class DistributedSession:
    """Joins (or reuses) the default process group and adds a group for collectives.

    Args:
        backend: "gloo" for CPU tensors, "nccl" for CUDA tensors (point-to-point group).
    """

    def __init__(self, backend: str = "gloo") -> None:
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            if not in_torchrun():
                raise RuntimeError(
                    "no torch.distributed environment: start this under torchrun (or `dasgd train`), "
                    "or call torch.distributed.init_process_group() first"
                )
            dist.init_process_group(backend=backend, timeout=_PG_TIMEOUT)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.p2p_group = None  # the default group carries the transport's traffic
        self.collective_group = dist.new_group(backend="gloo", timeout=_PG_TIMEOUT)

    def shared_origin(self, local_time: float) -> float:
        """Rank 0's value of ``local_time``, on every rank (a Unix timestamp: the run's time origin)."""
        t = torch.tensor([local_time], dtype=torch.float64)
        dist.broadcast(t, src=0, group=self.collective_group)
        return float(t.item())

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        """Gather every rank's ``data`` at rank 0 (None elsewhere). Raw bytes: nothing is pickled."""
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.collective_group)
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.rank == 0:
            bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.gather(buf, gather_list=bufs, dst=0, group=self.collective_group)
            return [bytes(b[: int(n.item())].numpy()) for b, n in zip(bufs, sizes)]
        dist.gather(buf, dst=0, group=self.collective_group)
        return None

    def barrier(self) -> None:
        """A barrier on the collective group (only ever used outside training)."""
        dist.barrier(group=self.collective_group)

    def close(self) -> None:
        """Leave the process group if this session created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
