"""Run under `torchrun --standalone --nproc-per-node 3`: the split-plane transport on CPU (Gloo everywhere).

Gloo control group for headers, Gloo ``up``/``down`` groups for payloads: the same code path NCCL takes, minus
the CUDA stream calls. Phases, each rank at once:

1. Traffic: every rank sends gradients 0..199 to both peers at the same time (so both directions of every
   pair are busy together: the up/down split). The first 100 go one by one (a flush after each, so every one
   travels alone); the last 100 go in a burst and get coalesced. The same Message object goes to both peers,
   so a merge that did not copy would double a payload. Element j of gradient ``id`` of ``origin`` is
   ``origin * 1000 + id + (j % 7)``, and its clock says ``clock[origin] = id + 1``. Then a FINAL each.
2. Hostile headers, all to rank 1, after a barrier, each on the sender's real link with the sequence number
   it needs (taken from the sender's own transport when the receiver will count it as used up). From rank 0:
   a signed-if-keyed detached header with the wrong numel (rejected: shape), afterwards one with the right
   numel but no payload behind it (rejected: unsynced_peer), the same bytes again (replay), a header bound
   to another run's nonce (wrong_run) and, with a key, one signed with the wrong key (auth). From rank 2: a
   valid header whose payload is altered on the data plane (bad_digest; the payload is received, so the
   channel stays in step), a header with the wrong dtype (bad_dtype), a one-element inline payload (shape:
   a payload of the transport's size would not fit the header-sized slot, which is the point of the slot)
   and a valid header that claims rank 0 as its sender (wrong_sender). If the receiver posted a data receive
   for a header it refused it would block for good and phase 3 would not end.
3. SHUTDOWN to every peer (expect_shutdown, barrier, shutdown), then one JSON line per rank and os._exit(0).

Also recorded: which data group every data-plane send and receive used (torch.distributed.isend/irecv are
wrapped, so a transport that mixed up or ignored the up/down split shows here even though Gloo would not
deadlock), and that ``send`` refuses payloads of the wrong size, dtype or device and that the constructor
refuses one group for both directions.

Argument: ``--key`` runs it with a shared secret (every header carries an HMAC).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from dasgd.core.message import Kind, Message
from dasgd.core.wire import Link, encode
from dasgd.transport.splitplane import SplitPlaneTransport, SplitPlaneUsageError, make_data_groups
from dasgd.transport.threads import PAYLOAD_TAG, SLOT_TAG

D = 2048
N = 200
PATTERN = torch.arange(D, dtype=torch.float32) % 7


def gradient(origin: int, i: int, world: int) -> Message:
    clock = np.zeros(world, dtype=np.int64)
    clock[origin] = i + 1
    payload = torch.full((D,), float(origin * 1000 + i)) + PATTERN
    return Message(Kind.GRADIENT, origin, origin, i, i + 1, payload, clock)


def raw_header(
    msg: Message,
    dst: int,
    group: dist.ProcessGroup,
    key: bytes | None,
    detached: bool,
    seq: int,
    nonce: bytes = bytes(16),
) -> bytes:
    """Put a hand-made header on the control plane, as the transport's slot message; return its bytes."""
    data = encode(msg, key, link=Link(nonce, msg.sender, dst), seq=seq, detached=detached)
    send_bytes(data, dst, group)
    return data


def send_bytes(data: bytes, dst: int, group: dist.ProcessGroup) -> None:
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), group=group, group_dst=dst, tag=SLOT_TAG)


def peek_seq(t: SplitPlaneTransport, peer: int) -> int:
    """The number the receiver expects next from us, without using it up (for messages it will refuse before
    counting them in its sequence)."""
    return t._next_seq.get(peer, 0) + 1


