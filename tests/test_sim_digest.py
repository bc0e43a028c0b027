"""Simulated event logs are byte-identical for a given spec and seed, across refactors.

The digests below were taken from the tree before the worker protocol was restructured (commit 3a5dd3e),
and again after each change since: a refactor of the worker, the algorithms or the simulator that changes
any simulated event (an order, a time, a staleness, an evaluation) fails here. If a change is meant to alter
simulated runs, say why in its commit and take the new digests.
"""

from __future__ import annotations

import hashlib

import pytest

from dasgd.experiments.spec import resolve_spec
from dasgd.runs.simulate import simulate

PINNED = {
    # Retaken twice since: when survivors began routing around a dead worker on sparse graphs (the crash of
    # worker 4 on the ring used to cut the broadcast trees through it), and when a crashed worker's gradient
    # records began to stay in the event log (a real worker now streams them, so the simulator keeps them).
    "dasgd": "b92f5a2ab0b20269b856d152100219c80a75f2314f1f41b52fb7b6e72620c625",
    "gossip": "c358cde4177290e0f8a5c1ec4d066a360d9a9a0f0c67da8d2a9ed4c4cf35825c",
    "ps-asgd": "92cc75144f20b6cb7f64c8895f4783e822f686c6ba8eb471df9e3ef87135f54d",
    "dasgd-ring": "e6bfe33f9edc03f0d9434245b689e6232c669b6e1f3156f4eae11c816b60b4b2",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_a_small_simulated_run_writes_the_pinned_event_log(tmp_path, name):
    algorithm = name.removesuffix("-ring")
    spec = resolve_spec(
        {},
        simulate=True,
        task="quadratic",
        dim=8,
        workers=5,
        algorithm=algorithm,
        seed=3,
        max_gradients=300,
        topology="ring" if name.endswith("-ring") else "complete",
        # Log-normal compute and latency, and a crash: the paths a refactor is most likely to disturb.
        simulation={"latency": 0.002, "latency_sigma": 0.5, "compute": "lognormal", "crashes": ["4@0.2"]},
    )
    simulate(spec, tmp_path)
    assert hashlib.sha256((tmp_path / "events.jsonl").read_bytes()).hexdigest() == PINNED[name]
