"""Checkpoints of a running DASGD run: each worker's part of a consistent global cut, on disk.

How the cut is taken (the Chandy-Lamport snapshot over the FIFO links; docs/design.md, "Checkpoints"): a
worker that starts checkpoint ``c`` (:meth:`WorkerProtocol.begin_checkpoint`), or that receives its first
MARKER(c), records its own state at once, sends a MARKER(c) on every outgoing link, and from then on records,
per incoming link, every message that arrives before that link's MARKER(c): the link's *channel state*. When
every incoming link has delivered its marker the worker's part is complete (:meth:`WorkerProtocol.
checkpoint_state`, a :class:`WorkerState`). Training never stops while it is taken.

What a :class:`WorkerState` holds: the replica (parameters and buffers), the vector clock, the own gradient
count, the final counts known, ids held past a gap, own gradients not yet sent (B > 1), the algorithm's
state, the protocol's (start, evaluation cadence, evaluations), the driver's (``extra``: the batch sampler's
and compute model's random state, JSON-able), and the channel state: the messages, as header fields plus
payload and clock tensors.

On disk, one directory per checkpoint::

    worker-00000.safetensors   the tensors of worker 0's part (replica, buffers, pending sum, channel)
    worker-00000.json          its metadata, with the SHA-256 of the tensor file
    ...
    MANIFEST.json              written last, once every part is there: the run's identity (``spec``), the
                               world size, the checkpoint id, and the SHA-256 of every part's metadata

Each file is written to a temporary name, fsynced and renamed (and the directory fsynced), so a reader sees a
file whole or not at all; a checkpoint without a manifest is partial and refused (:class:`CheckpointIncomplete`),
a file whose checksum does not match is refused (:class:`CheckpointCorrupt`), and a checkpoint of another run
(different task, world size, algorithm, ... as the caller's ``spec`` says) is refused
(:class:`CheckpointMismatch`). Tensors are safetensors (a header of dtypes, shapes and offsets, then raw
bytes: nothing is executed on load, unlike a pickle); everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dasgd.core.message import Kind, Message
from dasgd.errors import DasgdError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointIncomplete",
    "CheckpointMismatch",
    "MANIFEST",
    "WorkerState",
    "checkpoint_complete",
    "finalize_checkpoint",
    "read_checkpoint",
    "read_worker_checkpoint",
    "write_worker_checkpoint",
]

CHECKPOINT_FORMAT = 1
"""The on-disk format version this module writes and reads."""

MANIFEST = "MANIFEST.json"


class CheckpointError(DasgdError, ValueError):
    """A checkpoint cannot be read or taken."""


class CheckpointIncomplete(CheckpointError):
    """The checkpoint has no manifest, or a part is missing: it was never completed."""


class CheckpointCorrupt(CheckpointError):
    """A file of the checkpoint does not match its checksum or cannot be parsed."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint belongs to another run (task, world size, algorithm, ...)."""


@dataclass
class WorkerState:
    """One worker's part of checkpoint ``checkpoint``: its state at its local snapshot and its channel state."""

    checkpoint: int
    rank: int
    world_size: int
    time: float
    """The driver's time at the local snapshot (virtual seconds in the simulator)."""
    worker: dict
    """:meth:`dasgd.worker.worker.Worker.capture`: replica, clock, counts, algorithm state, ..."""
    protocol: dict
    """The protocol's: ``start``, ``next_eval``, ``evals``, ``last_metrics``."""
    extra: dict = field(default_factory=dict)
    """The driver's, JSON-able (the sampler's position and random state, the compute model's random state)."""
    channel: list[Message] = field(default_factory=list)
    """Messages that arrived after the local snapshot and before their link's marker, in arrival order: in
    flight across the cut, re-delivered first on resume."""

    @property
    def computed(self) -> int:
        return int(self.worker["computed"])

    @property
    def clock(self) -> np.ndarray:
        return np.asarray(self.worker["clock"], dtype=np.int64)

    @property
    def params(self) -> torch.Tensor:
        return self.worker["params"]


# -- writing ----------------------------------------------------------------------------------------------
def _part(rank: int) -> str:
    return f"worker-{rank:05d}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _canonical(spec: Mapping[str, Any]) -> dict:
    """The run identity as JSON keeps it (so a spec compares equal to itself read back)."""
    try:
        return json.loads(json.dumps(dict(spec), sort_keys=True))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the run's spec must be JSON-able data: {e}") from None


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else repr(float(x))


