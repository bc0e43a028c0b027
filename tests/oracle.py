"""An independent oracle for real runs: every replica recomputed from the raw facts of its audit trail.

A run started with ``audit=True`` leaves, per worker, the initial parameters x0, the float64 gradients the
worker computed, the history of what its replica accepted (own gradients, remote gradient id ranges with the
clocks involved, models and where the models it sent were taken), and the final parameters
(src/dasgd/worker/audit.py). This module shares none of the code that decides what to apply: it replays each
history in float64 under the algorithm's stated rule, written here from the algorithm's documentation, and
compares the result with the parameters the replica really ended with. It also checks the gradient ids
themselves: none applied twice, none unknown to its origin, and every gradient of a live origin held by every
replica that must hold it. Agreement is checked on the parameters directly, never read from summary.json.

The rules (eta the stepsize, g_o[i] origin o's i-th gradient, n the live workers):
- dasgd: x -= eta * g for each own gradient and each remote id; nothing else changes x.
- dasgd-cap / dasgd-damped: a remote message covering ids [lo, hi) of o is applied with weight w(s):
  s = max(0, sum_j max(0, held'_j - clock_j) - (hi - lo)) where held' is the receiver's clock with the
  message's ids added and clock the message's clock (s = 0 without a clock); bound B = staleness_bound, or
  2 * world_size; cap: w = 1 if s <= B else cap_scale; damped: w = 1 / (1 + s / B). Own gradients: w = 1.
- sync: step k's gradients (own index k, remote id k) are summed; once n are in, x -= eta / n * sum, steps
  in order; at the end, any incomplete step is applied with its own count.
- ps-asgd: the server (rank 0) applies every gradient as dasgd; a worker's replica is the last server model
  it took (x = the server's replica when that model left).
- local-sgd: own gradients as dasgd; every model a worker sends is its round-r model; once the n round-r
  models are in (its own included), x = their mean, rounds in order.
- gossip: own gradients as dasgd; x = (x + y) / 2 for every model y it took.
A model taken by a replica is matched with the sender's k-th model to it (links are FIFO; models are never
merged), and its value is the sender's replica recomputed at the moment it left.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dasgd.worker.audit import load_audit, load_gradients

__all__ = ["OracleReport", "check_audits", "check_folder", "check_run", "param_tolerance"]

# Which replicas must hold every gradient of every live origin, by algorithm.
_HOLDERS = {
    "dasgd": "all",
    "dasgd-cap": "all",
    "dasgd-damped": "all",
    "sync": "all",
    "ps-asgd": "server",
    "local-sgd": "none",
    "gossip": "none",
}
# Algorithms whose replicas must end with equal parameters.
_AGREE = {"dasgd", "sync"}


@dataclass
class OracleReport:
    """What the oracle found. ``errors`` is empty when the run passed every check."""

    algorithm: str
    live: list[int]
    dead: list[int]
    errors: list[str] = field(default_factory=list)
    param_error: dict[int, float] = field(default_factory=dict)
    """Per live worker: max |recomputed - final parameters|."""
    replica_diff: float = 0.0
    """Max |x_a - x_b| over live replicas, from the parameters themselves."""
    tolerance: float = 0.0
    applied: dict[int, int] = field(default_factory=dict)
    """Per live worker: gradient ids its replica applied (algorithms that hold gradient sets)."""
    lost: int = 0
    """Gradients of dead workers (as many as they wrote before dying) that not every live holder applied."""


def param_tolerance(x: np.ndarray, updates: int) -> float:
    """How far a float32 replica may drift from its float64 recomputation.

    Each float32 update rounds to half an ulp (2^-24 relative); independent roundings add up like a random
    walk, so after U updates the error is about sqrt(U) * 2^-24 * |x|. We allow 32 times that (correlated
    rounding), at least 1e-6 * |x|. A gradient applied twice or skipped moves x by eta * |g|, orders of
    magnitude more on every workload the tests run (the negative controls check this).
    """
    scale = max(1.0, float(np.max(np.abs(x)))) if x.size else 1.0
    return scale * max(1e-6, 32.0 * 2.0**-24 * np.sqrt(max(1, updates)))


class _Replay:
    """One replica's history replayed in float64."""

    def __init__(self, rank: int, audit: dict[str, Any]) -> None:
        self.rank = rank
        self.audit = audit
        self.events = [e for e in audit["history"] if e[0] != "sent"]
        self.sent: dict[int, list[int]] = defaultdict(list)  # peer -> positions of the models sent to it
        for e in audit["history"]:
            if e[0] == "sent":
                self.sent[int(e[1])].append(int(e[2]))
        self.sent_positions = {p for ps in self.sent.values() for p in ps}
        self.snapshot_at: dict[int, np.ndarray] = {}
        self.x = audit["x0"].astype(np.float64).copy()
        self.pos = 0
        self.models_from: dict[int, int] = defaultdict(int)  # sender -> models taken so far
        self.ids: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.state: dict[str, Any] = {}
        self._save_snapshot()

    @property
    def done(self) -> bool:
        return self.pos >= len(self.events)

    def _save_snapshot(self) -> None:
        if self.pos in self.sent_positions:
            self.snapshot_at[self.pos] = self.x.copy()

    def snapshot_for(self, peer: int, k: int) -> np.ndarray | None:
        """The k-th model this replica sent to ``peer``, once the replay has reached it."""
        positions = self.sent.get(peer, [])
        if k >= len(positions):
            raise _Broken(
                f"worker {peer} took model #{k + 1} from worker {self.rank}, which sent only {len(positions)}"
            )
        return self.snapshot_at.get(positions[k])


