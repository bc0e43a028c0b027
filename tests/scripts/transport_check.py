"""Run under `torchrun --standalone --nproc-per-node 2`: untrusted bytes against a real Gloo transport.

Rank 0 plays a hostile or broken peer that speaks the protocol by hand: it opens the link with a valid HELLO
(so the handshake passes), then pushes raw byte strings (garbage, truncated, corrupted, forged) into the
receiver's slot, then valid gradient messages with the link's sequence numbers. Rank 1 is a normal
TorchDistTransport endpoint and must reject and count every bad one, apply none of them, and deliver every
valid one. Every message here fits the receiver's slot (a payload of D float32 rides in it), so none can
abort the receiver. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from dasgd.core.message import Kind, Message
from dasgd.core.wire import Link, encode, encode_hello
from dasgd.transport.handshake import link_spec_digest
from dasgd.transport.threads import SLOT_TAG
from dasgd.transport.torchdist import TorchDistTransport

D = 1000
NONCE = bytes(16)  # the transport's nonce when none is given


def raw_send(data: bytes) -> None:
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=1, tag=SLOT_TAG)


def handshake_by_hand() -> None:
    """Rank 0's half of the handshake: its HELLO to rank 1, and rank 1's HELLO received (and ignored)."""
    hello = encode_hello(
        link=Link(NONCE, 0, 1),
        key=None,
        world_size=2,
        numel=D,
        dtype=torch.float32,
        spec_digest=link_spec_digest(None, "torchdist"),
    )
    theirs = torch.empty(len(hello), dtype=torch.uint8)
    recv = dist.irecv(theirs, src=1, tag=SLOT_TAG)
    raw_send(hello)
    recv.wait()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    coll = dist.new_group(backend="gloo")
    if rank == 0:
        handshake_by_hand()
        link = Link(NONCE, 0, 1)
        good = [
            encode(Message(Kind.GRADIENT, 0, 0, i, i + 1, torch.full((D,), float(i))), link=link, seq=i + 1)
            for i in range(20)
        ]
        flipped = bytearray(good[0])
        flipped[len(flipped) // 2] ^= 0x40
        bad = [
            b"\x00" * 100,  # garbage
            good[1][:50],  # truncated header
            good[1][: len(good[1]) - 10],  # truncated payload
            bytes(flipped),  # corrupted payload
            b"XXXX" + good[2][4:],  # wrong magic
            # unknown sender (world is 2)
            encode(Message(Kind.GRADIENT, 5, 5, 0, 1, torch.ones(D)), link=Link(NONCE, 5, 1), seq=1),
            # claims rank 1, arrives on 0's link
            encode(Message(Kind.GRADIENT, 1, 1, 0, 1, torch.ones(D)), link=Link(NONCE, 1, 1), seq=1),
        ]
        for b in bad:
            raw_send(b)
        for g in good:
            raw_send(g)
        dist.barrier(group=coll)
        raw_send(encode(Message(Kind.SHUTDOWN, 0, 0), link=link, seq=21))
        dist.barrier(group=coll)
    else:
        t = TorchDistTransport(1, 2, D, torch.float32, handshake_timeout=60)
        got: list[Message] = []
        deadline = time.monotonic() + 30
        while sum(m.count for m in got) < 20 and time.monotonic() < deadline:
            t.wait(0.1)
            got.extend(t.poll())
        # Expect the SHUTDOWN before the barrier that lets rank 0 send it: expecting it after the barrier
        # raced rank 0's send (about 1 run in 3 counted it as early_shutdown and the receiver never ended).
        t.expect_shutdown()
        dist.barrier(group=coll)
        receiver_ended = t.join_receivers(10)
        ids = sorted(i for m in got for i in range(m.lo, m.hi))
        total = float(sum(m.payload.sum().item() for m in got))
        print(
            json.dumps(
                {
                    "ids": ids,
                    "payload_sum": total,
                    "rejected": dict(t.stats().rejected),
                    "receiver_ended": receiver_ended,
                }
            ),
            flush=True,
        )
        dist.barrier(group=coll)
    os._exit(0)


if __name__ == "__main__":
    main()