def _float(x: float | str) -> float:
    return float(x)


def write_worker_checkpoint(path: str | Path, state: WorkerState, spec: Mapping[str, Any]) -> None:
    """Write worker ``state.rank``'s part of a checkpoint into directory ``path`` (created if needed).

    ``spec``: the run's identity, JSON-able (task, world size, algorithm, ...): a reader refuses a checkpoint
    whose spec differs from its own. The part is written atomically; the checkpoint is complete only once
    :func:`finalize_checkpoint` wrote the manifest."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    w = dict(state.worker)
    tensors: dict[str, torch.Tensor] = {"params": w.pop("params").detach().reshape(-1).contiguous().cpu()}
    buffers = w.pop("buffers")
    for name, value in buffers.items():
        tensors[f"buffer.{name}"] = value.detach().contiguous().cpu()
    pending = w.pop("pending")
    if pending is not None:
        tensors["pending"] = pending.detach().reshape(-1).contiguous().cpu()
    tensors["clock"] = torch.from_numpy(np.ascontiguousarray(w.pop("clock"), dtype=np.int64))
    tensors["finals"] = torch.from_numpy(np.ascontiguousarray(w.pop("finals"), dtype=np.int64))
    headers = []
    for i, msg in enumerate(state.channel):
        if msg.payload is not None:
            tensors[f"channel.{i}.payload"] = msg.payload.detach().reshape(-1).contiguous().cpu().clone()
        if msg.clock is not None:
            tensors[f"channel.{i}.clock"] = torch.from_numpy(np.array(msg.clock, dtype=np.int64))
        headers.append([int(msg.kind), msg.sender, msg.origin, msg.lo, msg.hi])
    blob = st_save(tensors)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "spec": _canonical(spec),
        "checkpoint": int(state.checkpoint),
        "rank": int(state.rank),
        "world_size": int(state.world_size),
        "time": _json_number(state.time),
        "buffers": sorted(buffers),
        "worker": {**w, "gaps": {str(k): v for k, v in w["gaps"].items()}},
        "protocol": _sanitize(state.protocol),
        "extra": state.extra,
        "channel": headers,
        "tensors_sha256": _sha(blob),
    }
    _atomic_write(path / f"{_part(state.rank)}.safetensors", blob)
    _atomic_write(path / f"{_part(state.rank)}.json", json.dumps(meta, sort_keys=True).encode())


def _sanitize(protocol: dict) -> dict:
    out = dict(protocol)
    for key in ("start", "next_eval"):
        out[key] = _json_number(float(out[key]))
    return out


def finalize_checkpoint(path: str | Path, world_size: int, spec: Mapping[str, Any]) -> None:
    """Mark the checkpoint in ``path`` complete: check that every worker's part is there, whole and of this
    run, then write the manifest (atomically). Raises :class:`CheckpointIncomplete` when a part is missing."""
    path = Path(path)
    parts = {}
    cid = None
    for rank in range(world_size):
        meta_bytes, meta = _read_meta(path, rank)
        _check_part(path, rank, meta, world_size, _canonical(spec))
        if cid is None:
            cid = meta["checkpoint"]
        elif meta["checkpoint"] != cid:
            raise CheckpointMismatch(f"worker {rank}'s part is of checkpoint {meta['checkpoint']}, worker 0's of {cid}")
        parts[_part(rank)] = _sha(meta_bytes)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "checkpoint": cid,
        "world_size": world_size,
        "spec": _canonical(spec),
        "parts": parts,
    }
    _atomic_write(path / MANIFEST, json.dumps(manifest, sort_keys=True).encode())


def checkpoint_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a finalized checkpoint (a manifest); its files are checked only on read."""
    return (Path(path) / MANIFEST).is_file()