class _Broken(Exception):
    """The recorded histories contradict each other (a message that was never sent, say)."""


def _rule(meta: dict[str, Any], grads: dict[int, np.ndarray], live: int):  # noqa: ANN202
    name = meta["algorithm"]
    lr = float(meta["lr"])
    n = int(meta["world_size"])
    bound = meta.get("staleness_bound") or 2 * n

    def block(origin: int, lo: int, hi: int) -> np.ndarray:
        g = grads.get(origin)
        if g is None or hi > len(g):
            raise _Broken(
                f"ids [{lo}, {hi}) of worker {origin} were applied, but it computed "
                f"{0 if g is None else len(g)}"
            )
        return g[lo:hi].sum(axis=0)

    def weight(origin: int, lo: int, hi: int, held: list[int], clock: list[int] | None) -> float:
        if name not in ("dasgd-cap", "dasgd-damped") or clock is None or len(clock) != len(held):
            return 1.0
        after = np.array(held, dtype=np.int64)
        if lo <= after[origin]:
            after[origin] = max(after[origin], hi)
        s = max(0, int(np.maximum(0, after - np.array(clock)).sum()) - (hi - lo))
        if name == "dasgd-cap":
            return 1.0 if s <= bound else float(meta.get("cap_scale", 0.0))
        return 1.0 / (1.0 + s / bound)

    def own(r: _Replay, index: int) -> None:
        r.ids[r.rank].append((index, index + 1))
        g = block(r.rank, index, index + 1)
        if name == "sync":
            _add_step(r, index, g, 1)
        elif name != "ps-asgd":
            r.x -= lr * g

    def gradient(r: _Replay, origin: int, lo: int, hi: int, held: list[int], clock: list[int] | None) -> None:
        r.ids[origin].append((lo, hi))
        g = block(origin, lo, hi)
        if name == "sync":
            _add_step(r, lo, g, hi - lo)
        elif name in ("local-sgd", "gossip"):
            raise _Broken(f"{name} never applies remote gradients, but worker {r.rank} took ids of {origin}")
        else:
            r.x -= lr * weight(origin, lo, hi, held, clock) * g

    def model(r: _Replay, sender: int, tag: int, snap: np.ndarray) -> None:
        if name == "ps-asgd":
            r.x = snap.copy()
        elif name == "gossip":
            r.x = (r.x + snap) / 2.0
        elif name == "local-sgd":
            r.state.setdefault("rounds", defaultdict(list))[tag].append(snap)
        else:
            raise _Broken(f"{name} sends no models, but worker {r.rank} took one from {sender}")

    def settle(r: _Replay) -> None:
        if name == "sync":
            steps = r.state.setdefault("steps", {})
            while r.state.get("next", 0) in steps and steps[r.state.get("next", 0)][1] >= live:
                k = r.state.get("next", 0)
                total, _ = steps.pop(k)
                r.x -= lr / live * total
                r.state["next"] = k + 1
        elif name == "local-sgd":
            rounds = r.state.setdefault("rounds", defaultdict(list))
            if r.pos in r.sent_positions:  # every model a local-sgd worker sends is its next round's
                rounds[r.state.get("own_round", 0)].append(r.snapshot_at[r.pos])
                r.state["own_round"] = r.state.get("own_round", 0) + 1
            while len(rounds.get(r.state.get("next", 0), [])) >= live:
                k = r.state.get("next", 0)
                r.x = np.mean(rounds.pop(k), axis=0)
                r.state["next"] = k + 1

    def finish(r: _Replay) -> None:
        if name == "sync":
            for _, (total, count) in sorted(r.state.get("steps", {}).items()):
                r.x -= lr / count * total

    return own, gradient, model, settle, finish


