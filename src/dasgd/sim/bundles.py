"""Bundled polls of the broadcast log: everything that reached a worker since its last poll, as one sum.

With a thousand workers on a complete graph, each worker receives about a thousand gradients per step of its
own. Applying them one message at a time costs a Python call and a vector addition each, so the simulation
grows as gradients x workers. When the algorithm's updates commute (DASGD), the engine lets the network hand
a worker a :class:`GradientBundle` instead: the parts' origins and id ranges as arrays, and their summed
payload taken from running prefix sums of the log (``P[c] - P[a]``, float64, minus the receiver's own
gradients in the window). A poll then costs a few array operations and one vector subtraction, whatever the
number of messages. The STOP and FINAL messages of the window travel in the same bundle, as arrays, and count
as arriving after its gradients (each origin's FINAL follows its own gradients in the log anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dasgd.core.message import Kind, Message

__all__ = ["GradientBundle", "LogIndex", "bundled_window"]


class LogIndex:
    """Columns of the broadcast log (sender, kind, origin, id range) and payload prefix sums.

    Positions are relative to the first entry kept (the log trims what every live receiver has read).
    ``prefix[i]`` is the float64 sum of the gradient payloads at positions ``< i`` (None: nothing yet).
    """

    _COLUMNS = ("src", "kind", "origin", "lo", "hi")

    def __init__(self) -> None:
        self._n = 0
        cap = 1024
        self.src = np.empty(cap, dtype=np.int64)
        self.kind = np.empty(cap, dtype=np.int64)
        self.origin = np.empty(cap, dtype=np.int64)
        self.lo = np.empty(cap, dtype=np.int64)
        self.hi = np.empty(cap, dtype=np.int64)
        self.prefix: list[torch.Tensor | None] = [None]

    def __len__(self) -> int:
        return self._n

    def append(self, src: int, msg: Message) -> None:
        """Index the message just appended to the log."""
        if self._n == len(self.src):
            for name in self._COLUMNS:
                old = getattr(self, name)
                new = np.empty(2 * len(old), dtype=old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
        i = self._n
        is_grad = msg.kind == Kind.GRADIENT and msg.payload is not None
        self.src[i] = src
        self.kind[i] = int(msg.kind) if (is_grad or msg.kind != Kind.GRADIENT) else 0
        self.origin[i] = msg.origin
        self.lo[i] = msg.lo
        self.hi[i] = msg.hi
        last = self.prefix[-1]
        if is_grad:
            assert msg.payload is not None
            g = msg.payload.detach().to(torch.float64)
            self.prefix.append(g.clone() if last is None else last + g)
        else:
            self.prefix.append(last)
        self._n += 1

    def trim(self, drop: int) -> None:
        """Forget the first ``drop`` entries."""
        if drop <= 0:
            return
        keep = self._n - drop
        for name in self._COLUMNS:
            arr = getattr(self, name)
            arr[:keep] = arr[drop : self._n]
        del self.prefix[:drop]
        self._n = keep

    def range_sum(self, a: int, c: int) -> torch.Tensor | None:
        """The sum of the gradient payloads at positions ``a <= i < c`` (None if there are none)."""
        hi, lo = self.prefix[c], self.prefix[a]
        if hi is None:
            return None
        return hi.clone() if lo is None else hi - lo


_GRADIENT, _FINAL, _STOP = int(Kind.GRADIENT), int(Kind.FINAL), int(Kind.STOP)


@dataclass(frozen=True, slots=True)
class GradientBundle:
    """Messages of several origins that arrived together: gradients summed into one payload, plus the
    FINAL and STOP signals among them.

    Coalescing across origins: the simulator hands a worker everything that reached it since its last poll as
    one bundle when the algorithm's updates commute (DASGD), so applying it is one vector addition instead of
    one per message, and every gradient's id range is kept for the exactly-once bookkeeping. Signals count
    as arriving after the bundle's gradients (each origin's FINAL follows its gradients anyway; gradients of
    different origins commute). A bundle never crosses a process boundary (it has no wire format).

    Attributes:
        origin, lo, hi: one entry per gradient message, in arrival order (int64 arrays).
        payload: the sum of the gradient payloads (None when there are none).
        final_origin, final_count: the FINAL messages' origins and counts.
        stop: a STOP message is among them.
        expand: returns the messages themselves, in arrival order, for the one-by-one path (used when a
            check fails).
    """

    origin: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    payload: torch.Tensor | None
    final_origin: np.ndarray
    final_count: np.ndarray
    stop: bool
    expand: Callable[[], list[Message]]

    @property
    def count(self) -> int:
        """Number of gradients the bundle holds."""
        return int((self.hi - self.lo).sum())


def bundled_window(
    index: LogIndex, entries: list[tuple[float, int, int, Message]], rank: int, a: int, c: int
) -> tuple[list[Message | GradientBundle], int]:
    """What log positions ``[a, c)`` deliver to ``rank``, as one bundle where possible.

    ``entries`` is the log itself (``(arrival, seq, src, msg)``, same positions as ``index``). Returns the
    messages (a bundle, or the plain messages when the window holds something a bundle cannot carry) and how
    many log messages they stand for.
    """
    src = index.src[a:c]
    kind = index.kind[a:c]
    others = src != rank
    grads = np.flatnonzero(others & (kind == _GRADIENT))
    finals = np.flatnonzero(others & (kind == _FINAL))
    stops = np.flatnonzero(others & (kind == _STOP))
    parts = len(grads) + len(finals) + len(stops)
    window = entries[a:c]
    if parts < int(others.sum()):  # a kind a bundle does not carry: deliver one by one
        return [e[3] for e in window if e[2] != rank], int(others.sum())
    if parts <= 1:
        return [e[3] for e in window if e[2] != rank], parts
    payload = None
    if len(grads):
        payload = index.range_sum(a, c)
        assert payload is not None
        for j in np.flatnonzero(~others & (kind == _GRADIENT)).tolist():
            own = window[j][3].payload
            assert own is not None
            payload -= own.detach().to(torch.float64)

    def expand() -> list[Message]:
        return [e[3] for e in window if e[2] != rank]

    bundle = GradientBundle(
        index.origin[a:c][grads],
        index.lo[a:c][grads],
        index.hi[a:c][grads],
        payload,
        index.origin[a:c][finals],
        index.hi[a:c][finals],
        bool(len(stops)),
        expand,
    )
    return [bundle], parts
