"""The messages workers exchange: gradients, final counts and control signals.

A message is plain data. Encoding to bytes lives in :mod:`dasgd.core.wire`; routing lives in the worker;
carrying lives in a transport. Gradient ids are per origin: worker ``o``'s gradients are numbered 0, 1, 2, ...
in the order ``o`` computed them, and a message holds the *sum* of the half-open id range ``[lo, hi)``.
Because fixed-stepsize SGD updates commute, a model is fully described by the set of gradient ids applied to
it, and a coalesced sum carries exactly the same information as its parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

__all__ = ["Kind", "MAX_GRADIENT_ID", "MAX_GRADIENTS_PER_MESSAGE", "Message"]

MAX_GRADIENT_ID = 2**62
"""Gradient ids and counts stay below this: the vector clock holds them as int64, with room to add."""

MAX_GRADIENTS_PER_MESSAGE = 1 << 16
"""The most gradients one GRADIENT message may sum (``hi - lo``): transports coalesce up to it, and a
worker refuses a wider range (``range_too_wide``), so a peer cannot claim a huge number of gradients at
once. At 1,000 gradients a second per origin it is over a minute of one origin's gradients."""


class Kind(IntEnum):
    """What a message means. The numeric values are part of the wire format: never renumber."""

    GRADIENT = 1
    """``payload`` is the sum of ``origin``'s gradients with ids in ``[lo, hi)``."""
    FINAL = 2
    """``origin`` has stopped computing; it computed exactly ``hi`` gradients (``lo == hi``, no payload)."""
    STOP = 3
    """``origin`` asks every worker to stop computing (a stop rule fired there). No payload."""
    SHUTDOWN = 4
    """End of run, after every worker finished its drain: the receiver may stop listening. No payload."""
    MODEL = 5
    """``payload`` is a full model (parameter vector), sent one hop by the baselines that move models
    (parameter-server replies, Local SGD rounds, gossip exchanges). ``lo <= hi`` is the algorithm's tag
    (a round number, request or reply); ``clock`` says which gradients the model holds."""
    DEAD = 6
    """The sender saw worker ``origin`` die (its link broke): route around it and stop waiting for it. Flooded
    to neighbours on a sparse topology, so every survivor routes around the same workers. No payload."""
    MARKER = 7
    """A checkpoint marker on the link ``sender`` -> receiver (``origin == sender``): everything the sender put
    on this link before it belongs to the checkpoint ``lo == hi`` (the checkpoint id), everything after it does
    not (worker/checkpoint.py). Travels one hop, never forwarded. No payload."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message between workers.

    Attributes:
        kind: what the message means.
        sender: the worker that put this message on the link (the last hop).
        origin: the worker that computed the gradients (or issued the control signal).
        lo: first gradient id held (inclusive).
        hi: last gradient id held (exclusive); for FINAL, the origin's total count.
        payload: a 1-D tensor (gradient sum or model), or None for control messages.
        clock: the sender's vector clock (applied gradients per origin) when it sent, or None.
    """

    kind: Kind
    sender: int
    origin: int
    lo: int = 0
    hi: int = 0
    payload: torch.Tensor | None = None
    clock: np.ndarray | None = None

    @property
    def count(self) -> int:
        """Number of gradients a GRADIENT message holds."""
        return self.hi - self.lo if self.kind == Kind.GRADIENT else 0

    def forwarded_by(self, sender: int) -> Message:
        """The same message as sent on by ``sender`` (payload shared, not copied)."""
        return Message(self.kind, sender, self.origin, self.lo, self.hi, self.payload, self.clock)