def _add_step(r: _Replay, step: int, g: np.ndarray, count: int) -> None:
    steps = r.state.setdefault("steps", {})
    total, c = steps.get(step, (np.zeros_like(g), 0))
    steps[step] = (total + g, c + count)


def check_audits(audits: dict[int, dict[str, Any] | None], grads: dict[int, np.ndarray]) -> OracleReport:
    """Check the audits of one run: ``audits[rank]`` is a loaded audit, None for a worker that died;
    ``grads[rank]`` the gradients each origin computed (a dead one's as far as they were written)."""
    live = sorted(r for r, a in audits.items() if a is not None)
    dead = sorted(r for r, a in audits.items() if a is None)
    meta = audits[live[0]]["meta"]
    name = meta["algorithm"]
    report = OracleReport(algorithm=name, live=live, dead=dead)
    n_live = len(audits) - len(meta.get("dead", []))
    own, gradient, model, settle, finish = _rule(meta, grads, n_live)
    replays = {r: _Replay(r, audits[r]) for r in live}
    try:
        _replay_all(replays, own, gradient, model, settle)
    except _Broken as exc:
        report.errors.append(str(exc))
        return report
    for r in live:
        finish(replays[r])
    updates = max(len(rp.events) for rp in replays.values()) + sum(len(g) for g in grads.values())
    report.tolerance = param_tolerance(audits[live[0]]["x0"], updates)
    for r in live:
        err = float(np.max(np.abs(replays[r].x - audits[r]["params"]))) if replays[r].x.size else 0.0
        report.param_error[r] = err
        if not err <= report.tolerance:
            report.errors.append(
                f"worker {r}: its parameters are {err:.3g} from the replay of its history under {name}'s rule "
                f"(tolerance {report.tolerance:.3g})"
            )
    _check_ids(report, replays, audits, grads)
    params = [audits[r]["params"] for r in live]
    report.replica_diff = max(float(np.max(np.abs(p - params[0]))) if p.size else 0.0 for p in params)
    # Replicas that hold different sets of a dead worker's gradients (the documented "lost" case) differ by
    # those gradients; agreement is expected only between replicas that hold the same set.
    if name in _AGREE and report.lost == 0 and not report.replica_diff <= report.tolerance:
        report.errors.append(
            f"replicas disagree: max parameter difference {report.replica_diff:.3g} "
            f"(tolerance {report.tolerance:.3g})"
        )
    return report