def record_data_plane(up: dist.ProcessGroup, down: dist.ProcessGroup, log: list[tuple]) -> None:
    """Wrap isend/irecv to log (op, used the up group, peer) for every operation on a data group."""
    isend, irecv = dist.isend, dist.irecv

    def logged_isend(tensor, dst=None, group=None, tag=0, group_dst=None):  # noqa: ANN001, ANN202
        if group is up or group is down:
            log.append(("send", group is up, group_dst if group_dst is not None else dst))
        return isend(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)

    def logged_irecv(tensor, src=None, group=None, tag=0, group_src=None):  # noqa: ANN001, ANN202
        if group is up or group is down:
            log.append(("recv", group is up, group_src if group_src is not None else src))
        return irecv(tensor, src=src, group=group, tag=tag, group_src=group_src)

    dist.isend, dist.irecv = logged_isend, logged_irecv


def usage_errors(t: SplitPlaneTransport, peer: int, control: dist.ProcessGroup, up: dist.ProcessGroup) -> int:
    """How many of the misuses below raise SplitPlaneUsageError (all of them should)."""
    bad = [
        lambda: t.send(peer, Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(D + 1))),
        lambda: t.send(peer, Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(D, dtype=torch.float64))),
        lambda: t.send(peer, Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(D, device="meta"))),
        lambda: t.send(t.rank, Message(Kind.STOP, t.rank, t.rank)),
        lambda: SplitPlaneTransport(t.rank, t.world_size, D, torch.float32, "cpu", control, up, up),
        lambda: SplitPlaneTransport(t.rank, t.world_size + 1, D, torch.float32, "cpu", control, up, t._down),
    ]
    raised = 0
    for call in bad:
        try:
            call()
        except SplitPlaneUsageError:
            raised += 1
    return raised


