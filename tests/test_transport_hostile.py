"""A hostile peer against a real Gloo transport: replays, another run, oversize and altered payloads (issue 12).

Two processes on 127.0.0.1. Rank 0 speaks the protocol by hand: it opens the link with a valid HELLO, then
puts hand-made messages on it (with or without the shared key, like the receiver). Rank 1 is a plain
:class:`TorchDistTransport` whose payloads (20,000 float32) are too large to ride in the slot, so every GRADIENT
and MODEL is a header followed by a detached payload. Each phase runs on a fresh process group with a fresh
receiver, ends with a FINAL that marks its end, and records what the receiver delivered and refused. The
receiver must deliver exactly the valid messages, count every refusal by reason, and stay alive: several of
these messages would have aborted it inside Gloo had it posted a receive of a size the peer chose.
This file is also the worker script: ``python tests/test_transport_hostile.py --child``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_handshake import spawn

D = 20_000  # float32: 80 KB, more than INLINE_PAYLOAD_LIMIT, so payloads are detached
KEY = b"a shared secret"
NONCE = b"r" * 16
END = 99  # the FINAL that ends a phase says hi = lo = END


@pytest.fixture(scope="module")
def phases() -> dict[str, dict[str, Any]]:
    codes, results, logs = spawn(Path(__file__), [], 2, 180)
    assert codes == [0, 0], logs  # the receiver survived everything (no Gloo abort) and so did the peer
    assert results[1] is not None, logs
    return results[1]


def _kinds(rec: dict[str, Any]) -> list[tuple[str, int, int]]:
    return [(m["kind"], m["lo"], m["hi"]) for m in rec["delivered"]]


@pytest.mark.multiprocess
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "hmac"])
def test_replays_are_refused_on_the_link(phases: dict[str, dict[str, Any]], keyed: bool) -> None:
    """STOP replayed twice, MODEL replayed twice: each accepted once (issue 12, item 9)."""
    rec = phases[f"replays-{keyed}"]
    assert _kinds(rec) == [("GRADIENT", 0, 1), ("STOP", 0, 0), ("MODEL", 7, 7), ("FINAL", END, END)], rec
    assert rec["model_payload_ok"] and rec["gradient_payload_ok"]
    # The first refused MODEL header had a payload behind it that nobody received, so the peer's later
    # detached payloads are refused without a receive (its own link only; its slot messages still count).
    assert rec["rejected"] == {"replay": 4, "unsynced_peer": 1}, rec


@pytest.mark.multiprocess
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "hmac"])
def test_messages_recorded_in_another_run_are_refused(phases: dict[str, dict[str, Any]], keyed: bool) -> None:
    """A STOP and a GRADIENT made under another run's nonce (with the same key, when keyed)."""
    rec = phases[f"other_run-{keyed}"]
    assert _kinds(rec) == [("FINAL", END, END)], rec
    assert rec["rejected"] == {"wrong_run": 2}, rec


@pytest.mark.multiprocess
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "hmac"])
def test_nothing_oversized_can_abort_the_receiver(phases: dict[str, dict[str, Any]], keyed: bool) -> None:
    """A slot message one byte too long, an old (wire v1) message, a slot-sized blob, an id of 2**63, a payload
    one element too long, a float64 payload, a message signed where it must not be or unsigned where it must
    be: all refused or ignored, and the receiver goes on (the FINAL after them arrives)."""
    rec = phases[f"oversize-{keyed}"]
    assert _kinds(rec) == [("STOP", 0, 0), ("FINAL", END, END)], rec
    assert rec["rejected"] == {
        "bad_magic": 1,
        "bad_range": 1,
        "shape": 1,
        "bad_dtype": 1,
        "unsynced_peer": 1,
        "auth": 1,
    }, rec


@pytest.mark.multiprocess
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "hmac"])
def test_a_payload_altered_after_its_header_is_refused(
    phases: dict[str, dict[str, Any]], keyed: bool
) -> None:
    rec = phases[f"altered-{keyed}"]
    # the altered one is refused; its payload was received, so the next gradient still gets through
    assert _kinds(rec) == [("GRADIENT", 1, 2), ("FINAL", END, END)], rec
    assert rec["gradient_payload_ok"]
    assert rec["rejected"] == {"bad_digest": 1}, rec


