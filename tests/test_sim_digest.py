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
    "dasgd": "e46d7c58b1ec444de505a166711db6cd32cded2a72bdee36eb4363cc672a018e",
    "gossip": "0d99fac0ca002c701b333a6b7552c7a088547b0d704c0f1d5aa3c6c8e61a3e64",
    "ps-asgd": "ec5f3bce89265e393200cc955957a2fdb2f7ddf6d359b85bee3e9f2c58f72af2",
    # Retaken when survivors began routing around a dead worker on sparse graphs (the crash of worker 4 on
    # the ring used to cut the broadcast trees through it; now its neighbours reroute and tell the others).
    "dasgd-ring": "a027b722da0bc6cb4f7f37187fe6bb5c6293a214b38182f969940a4196bc9229",
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
