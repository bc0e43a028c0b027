"""One worker's end-of-run result, as bytes that can cross a process boundary without pickle.

A shard is an ``.npz`` archive (numpy arrays only, loaded with ``allow_pickle=False``) holding the worker's
gradient records, final parameters and vector clock, plus a ``meta`` entry: UTF-8 JSON of its counters.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["WorkerShard", "ShardError"]


class ShardError(ValueError):
    """Bytes that do not form a valid worker shard."""


_ARRAYS = ("origin", "index", "start", "end", "clock", "params", "final_clock")


@dataclass(frozen=True)
class WorkerShard:
    """What one worker reports at the end of a run."""

    origin: np.ndarray
    index: np.ndarray
    start: np.ndarray
    end: np.ndarray
    clock: np.ndarray
    """Vector clock at the start of each own gradient (T_w x N)."""
    params: np.ndarray
    """Final replica parameters (flat)."""
    final_clock: np.ndarray
    """Gradients the final replica holds, per origin."""
    meta: dict[str, Any]
    """Counters: rank, computed, stop_reason, drained, train_end, drain_end, rejected, transport, evals, ..."""

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        meta = np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)
        np.savez(buf, meta=meta, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkerShard:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {name: np.array(z[name]) for name in _ARRAYS}
                meta = json.loads(bytes(z["meta"]).decode())
        except (ValueError, KeyError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"a worker's end-of-run result is unreadable: {exc}") from None
        if not isinstance(meta, dict):
            raise ShardError("a worker's end-of-run metadata is not a mapping")
        return cls(meta=meta, **arrays)
