"""The transport conformance scenario, and a worker that runs it under torchrun for the real transports.

:func:`run_scenario` is the one behavioural scenario every Transport goes through (tests/
test_transport_conformance.py imports it for the in-process transport, and runs this file as
``torchrun --standalone --nproc-per-node 3 tests/scripts/transport_conformance.py --transport NAME --out DIR``
for the Gloo and split-plane transports), so all of them truly run one code path. The scenario only
*records* what happened; every check against truth lives in the test.

Phases, every rank at once:

1. Send: gradients 0..K-1 of the rank's own origin to both peers (the same Message object to both, so a
   merge that did not copy would change the other peer's payload). Element j of gradient i of origin o is
   ``o * 1000 + i + (j % 5)``, its clock has ``clock[o] = i + 1``. The first ALONE go one at a time with a
   flush and a poll after each (they leave the outbox alone); then a barrier, the rest in a burst (they may
   coalesce), a FINAL (hi = K) to each peer and another barrier, so nobody polls during the burst.
2. Receive: wait/poll until every id of every peer and both FINALs are in, or a deadline passes.
3. Idle: wait(0.05) with nothing in flight, a poll, a flush; a barrier, then a stats snapshot.
4. Misuse: send to the own rank, to -1 and to world_size (each must raise ValueError).
5. End: threaded transports expect_shutdown, barrier, shutdown(30); the in-process one a barrier and
   close(). Then close() once more (idempotent) and a last poll (nothing may be left).

Under torchrun each rank writes its record to ``DIR/rank{r}.json`` (the payloads are too big for a pipe
write) and prints one short JSON line naming that file, in a single ``os.write`` of fewer than PIPE_BUF
bytes: the three ranks share the pipe, and print() may write the text and its newline separately, letting
another rank's line land in between. Then ``os._exit(0)`` (no process-group teardown to hang in).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dasgd.core.message import Kind, Message
from dasgd.transport.base import Transport
from dasgd.transport.threads import PeerThreads

__all__ = ["ALONE", "D", "K", "WORLD", "gradient", "main", "run_scenario"]

WORLD = 3
K = 60  # gradients each rank sends to each peer
D = 50  # payload elements (float32)
ALONE = 20  # the first ALONE gradients are flushed one by one; the rest go in a burst
DEADLINE_S = 30.0  # for phase 2


def gradient(origin: int, i: int, world: int) -> Message:
    """Gradient ``i`` of ``origin``: element j is ``origin * 1000 + i + (j % 5)``; clock[origin] = i + 1."""
    clock = np.zeros(world, dtype=np.int64)
    clock[origin] = i + 1
    payload = torch.full((D,), float(origin * 1000 + i)) + (torch.arange(D) % 5).to(torch.float32)
    return Message(Kind.GRADIENT, origin, origin, i, i + 1, payload, clock)


def _record(msg: Message) -> dict[str, Any]:
    return {
        "kind": int(msg.kind),
        "sender": msg.sender,
        "origin": msg.origin,
        "lo": msg.lo,
        "hi": msg.hi,
        # float32 values of integers below 2**24: exact as Python floats, exact through JSON.
        "payload": None if msg.payload is None else [float(x) for x in msg.payload.tolist()],
        "clock": None if msg.clock is None else [int(c) for c in msg.clock],
    }


def _misuse(t: Transport) -> list[dict[str, Any]]:
    out = []
    for peer in (t.rank, -1, t.world_size):
        # A valid message with an id nobody else sends: if a bad send went through, the last poll shows it.
        msg = gradient(t.rank, K, t.world_size)
        try:
            t.send(peer, msg)
            error, is_value_error = None, False
        except Exception as exc:  # recorded, the test says which type it wanted
            error, is_value_error = type(exc).__name__, isinstance(exc, ValueError)
        out.append({"peer": peer, "error": error, "is_value_error": is_value_error})
    return out


def run_scenario(t: Transport, barrier: Callable[[], None]) -> dict[str, Any]:
    """Run the conformance scenario on endpoint ``t`` and return what happened (JSON-ready).

    ``barrier`` must block until every rank of the world has called it (it must not use ``t``'s own
    group: the transport's threads own that). Checks nothing itself.
    """
    rank, world = t.rank, t.world_size
    peers = [p for p in range(world) if p != rank]
    start = time.monotonic()

    received: list[dict[str, Any]] = []
    ids: dict[int, set[int]] = {p: set() for p in peers}
    finals: set[int] = set()

    def take() -> None:
        for m in t.poll():
            received.append(_record(m))
            if m.kind == Kind.FINAL:
                finals.add(m.origin)
            elif m.origin in ids:
                ids[m.origin].update(range(m.lo, m.hi))

    # One at a time, polling in between: the peers' early gradients come in as many small messages,
    # which is what gives the per-origin order check something to check.
    flushed_alone = []
    for i in range(ALONE):
        msg = gradient(rank, i, world)
        for p in peers:
            t.send(p, msg)
        flushed_alone.append(t.flush(30.0))
        take()
    # Nobody polls between these two barriers, so the burst may coalesce (in the in-process transport's
    # inbox it always does).
    barrier()
    for i in range(ALONE, K):
        msg = gradient(rank, i, world)
        for p in peers:
            t.send(p, msg)
    for p in peers:
        t.send(p, Message(Kind.FINAL, rank, rank, K, K))
    barrier()

    deadline = time.monotonic() + DEADLINE_S
    while (finals != set(peers) or any(len(ids[p]) < K for p in peers)) and time.monotonic() < deadline:
        t.wait(0.1)
        take()
    receive_s = time.monotonic() - start

    idle_start = time.monotonic()
    idle_wait = t.wait(0.05)
    idle_wait_s = time.monotonic() - idle_start
    idle_poll = len(t.poll())
    flushed = t.flush(30.0)
    barrier()
    stats = t.stats().to_dict()

    misuse = _misuse(t)

    if isinstance(t, PeerThreads):
        t.expect_shutdown()
        barrier()
        ended = t.shutdown(30.0)
    else:
        barrier()
        t.close()
        ended = True
    t.close()  # idempotent: a second close must neither raise nor hang
    late = [_record(m) for m in t.poll()]

    return {
        "rank": rank,
        "world": world,
        "received": received,
        "receive_s": receive_s,
        "flushed_alone": flushed_alone,
        "idle_wait": idle_wait,
        "idle_wait_s": idle_wait_s,
        "idle_poll": idle_poll,
        "flushed": flushed,
        "stats": stats,
        "misuse": misuse,
        "ended": ended,
        "late": late,
    }


def _make_transport(name: str, rank: int, world: int) -> tuple[Transport, Callable[[], None]]:
    import torch.distributed as dist

    if name == "torchdist":
        from dasgd.transport.torchdist import TorchDistTransport

        coll = dist.new_group(backend="gloo")
        return TorchDistTransport(rank, world, D, torch.float32), lambda: dist.barrier(group=coll)
    if name == "splitplane":
        from dasgd.transport.splitplane import SplitPlaneTransport, make_data_groups

        # Same group-creation order on every rank: up, down, then the group for the scenario's barriers.
        up, down = make_data_groups("gloo")
        coll = dist.new_group(backend="gloo")
        t = SplitPlaneTransport(rank, world, D, torch.float32, "cpu", None, up, down)
        return t, lambda: dist.barrier(group=coll)
    raise ValueError(f"unknown transport {name!r}; use 'torchdist' or 'splitplane'")


def main() -> None:
    """Entry point under torchrun: one rank of the scenario on a real transport."""
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transport", required=True, choices=["torchdist", "splitplane"])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t, barrier = _make_transport(args.transport, rank, world)
    result = run_scenario(t, barrier)
    result["transport"] = args.transport
    path = args.out / f"rank{rank}.json"
    path.write_text(json.dumps(result))
    line = json.dumps({"rank": rank, "transport": args.transport, "file": str(path)}) + "\n"
    os.write(1, line.encode())
    barrier()  # nobody tears its links down while another rank still writes
    os._exit(0)


if __name__ == "__main__":
    main()