# -- the worker side -------------------------------------------------------------------------------------
class RawPeer:
    """Rank 0: a peer that builds its messages by hand on the link 0 -> 1 of ``group``."""

    def __init__(self, group: Any, key: bytes | None) -> None:
        import torch

        from dasgd.core.wire import Link

        self.group, self.key = group, key
        self.link = Link(NONCE, 0, 1)
        self.seq = 0
        self.abandoned: list[tuple[Any, torch.Tensor]] = []  # sends nobody will receive: kept, never waited

    def handshake(self) -> None:
        import torch
        import torch.distributed as dist

        from dasgd.core.wire import HEADER_SIZE, encode_hello
        from dasgd.transport.handshake import link_spec_digest
        from dasgd.transport.threads import SLOT_TAG

        hello = encode_hello(
            link=self.link,
            key=self.key,
            world_size=2,
            numel=D,
            dtype=torch.float32,
            spec_digest=link_spec_digest(None, "torchdist"),
        )
        theirs = torch.empty(HEADER_SIZE, dtype=torch.uint8)
        recv = dist.irecv(theirs, group=self.group, group_src=1, tag=SLOT_TAG)
        self.slot(hello)
        recv.wait()

    def slot(self, data: bytes, tag: int | None = None, wait: bool = True) -> None:
        import torch
        import torch.distributed as dist

        from dasgd.transport.threads import SLOT_TAG

        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        work = dist.isend(tensor, group=self.group, group_dst=1, tag=SLOT_TAG if tag is None else tag)
        if wait:
            work.wait()
        else:
            self.abandoned.append((work, tensor))

    def payload(self, tensor: Any, wait: bool = True) -> None:
        import torch.distributed as dist

        from dasgd.transport.threads import PAYLOAD_TAG

        work = dist.isend(tensor, group=self.group, group_dst=1, tag=PAYLOAD_TAG)
        if wait:
            work.wait()
        else:
            self.abandoned.append((work, tensor))

    def encode(self, msg: Any, *, seq: int | None = None, nonce: bytes = NONCE, key: Any = "same") -> bytes:
        """``msg`` encoded on the link; ``seq`` None takes the link's next number."""
        from dasgd.core.wire import Link, encode

        if seq is None:
            self.seq += 1
            seq = self.seq
        detached = msg.payload is not None
        return encode(
            msg, self.key if key == "same" else key, link=Link(nonce, 0, 1), seq=seq, detached=detached
        )

    def send(self, msg: Any, payload_wait: bool = True, **kw: Any) -> bytes:
        data = self.encode(msg, **kw)
        self.slot(data)
        if msg.payload is not None:
            self.payload(msg.payload, payload_wait)
        return data

    def end(self) -> None:
        from dasgd.core.message import Kind, Message

        self.send(Message(Kind.FINAL, 0, 0, END, END))


def _grad(lo: int, hi: int, value: float = 1.0, numel: int = D, dtype: Any = None) -> Any:
    import torch

    from dasgd.core.message import Kind, Message

    return Message(Kind.GRADIENT, 0, 0, lo, hi, torch.full((numel,), value, dtype=dtype or torch.float32))


