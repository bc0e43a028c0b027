"""The torch.distributed side of a run: process groups, a shared time origin, end-of-run collectives.

Training itself uses only point-to-point messages (no barrier). Collectives happen twice, outside training:
once at start (agree on the time origin) and once at the end, after every worker drained (gather results).
They run on a separate Gloo group so that they never interleave with the transport's threads on the
point-to-point group (docs/design.md, Transport).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dasgd.errors import DasgdError

__all__ = ["DistributedSession", "StartupTimeout", "in_torchrun"]

# Long on purpose: a Gloo send that waits longer than the group timeout closes the pair for good, and a slow
# peer is not a dead one. Dead peers are detected by closed connections instead.
_PG_TIMEOUT = timedelta(hours=6)


class StartupTimeout(DasgdError, RuntimeError):
    """Some workers did not reach a start-up stage in time (they died, or never started): named in the message."""


def in_torchrun() -> bool:
    """True when this process was started by torchrun (or by dasgd's launcher, which sets the same env)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class DistributedSession:
    """Joins (or reuses) the default process group and adds a group for collectives.

    Start-up is bounded: under dasgd's launcher or torchrun (a store that exists before any rank joins), every
    rank first checks in on the store and waits at most ``startup_timeout`` seconds for the others, so a
    worker that died before joining makes the others fail with its rank named, instead of waiting in
    ``init_process_group`` for the process-group timeout (hours). :meth:`check_in` bounds later stages the
    same way (e.g. "every worker has loaded its data").

    Args:
        backend: "gloo" for CPU tensors, "nccl" for CUDA tensors (point-to-point group).
        startup_timeout: seconds to wait for every rank at each start-up stage.
    """

    def __init__(self, backend: str = "gloo", startup_timeout: float = 300.0) -> None:
        self.owns_group = not dist.is_initialized()
        self.startup_timeout = startup_timeout
        self._store: dist.Store | None = None
        if self.owns_group:
            if not in_torchrun():
                raise RuntimeError(
                    "no torch.distributed environment: start this under torchrun (or `dasgd train`), "
                    "or call torch.distributed.init_process_group() first"
                )
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # The store is served by the launcher (or torchrun's agent), not by a rank: it is there before
                # anyone joins, so ranks can meet on it with a deadline of our own.
                self._store = dist.TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    is_master=False,
                    timeout=timedelta(seconds=max(1.0, startup_timeout)),
                )
                self._check_in("joined", int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
            dist.init_process_group(backend=backend, timeout=_PG_TIMEOUT)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.p2p_group = None  # the default group carries the transport's traffic
        self.collective_group = dist.new_group(backend="gloo", timeout=_PG_TIMEOUT)

    def check_in(self, stage: str) -> None:
        """Wait, at most ``startup_timeout`` seconds, until every rank has reached ``stage``; raise
        :class:`StartupTimeout` naming the ranks that did not. A no-op without a launcher's store."""
        if self._store is not None:
            self._check_in(stage, self.rank, self.world_size)

    def _check_in(self, stage: str, rank: int, world_size: int) -> None:
        assert self._store is not None
        # One namespace per run attempt: torchrun restarts reuse the agent's store.
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        prefix = f"dasgd/{attempt}/{stage}/"
        self._store.set(prefix + str(rank), "1")
        deadline = time.monotonic() + self.startup_timeout
        waiting = list(range(world_size))
        while True:
            waiting = [r for r in waiting if not self._store.check([prefix + str(r)])]
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(map(str, waiting[:20])) + (", ..." if len(waiting) > 20 else "")
                raise StartupTimeout(
                    f"worker(s) {names} did not reach start-up stage {stage!r} within {self.startup_timeout:g} s "
                    "(they died or never started: see their logs); raise --startup-timeout if they are only slow"
                )
            time.sleep(0.05)

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