# -- reading ----------------------------------------------------------------------------------------------
def _read_meta(path: Path, rank: int) -> tuple[bytes, dict]:
    file = path / f"{_part(rank)}.json"
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointIncomplete(f"{path}: worker {rank}'s part ({file.name}) is missing") from None
    try:
        meta = json.loads(data)
    except ValueError as e:
        raise CheckpointCorrupt(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointCorrupt(f"{file}: not a dasgd checkpoint part of format {CHECKPOINT_FORMAT}")
    return data, meta


def _check_part(path: Path, rank: int, meta: dict, world_size: int, spec: dict) -> None:
    if meta.get("rank") != rank or meta.get("world_size") != world_size:
        raise CheckpointMismatch(
            f"{path}: the part of worker {rank} says rank {meta.get('rank')} of {meta.get('world_size')} workers; "
            f"this run has {world_size}"
        )
    _same_spec(path, meta.get("spec"), spec)
    tensors = path / f"{_part(rank)}.safetensors"
    if not tensors.is_file():
        raise CheckpointIncomplete(f"{path}: worker {rank}'s tensors ({tensors.name}) are missing")


def _same_spec(path: Path, saved: object, spec: dict) -> None:
    if saved == spec:
        return
    if not isinstance(saved, dict):
        raise CheckpointCorrupt(f"{path}: the checkpoint's run spec is not a mapping")
    keys = sorted(k for k in set(saved) | set(spec) if saved.get(k) != spec.get(k))
    diffs = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {spec.get(k)!r}" for k in keys)
    raise CheckpointMismatch(f"{path} is a checkpoint of another run ({diffs})")


def read_worker_checkpoint(path: str | Path, rank: int, spec: Mapping[str, Any], expected_sha: str | None = None) -> WorkerState:
    """Read worker ``rank``'s part (checked against ``expected_sha``, the manifest's, when given)."""
    path = Path(path)
    meta_bytes, meta = _read_meta(path, rank)
    if expected_sha is not None and _sha(meta_bytes) != expected_sha:
        raise CheckpointCorrupt(f"{path}: worker {rank}'s metadata does not match the manifest's checksum")
    _check_part(path, rank, meta, int(meta.get("world_size", -1)), _canonical(spec))
    blob = (path / f"{_part(rank)}.safetensors").read_bytes()
    if _sha(blob) != meta.get("tensors_sha256"):
        raise CheckpointCorrupt(f"{path}: worker {rank}'s tensors do not match their checksum")
    try:
        tensors = st_load(blob)
        w = dict(meta["worker"])
        w["params"] = tensors["params"]
        w["buffers"] = {name: tensors[f"buffer.{name}"] for name in meta["buffers"]}
        w["pending"] = tensors.get("pending")
        w["clock"] = tensors["clock"].numpy().copy()
        w["finals"] = tensors["finals"].numpy().copy()
        w["gaps"] = {int(k): v for k, v in w["gaps"].items()}
        channel = []
        for i, (kind, sender, origin, lo, hi) in enumerate(meta["channel"]):
            clock = tensors.get(f"channel.{i}.clock")
            channel.append(
                Message(
                    Kind(kind), int(sender), int(origin), int(lo), int(hi), tensors.get(f"channel.{i}.payload"),
                    None if clock is None else clock.numpy().copy(),
                )
            )
        protocol = dict(meta["protocol"])
        for key in ("start", "next_eval"):
            protocol[key] = _float(protocol[key])
        return WorkerState(
            checkpoint=int(meta["checkpoint"]),
            rank=rank,
            world_size=int(meta["world_size"]),
            time=_float(meta["time"]),
            worker=w,
            protocol=protocol,
            extra=meta["extra"],
            channel=channel,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorrupt(f"{path}: worker {rank}'s part is malformed ({type(e).__name__}: {e})") from None


def read_checkpoint(path: str | Path, spec: Mapping[str, Any]) -> list[WorkerState]:
    """Every worker's part of the checkpoint in ``path``, rank order, after checking that it is complete (a
    manifest), whole (checksums) and of the run ``spec`` describes."""
    path = Path(path)
    try:
        data = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointIncomplete(
            f"{path} has no {MANIFEST}: the checkpoint was never completed (a worker's part is missing or it was "
            "interrupted); resume from an earlier one"
        ) from None
    try:
        manifest = json.loads(data)
        world_size = int(manifest["world_size"])
        parts = manifest["parts"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(f"{path / MANIFEST} is malformed ({e})") from None
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointCorrupt(f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    _same_spec(path, manifest.get("spec"), _canonical(spec))
    states = []
    for rank in range(world_size):
        sha = parts.get(_part(rank)) if isinstance(parts, dict) else None
        if sha is None:
            raise CheckpointCorrupt(f"{path / MANIFEST} lists no part for worker {rank}")
        states.append(read_worker_checkpoint(path, rank, spec, sha))
    if any(s.checkpoint != manifest["checkpoint"] for s in states):
        raise CheckpointCorrupt(f"{path}: the parts are of different checkpoints")
    return states
