"""An audit trail of one replica: the raw facts an independent checker needs to recompute it.

The run summary says whether every gradient was applied exactly once and whether the replicas agree, but it
is computed by the same code it vouches for. An audit trail lets a checker that shares none of that code
(the test suite's oracle, or a user's own script) recompute every replica from first principles:

- ``x0``: the replica's parameters before training (float64);
- the gradients this worker computed, in order, as float64 rows of ``rank{R}.grads`` (written as each one is
  committed, unbuffered, so the rows of a worker that dies are still there);
- the replica's history, in order: ``["own", index]`` (an own gradient was committed), ``["gradient", origin,
  lo, hi, held, clock]`` (a remote gradient message covering ids ``[lo, hi)`` of ``origin`` was accepted;
  ``held`` is the replica's vector clock just before, ``clock`` the message's, or None), ``["model", sender,
  tag, used]`` (a MODEL message was accepted; ``tag`` is its ``lo`` field, ``used`` whether the algorithm
  took it rather than counting it as unexpected), and ``["sent", peer, position]`` (a MODEL message left for
  ``peer``, holding the replica as it was after the first ``position`` history entries other than "sent");
- the final parameters (float64).

Nothing here interprets the events: what a gradient or a model does to the replica is the checker's rule to
apply (``tests/oracle.py`` states one per algorithm). Recording costs a float64 copy of every own gradient
(``8 * dim`` bytes each, on disk) and a few ints per message; it is meant for tests and audits, not for
every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from dasgd.core.message import Kind, Message

__all__ = ["AuditTrail", "load_audit"]


class AuditTrail:
    """Records one replica's history; see the module docstring for what each entry means.

    Args:
        folder: where ``rank{R}.grads`` (now) and ``rank{R}.npz`` (on :meth:`save`) are written.
        rank: the worker's rank.
        x0: the replica's parameters before any update.
    """

    def __init__(self, folder: Path, rank: int, x0: torch.Tensor) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.rank = rank
        self.x0 = x0.detach().to("cpu", torch.float64).numpy().copy()
        self.history: list[list[Any]] = []
        self._updates = 0  # history entries other than "sent": the positions a snapshot refers to
        self.computed = 0
        # Unbuffered: each row reaches the OS when it is written, so a worker killed mid-run leaves every
        # gradient it committed (the oracle needs a dead origin's gradients that survivors applied).
        self._grads: BinaryIO = open(folder / f"rank{rank}.grads", "wb", buffering=0)  # noqa: SIM115

    def own(self, index: int, grad: torch.Tensor) -> None:
        """Own gradient ``index`` was committed (before the algorithm acts on it)."""
        row = grad.detach().to("cpu", torch.float64).numpy()
        self._grads.write(np.ascontiguousarray(row).tobytes())
        self.computed += 1
        self._add(["own", int(index)])

    def gradient(self, msg: Message, held: np.ndarray) -> None:
        """A remote gradient message was accepted; ``held`` is the replica's clock before it."""
        clock = None if msg.clock is None else [int(c) for c in msg.clock]
        self._add(["gradient", int(msg.origin), int(msg.lo), int(msg.hi), [int(c) for c in held], clock])

    def bundle_part(self, origin: int, lo: int, hi: int, held: np.ndarray) -> None:
        """One part of a simulator bundle (no per-part clock) was accepted."""
        self._add(["gradient", int(origin), int(lo), int(hi), [int(c) for c in held], None])

    def model(self, msg: Message, used: bool) -> None:
        """A MODEL message was accepted; ``used``: the algorithm did not count it as unexpected."""
        self._add(["model", int(msg.sender), int(msg.lo), bool(used)])

    def sent(self, outgoing: list[tuple[int, Message]]) -> None:
        """Messages an algorithm hook returned: each MODEL among them holds the replica as it is now."""
        for peer, msg in outgoing:
            if msg.kind == Kind.MODEL:
                self.history.append(["sent", int(peer), self._updates])

    def _add(self, entry: list[Any]) -> None:
        self.history.append(entry)
        self._updates += 1

    def save(self, params: torch.Tensor, meta: dict[str, Any]) -> Path:
        """Write ``rank{R}.npz``: x0, the final parameters, the history and ``meta`` (no pickle)."""
        self._grads.close()
        path = self.folder / f"rank{self.rank}.npz"
        tmp = self.folder / f".rank{self.rank}.npz.tmp"
        doc = {"rank": self.rank, "computed": self.computed, "history": self.history, "meta": meta}
        with open(tmp, "wb") as f:
            np.savez(
                f,
                x0=self.x0,
                params=params.detach().to("cpu", torch.float64).numpy(),
                record=np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8),
            )
        tmp.replace(path)
        return path


def load_audit(folder: Path, rank: int) -> dict[str, Any] | None:
    """One worker's audit as plain data, or None when it left no ``rank{R}.npz`` (it died).

    Keys: ``x0``, ``params`` (float64 arrays), ``grads`` (float64, one row per computed gradient),
    ``history``, ``computed``, ``meta``. A dead worker's gradients are read with :func:`load_gradients`.
    """
    path = folder / f"rank{rank}.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        doc = json.loads(z["record"].tobytes().decode())
        out = {"x0": z["x0"], "params": z["params"], **doc}
    out["grads"] = load_gradients(folder, rank, len(out["x0"]))
    return out


def load_gradients(folder: Path, rank: int, dim: int) -> np.ndarray:
    """The gradients worker ``rank`` committed, as written so far (whole rows only)."""
    raw = (folder / f"rank{rank}.grads").read_bytes()
    rows = len(raw) // (8 * dim)
    return np.frombuffer(raw[: rows * 8 * dim], dtype=np.float64).reshape(rows, dim)