def play(phase: str, peer: RawPeer) -> None:
    """Rank 0's traffic for ``phase`` (see the tests above for what each part must cause)."""
    import torch

    from dasgd.core.message import Kind, Message

    if phase == "replays":
        peer.send(_grad(0, 1))
        stop = peer.send(Message(Kind.STOP, 0, 0))
        peer.slot(stop)
        peer.slot(stop)
        model = Message(Kind.MODEL, 0, 0, 7, 7, torch.full((D,), 3.0))
        header = peer.send(model)
        for _ in range(2):
            peer.slot(header)
            peer.payload(model.payload, wait=False)
        peer.send(_grad(1, 2), payload_wait=False)
    elif phase == "other_run":
        peer.slot(peer.encode(Message(Kind.STOP, 0, 0), seq=1, nonce=b"o" * 16))
        grad = _grad(0, 1)
        peer.slot(peer.encode(grad, seq=1, nonce=b"o" * 16))
        peer.payload(grad.payload, wait=False)
    elif phase == "oversize":
        peer.slot(peer.encode(Message(Kind.STOP, 0, 0)) + b"\x00")  # one byte longer than the message
        # A wire-v1 message (56-byte header, payload inline) on v1's tag: no version-2 receive ever matches it.
        peer.slot(b"DSGD\x01\x01\x01\x00" + bytes(48) + bytes(4 * D), tag=7, wait=False)
        from dasgd.core.wire import encoded_size

        peer.slot(b"\xee" * encoded_size(D, torch.float32, 2, detached=True))  # exactly the slot's size
        peer.slot(
            _final_past_int64(peer)
        )  # an id the receiver's int64 clock could not hold (issue 12, item 6)
        for msg in (_grad(0, 1, numel=D + 1), _grad(0, 1, dtype=torch.float64), _grad(0, 1)):
            peer.send(msg, payload_wait=False)  # refused headers: their payloads are never received
        wrong_key = None if peer.key is not None else KEY
        peer.slot(peer.encode(Message(Kind.STOP, 0, 0), seq=peer.seq + 1, key=wrong_key))
    elif phase == "altered":
        peer.slot(peer.encode(_grad(0, 1)))
        peer.payload(torch.full((D,), 2.0))  # not what the header's digest covers
        peer.send(_grad(1, 2))
    peer.end()


def _final_past_int64(peer: RawPeer) -> bytes:
    """A FINAL whose count is 2**63 (one past what an int64 clock holds), well formed otherwise: built with
    the codec's private writer, since the public encoder refuses to produce it."""
    import numpy as np
    import torch

    from dasgd.core import wire

    peer.seq += 1
    buf = torch.zeros(wire.HEADER_SIZE, dtype=torch.uint8)
    fields = (2, 0, 0, 2**63, 2**63, None, None)
    wire._write(fields, buf, buf.numpy(), peer.key, peer.link, peer.seq, False, True)  # type: ignore[arg-type]
    return bytes(np.asarray(buf.numpy()))


def child(out: Path) -> None:
    import torch
    import torch.distributed as dist

    from dasgd.core.message import Kind
    from dasgd.transport.torchdist import TorchDistTransport

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    coll = dist.new_group(backend="gloo")
    results: dict[str, Any] = {}
    for phase in ("replays", "other_run", "oversize", "altered"):
        for keyed in (False, True):
            key = KEY if keyed else None
            group = dist.new_group(backend="gloo")  # a fresh link: refused payloads stay pending on the old
            if rank == 0:
                peer = RawPeer(group, key)
                peer.handshake()
                play(phase, peer)
                dist.barrier(group=coll)
                continue
            t = TorchDistTransport(1, 2, D, torch.float32, group, key=key, nonce=NONCE, handshake_timeout=60)
            delivered = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                m.kind == Kind.FINAL and m.hi == END for m in delivered
            ):
                t.wait(0.1)
                delivered += t.poll()
            grads = [m for m in delivered if m.kind == Kind.GRADIENT]
            models = [m for m in delivered if m.kind == Kind.MODEL]
            results[f"{phase}-{keyed}"] = {
                "delivered": [{"kind": m.kind.name, "lo": m.lo, "hi": m.hi} for m in delivered],
                "rejected": dict(t.stats().rejected),
                "gradient_payload_ok": all(torch.equal(m.payload, torch.full((D,), 1.0)) for m in grads),
                "model_payload_ok": all(torch.equal(m.payload, torch.full((D,), 3.0)) for m in models),
            }
            t.close()
            dist.barrier(group=coll)
    if rank == 1:
        out.write_text(json.dumps(results))
    dist.barrier(group=coll)
    os._exit(0)


if __name__ == "__main__":
    import faulthandler

    # A hang shows every thread's stack in the log.
    faulthandler.dump_traceback_later(150, exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    child(parser.parse_args().out)