def main() -> None:
    key = b"split-plane-secret" if "--key" in sys.argv else None
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # Same order on every rank: control, up, down, then a group for this script's own barriers.
    control = dist.new_group(backend="gloo")
    up, down = make_data_groups("gloo")
    coll = dist.new_group(backend="gloo")
    data_log: list[tuple] = []
    record_data_plane(up, down, data_log)
    t = SplitPlaneTransport(rank, world, D, torch.float32, "cpu", control, up, down, key=key)
    peers = [p for p in range(world) if p != rank]
    misuses_refused = usage_errors(t, peers[0], control, up)

    start = time.monotonic()
    for i in range(N):
        msg = gradient(rank, i, world)
        for p in peers:
            t.send(p, msg)
        if i < N // 2:
            t.flush(30)
    for p in peers:
        t.send(p, Message(Kind.FINAL, rank, rank, N, N))

    got: list[Message] = []
    finals: dict[int, bool] = {}  # origin -> all its ids had arrived when its FINAL did
    ids: dict[int, set[int]] = {p: set() for p in peers}
    deadline = time.monotonic() + 60
    while (len(finals) < len(peers) or any(len(ids[p]) < N for p in peers)) and time.monotonic() < deadline:
        t.wait(0.1)
        for m in t.poll():
            if m.kind == Kind.FINAL:
                finals[m.origin] = len(ids[m.origin]) == N and m.hi == N
            else:
                got.append(m)
                ids[m.origin].update(range(m.lo, m.hi))
    flushed = t.flush(30)
    elapsed = time.monotonic() - start

    # Independent truth per received message: sum over its ids of origin*1000 + id, plus count*(j % 7).
    payload_errors = 0
    clock_errors = 0
    id_counts: dict[int, int] = {p: 0 for p in peers}
    for m in got:
        ids_sum = sum(m.origin * 1000 + i for i in range(m.lo, m.hi))
        want = torch.full((D,), float(ids_sum)) + m.count * PATTERN
        if m.payload is None or m.payload.shape != (D,) or not torch.equal(m.payload, want):
            payload_errors += 1
        if m.clock is None or int(m.clock[m.origin]) != m.hi:
            clock_errors += 1
        id_counts[m.origin] += m.count
    traffic = t.stats().to_dict()
    # Direction rule: lower -> higher rank on "up", higher -> lower on "down", seen from both ends.
    direction_errors = sum(
        1
        for op, on_up, peer in data_log
        if on_up != ((rank < peer) if op == "send" else (peer < rank)) or peer not in peers
    )
    data_ops = {
        op: {str(p): sum(1 for o, _, q in data_log if o == op and q == p) for p in peers}
        for op in ("send", "recv")
    }

    # Phase 2: hostile headers to rank 1 (the transports' own senders to rank 1 are idle: flushed above).
    dist.barrier(group=coll)
    expected_rejects: dict[str, int] = {}
    if rank == 0:
        bad_numel = Message(Kind.GRADIENT, 0, 0, N, N + 1, torch.zeros(D + 1))
        raw_header(bad_numel, 1, control, key, True, t._take_seq(1))
        right_but_unsynced = Message(Kind.GRADIENT, 0, 0, N + 1, N + 2, torch.zeros(D))
        sent = raw_header(right_but_unsynced, 1, control, key, True, t._take_seq(1))
        send_bytes(sent, 1, control)  # replayed: its number is used up
        other_run = Message(Kind.MODEL, 0, 0, payload=torch.zeros(D))
        raw_header(other_run, 1, control, key, True, peek_seq(t, 1), nonce=b"another run nonce"[:16])
        if key is not None:
            raw_header(
                Message(Kind.MODEL, 0, 0, payload=torch.zeros(D)), 1, control, b"wrong", True, peek_seq(t, 1)
            )
    elif rank == 2:
        # A valid header, then another payload on the data plane (same size): caught by the header's digest.
        raw_header(
            Message(Kind.GRADIENT, 2, 2, N, N + 1, torch.zeros(D)), 1, control, key, True, t._take_seq(1)
        )
        dist.send(torch.ones(D), group=down, group_dst=1, tag=PAYLOAD_TAG)
        bad_dtype = Message(Kind.GRADIENT, 2, 2, N, N + 1, torch.zeros(D, dtype=torch.float64))
        raw_header(bad_dtype, 1, control, key, True, t._take_seq(1))
        raw_header(
            Message(Kind.GRADIENT, 2, 2, N, N + 1, torch.zeros(1)), 1, control, key, False, t._take_seq(1)
        )
        # A valid header, signed if keyed, that claims to come from rank 0: refused on rank 2's link with no
        # data receive posted (none follows it, so a posted one would block rank 1's receiver for good).
        forged = Message(Kind.GRADIENT, 0, 0, N + 5, N + 6, torch.zeros(D))
        send_bytes(
            encode(forged, key, link=Link(bytes(16), 0, 1), seq=peek_seq(t, 1), detached=True), 1, control
        )
    else:
        expected_rejects = {
            "shape": 2,
            "unsynced_peer": 1,
            "replay": 1,
            "wrong_run": 1,
            "bad_digest": 1,
            "bad_dtype": 1,
            "wrong_sender": 1,
        }
        if key is not None:
            expected_rejects["auth"] = 1
        deadline = time.monotonic() + 30
        while t.stats().rejected != expected_rejects and time.monotonic() < deadline:
            t.wait(0.05)
    leaked = len(t.poll())  # nothing hostile may reach the inbox
    dist.barrier(group=coll)

    # Phase 3: SHUTDOWN to every peer. Everyone expects it before anyone sends it.
    t.expect_shutdown()
    dist.barrier(group=coll)
    shutdown_ok = t.shutdown(30)
    stats = t.stats().to_dict()
    # One write() of less than PIPE_BUF bytes per line: the three ranks share the pipe, and print() may write
    # the text and its newline separately, letting another rank's line land in between.
    line = (
        json.dumps(
            {
                "rank": rank,
                "keyed": key is not None,
                "ids": {str(p): sorted(ids[p]) == list(range(N)) for p in peers},
                "id_counts": {str(p): id_counts[p] for p in peers},
                "messages": len(got),
                "payload_errors": payload_errors,
                "clock_errors": clock_errors,
                "finals_after_all_ids": finals,
                "flushed": flushed,
                "traffic": traffic,
                "data_ops": data_ops,
                "direction_errors": direction_errors,
                "misuses_refused": misuses_refused,
                "rejected": stats["rejected"],
                "expected_rejects": expected_rejects,
                "leaked": leaked,
                "shutdown_ok": shutdown_ok,
                "elapsed": elapsed,
            }
        )
        + "\n"
    )
    os.write(1, line.encode())
    dist.barrier(group=coll)
    os._exit(0)


if __name__ == "__main__":
    main()
