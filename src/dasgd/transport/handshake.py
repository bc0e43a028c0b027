"""What opens a link: the run nonce every worker agrees on, the spec digest, and the error a refused peer gives.

Every link between two workers starts with a HELLO each way (:func:`dasgd.core.wire.encode_hello`): wire
version, the run nonce, the link (sender, receiver), the world size, the payload's element count and dtype,
a digest of the run's spec, and, with a key, the HMAC that proves the sender holds it. The transports
(:mod:`dasgd.transport.threads`) send their HELLOs and check their peers' before any data moves, within a
bounded time, and refuse a peer whose HELLO differs: the constructor raises :class:`HandshakeError`, which
names each refused peer and what differed. A run whose workers disagree on what they run is a configuration
mistake: it stops at start-up, before any gradient is computed, rather than going on without that peer.

Where the nonce comes from: :func:`agree_run_nonce` has rank 0 of the run's collective group draw 16 random
bytes and broadcast them, right after the rendezvous. A group belongs to one incarnation of the run (torchrun
restarts form new groups), so every incarnation gets a fresh nonce, and nothing is left behind in a store
for a restarted worker to read by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from dasgd.core.wire import DIGEST_SIZE, NONCE_SIZE

__all__ = ["HandshakeError", "agree_run_nonce", "link_spec_digest", "spec_digest"]

# What a refusal reason means for a person reading why the run did not start.
_WHAT: Mapping[str, str] = {
    "bad_version": "another wire version",
    "auth": "the shared secrets differ (or one side has none)",
    "wrong_run": "another run (run nonce differs)",
    "spec_mismatch": "another spec",
    "timeout": "no HELLO in time",
    "lost": "the link closed during the handshake",
}


class HandshakeError(RuntimeError):
    """A transport refused to open some of its links (raised by its constructor).

    Attributes:
        rank: this worker.
        problems: refused peer -> (reason, detail). ``reason`` is a wire reject reason (``bad_version``,
            ``auth``, ``wrong_run``, ``spec_mismatch``, ... see :data:`dasgd.core.wire.REJECT_REASONS`),
            ``timeout`` (no HELLO within the handshake timeout: the peer did not start, is stuck, or runs a
            dasgd that speaks wire version 1, which sends no HELLO) or ``lost`` (the link closed: the peer
            exited, often because it refused us first).
    """

    def __init__(self, rank: int, problems: Mapping[int, tuple[str, str]]) -> None:
        self.rank = rank
        self.problems = dict(sorted(problems.items()))
        text = "; ".join(
            f"peer {peer}: {_WHAT.get(reason, reason)} ({reason}: {detail})"
            for peer, (reason, detail) in self.problems.items()
        )
        super().__init__(f"worker {rank} refused to open its links: {text}")


def spec_digest(*parts: object) -> bytes:
    """A :data:`~dasgd.core.wire.DIGEST_SIZE`-byte digest of ``parts`` (strings, numbers, None, lists):
    what identifies a run's spec, e.g. ``spec_digest(task, algorithm, topology, seed)``. Equal parts give
    equal digests in every process and on every machine."""
    text = json.dumps(list(parts), sort_keys=True, default=str)
    return hashlib.sha256(b"dasgd-spec\0" + text.encode()).digest()


def link_spec_digest(caller_digest: bytes | None, transport: str) -> bytes:
    """The digest a transport puts in its HELLOs: the caller's spec digest, bound to the transport's name
    (a Gloo endpoint and a split-plane endpoint move payloads differently and cannot talk)."""
    if caller_digest is not None and len(caller_digest) != DIGEST_SIZE:
        raise ValueError(
            f"spec_digest must be {DIGEST_SIZE} bytes (use dasgd.transport.handshake.spec_digest)"
        )
    return hashlib.sha256(b"dasgd-link\0" + transport.encode() + b"\0" + (caller_digest or b"")).digest()


def agree_run_nonce(group: dist.ProcessGroup | None = None) -> bytes:
    """The run's nonce: :data:`~dasgd.core.wire.NONCE_SIZE` random bytes drawn by the group's rank 0 and
    broadcast to every member. A collective: every member of ``group`` must call it at the same point.

    Use the run's collective group (not a group a transport's threads are using)."""
    nonce = torch.zeros(NONCE_SIZE, dtype=torch.uint8)
    if dist.get_rank(group) == 0:
        nonce.copy_(torch.frombuffer(bytearray(os.urandom(NONCE_SIZE)), dtype=torch.uint8))
    dist.broadcast(nonce, group=group, group_src=0)
    return bytes(nonce.numpy())