def _replay_all(replays: dict[int, _Replay], own, gradient, model, settle) -> None:  # noqa: ANN001
    """Step every replica as far as the models it takes allow, until all histories are replayed."""
    progress = True
    while progress:
        progress = False
        for rp in replays.values():
            while not rp.done:
                event = rp.events[rp.pos]
                kind = event[0]
                if kind == "model":
                    sender, tag, used = int(event[1]), int(event[2]), bool(event[3])
                    k = rp.models_from[sender]
                    if used:
                        if sender not in replays:
                            raise _Broken(f"worker {rp.rank} took a model from worker {sender}, which died")
                        snap = replays[sender].snapshot_for(rp.rank, k)
                        if snap is None:
                            break  # the sender's replay has not reached that model yet
                        model(rp, sender, tag, snap)
                    rp.models_from[sender] = k + 1
                elif kind == "own":
                    own(rp, int(event[1]))
                elif kind == "gradient":
                    gradient(rp, int(event[1]), int(event[2]), int(event[3]), event[4], event[5])
                else:
                    raise _Broken(f"worker {rp.rank}: unknown history entry {event!r}")
                rp.pos += 1
                rp._save_snapshot()
                settle(rp)
                progress = True
    stuck = [r for r, rp in replays.items() if not rp.done]
    if stuck:
        raise _Broken(f"workers {stuck} took models that their senders never reached (a causality cycle)")


def _check_ids(
    report: OracleReport,
    replays: dict[int, _Replay],
    audits: dict[int, dict[str, Any] | None],
    grads: dict[int, np.ndarray],
) -> None:
    holders = _HOLDERS[report.algorithm]
    if holders == "none":
        return
    for r, rp in replays.items():
        total = 0
        for origin, ranges in sorted(rp.ids.items()):
            held = np.zeros(len(grads.get(origin, ())), dtype=np.int64)
            for lo, hi in ranges:
                held[lo:hi] += 1
                total += hi - lo
            twice = np.flatnonzero(held > 1)
            if len(twice):
                report.errors.append(
                    f"worker {r} applied gradient {int(twice[0])} of worker {origin} {int(held[twice[0]])} "
                    f"times ({len(twice)} ids applied more than once)"
                )
            if holders == "all" or r == 0:
                if origin in report.live or origin == r:
                    missing = np.flatnonzero(held == 0)
                    if len(missing):
                        report.errors.append(
                            f"worker {r} never applied gradient {int(missing[0])} of live worker {origin} "
                            f"({len(missing)} missing)"
                        )
        report.applied[r] = total
    if holders == "all":
        for origin in report.dead:
            sets = [
                {i for lo, hi in replays[r].ids.get(origin, []) for i in range(lo, hi)} for r in report.live
            ]
            # Every gradient it computed (its rows, written before it could send any) that not every live
            # holder applied: held by some, or by none.
            report.lost += len(grads.get(origin, ())) - len(set.intersection(*sets))
        if holders == "all" or r == 0:
            for origin in report.live:
                if origin not in rp.ids and len(grads[origin]) and not (holders == "server" and origin == 0):
                    report.errors.append(f"worker {r} applied none of live worker {origin}'s gradients")


def check_folder(folder: Path, workers: int) -> OracleReport:
    """Check the audit trails in ``folder`` of a run of ``workers`` workers."""
    audits = {r: load_audit(folder, r) for r in range(workers)}
    live = [r for r, a in audits.items() if a is not None]
    if not live:
        raise AssertionError(
            f"no worker left an audit trail in {folder} (was the run started with audit=True?)"
        )
    dim = len(audits[live[0]]["x0"])
    grads = {r: (a["grads"] if a is not None else load_gradients(folder, r, dim)) for r, a in audits.items()}
    return check_audits(audits, grads)


def check_run(run_dir: Path) -> OracleReport:
    """Check the audit trails of the run in ``run_dir`` (started with audit=True)."""
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    return check_folder(run_dir / "audit", int(spec["workers"]))
