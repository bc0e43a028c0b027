"""Checkpoints: the consistent cut (markers over FIFO links), its files, and resuming from it.

The cut's guarantees, checked on random schedules (hypothesis) with the in-process transport and in the
simulator: no saved replica holds a gradient its origin's saved state does not know; every gradient in flight
across the cut is saved exactly once (with its receiver's channel state); a run resumed from the cut drains to
agreeing replicas holding every gradient exactly once.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dasgd.core.message import Kind, Message
from dasgd.experiments.spec import resolve_spec
from dasgd.runs.build import build_sampler, build_task, build_worker, resolve, stop_policy
from dasgd.runs.simulate import compute_model, network_model
from dasgd.sim.engine import Simulation
from dasgd.sim.models import FailurePlan
from dasgd.transport.inproc import InProcessNetwork
from dasgd.transport.queue import CoalescingQueue
from dasgd.worker.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointIncomplete,
    CheckpointMismatch,
    finalize_checkpoint,
    read_checkpoint,
    write_worker_checkpoint,
)
from dasgd.worker.protocol import StopPolicy, WorkerProtocol


def _spec(workers=4, topology="complete", **kw):
    base = dict(task="quadratic", workers=workers, dim=6, noise=0.5, seed=5, topology=topology, max_gradients=10**9)
    base.update(kw)
    return resolve_spec({}, simulate=True, **base)


def _identity(spec) -> dict:
    return {"task": spec.task, "workers": spec.workers, "algorithm": spec.algorithm, "topology": spec.topology}


def _build(spec):
    task = build_task(spec)
    resolved = resolve(spec)
    samplers = [build_sampler(spec, r, task, resolved) for r in range(spec.workers)]
    workers = [build_worker(spec, r, task, resolved, sampler=samplers[r]) for r in range(spec.workers)]
    return task, samplers, workers


# -- the in-process harness: a schedule of computes and polls ------------------------------------------------
class Cluster:
    def __init__(self, spec, states=None):
        self.spec = spec
        self.task, self.samplers, self.workers = _build(spec)
        self.net = InProcessNetwork(spec.workers)
        self.ends = [self.net.endpoint(r) for r in range(spec.workers)]
        policy = StopPolicy(drain_timeout=1e9)
        if states is None:
            self.protos = [
                WorkerProtocol(w, policy, extra_state=self._extra(w.rank)) for w in self.workers
            ]
        else:
            self.protos = [WorkerProtocol.resume(w, policy, s) for w, s in zip(self.workers, states)]
            for sampler, s in zip(self.samplers, states):
                sampler.set_state(s.extra["sampler"])
        self.parts = [None] * spec.workers
        self.t = 0.0

    def _extra(self, r):
        return lambda: {"sampler": self.samplers[r].state()}

    def send(self, r, out):
        for peer, msg in out:
            self.ends[r].send(peer, msg)
        p = self.protos[r]
        if p.checkpoint_ready:
            self.parts[r] = p.checkpoint_state()

    def poll(self, r):
        self.t += 1
        out, _ = self.protos[r].step(self.t, self.ends[r].poll())
        self.send(r, out)

    def compute(self, r):
        self.t += 1
        g = self.workers[r].compute()
        self.send(r, self.protos[r].gradient_done(g, self.t, self.t))
        self.poll(r)

    def begin(self, r, cid=1):
        self.send(r, self.protos[r].begin_checkpoint(cid, self.t))

    def finish(self):
        """Stop every worker and drain to the end."""
        for r, p in enumerate(self.protos):
            self.send(r, p.stop(self.t, "test", tell_peers=False))
        for _ in range(4 * self.spec.workers):
            for r, p in enumerate(self.protos):
                if p.phase.value == "draining":
                    out, _ = p.drain(self.t, self.ends[r].poll(), ())
                    self.send(r, out)
        assert all(p.phase.value == "done" for p in self.protos)


def _check_cut(states):
    """The cut's guarantees, from the saved parts alone."""
    n = len(states)
    computed = [s.computed for s in states]
    for s in states:
        assert (s.clock <= np.array(computed)).all(), "a saved replica holds gradients its origin never saved"
        assert s.clock[s.rank] == s.computed
        held = {j: int(s.clock[j]) for j in range(n)}
        for msg in s.channel:
            if msg.kind == Kind.GRADIENT:
                # In flight across the cut exactly once: it continues what the receiver saved, without overlap.
                assert msg.lo == held[msg.origin], (s.rank, msg.origin, msg.lo, held[msg.origin])
                held[msg.origin] = msg.hi
        # Saved clock plus channel never goes past the origin's saved count.
        assert all(held[j] <= computed[j] for j in range(n))
    return computed


def _check_end(cluster, expected_total=None):
    n = len(cluster.workers)
    counts = np.array([w.computed for w in cluster.workers])
    ref = cluster.workers[0].params
    for w in cluster.workers:
        assert (w.clock == counts).all(), (w.rank, w.clock, counts)
        assert w.rejected["duplicate"] == 0 and not w.has_gaps
        torch.testing.assert_close(w.params, ref, rtol=1e-9, atol=1e-9)
    if expected_total is not None:
        assert counts.sum() == expected_total
    assert n == len(counts)


ops = st.lists(st.tuples(st.sampled_from(["compute", "poll"]), st.integers(0, 4)), min_size=4, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=ops,
    during=ops,
    after=ops,
    topology=st.sampled_from(["complete", "ring"]),
    n=st.integers(2, 5),
    initiator=st.integers(0, 4),
    gpm=st.sampled_from([1, 2]),
)
def test_a_cut_on_a_random_schedule_is_consistent_and_resumes_exactly_once(
    tmp_path, before, during, after, topology, n, initiator, gpm
):
    spec = _spec(workers=n, topology=topology, grads_per_message=gpm)
    c = Cluster(spec)
    for op, r in before:
        getattr(c, op)(r % n)
    c.begin(initiator % n)
    for op, r in during:
        getattr(c, op)(r % n)  # training goes on while markers travel
    rounds = 0
    while not all(c.parts) and rounds < 3 * n:
        for r in range(n):
            c.poll(r)
        rounds += 1
    assert all(c.parts), "every worker's part completes once every marker arrived"
    states = c.parts
    computed = _check_cut(states)
    # Through the files: what is read back is what was saved.
    ident = _identity(spec)
    for s in states:
        write_worker_checkpoint(tmp_path, s, ident)
    finalize_checkpoint(tmp_path, n, ident)
    back = read_checkpoint(tmp_path, ident)
    for a, b in zip(states, back):
        assert torch.equal(a.params, b.params) and (a.clock == b.clock).all() and len(a.channel) == len(b.channel)
    # The original run finishes; so does the resumed one: each drains to agreeing replicas, exactly once.
    c.finish()
    _check_end(c)
    r2 = Cluster(spec, back)
    assert [w.computed for w in r2.workers] == computed  # each origin's ids continue from its saved count
    for op, r in after:
        getattr(r2, op)(r % n)
    r2.finish()
    _check_end(r2, expected_total=sum(computed) + sum(op == "compute" for op, _ in after))


def test_in_flight_gradients_are_recorded_in_the_receivers_channel_state():
    """A gradient sent before its sender's snapshot and received after its receiver's is saved by the
    receiver, and delivered again on resume (it is not in the receiver's saved replica)."""
    spec = _spec(workers=2)
    c = Cluster(spec)
    c.compute(1)  # worker 1's gradient 0 is in worker 0's inbox
    c.begin(0)  # worker 0 saves before it sees it; its MARKER goes to 1
    c.poll(0)  # gradient 0 of worker 1 arrives before 1's marker: channel state
    c.poll(1)  # worker 1 saves (its own count 1) and answers with its marker
    c.poll(0)
    s0, s1 = c.parts
    assert s0.clock[1] == 0 and s1.computed == 1
    assert [(m.kind, m.origin, m.lo, m.hi) for m in s0.channel] == [(Kind.GRADIENT, 1, 0, 1)]
    r2 = Cluster(spec, [s0, s1])
    r2.poll(0)
    assert r2.workers[0].clock[1] == 1  # delivered again first
    r2.finish()
    _check_end(r2, expected_total=1)


def test_a_marker_is_a_coalescing_barrier():
    """A gradient queued after any link's marker never merges into one queued before it (an inbox holds the
    messages of every link; it would move a message sent after the cut ahead of a marker)."""
    g = torch.ones(2)
    for marker_sender in (1, 2):
        q = CoalescingQueue()
        q.put(Message(Kind.GRADIENT, 1, 1, 0, 1, g))
        q.put(Message(Kind.MARKER, marker_sender, marker_sender, 7, 7))
        q.put(Message(Kind.GRADIENT, 1, 1, 1, 2, g))
        q.put(Message(Kind.GRADIENT, 1, 1, 2, 3, g))  # merges after the marker as before it
        got = [(m.kind, m.lo, m.hi) for m in q.drain()]
        assert got == [(Kind.GRADIENT, 0, 1), (Kind.MARKER, 7, 7), (Kind.GRADIENT, 1, 3)]


def test_refused_checkpoints_say_why():
    spec = _spec(workers=2)
    c = Cluster(spec)
    c.send(0, c.protos[0].stop(0.0, "test"))
    with pytest.raises(CheckpointError, match="draining"):
        c.begin(0)
    dead = Cluster(_spec(workers=3))
    dead.workers[0].declare_dead(2)
    with pytest.raises(CheckpointError, match="died"):
        dead.begin(0)
    sync = Cluster(_spec(workers=2, algorithm="sync"))
    with pytest.raises(CheckpointError, match="sync cannot be checkpointed"):
        sync.begin(0)


def test_a_stop_during_a_cut():
    """A worker that stopped before the marker reached it refuses it (the checkpoint never completes); one
    that stops after its snapshot finishes its part in its drain."""
    c = Cluster(_spec(workers=3))
    c.compute(0)
    c.send(2, c.protos[2].stop(c.t, "test", tell_peers=False))
    c.begin(0)
    for r in range(3):
        c.poll(r) if r != 2 else c.send(2, c.protos[2].drain(c.t, c.ends[2].poll(), ())[0])
    assert "draining" in c.protos[2].checkpoint_refused and c.parts[2] is None
    c = Cluster(_spec(workers=2))
    c.begin(0)
    c.send(0, c.protos[0].stop(c.t, "test", tell_peers=False))  # after the snapshot: FINAL follows the marker
    c.poll(1)
    assert c.parts[1] is not None and c.parts[1].channel == []
    c.send(0, c.protos[0].drain(c.t, c.ends[0].poll(), ())[0])
    assert c.parts[0] is not None and c.parts[0].worker["computed"] == 0


def test_sampler_state_continues_the_stream():
    spec = _spec(workers=1)
    task = build_task(spec)
    a, b = (build_sampler(spec, 0, task, resolve(spec)) for _ in range(2))
    for _ in range(3):
        a.next()
    b.set_state(json.loads(json.dumps(a.state())))
    assert torch.equal(a.next().x, b.next().x)


# -- the simulator ---------------------------------------------------------------------------------------------
def _sim(spec, **kw):
    task, samplers, workers = _build(spec)
    policy = stop_policy(spec, task, simulated=True)
    return Simulation(
        workers, samplers, task, compute_model(spec), network_model(spec), FailurePlan(), policy, spec.seed, **kw
    )


@pytest.mark.parametrize("topology", ["complete", "ring"])
def test_a_simulated_checkpoint_does_not_perturb_the_run_and_resumes_exactly_once(tmp_path, topology):
    spec = _spec(workers=5, topology=topology, max_gradients=400, simulation={"compute": "lognormal", "compute_sigma": 0.3})
    plain = _sim(spec)
    out_plain = plain.run()
    taken = _sim(spec, checkpoint_at=0.05)
    out_taken = taken.run()
    # Markers ride the links beside the gradients and are taken out before any worker sees them: on this
    # network (unlimited bandwidth) the run is the same, gradient for gradient and bit for bit.
    for a, b in zip(plain.workers, taken.workers):
        assert torch.equal(a.params, b.params) and (a.clock == b.clock).all()
    for a, b in zip(out_plain.records.arrays(), out_taken.records.arrays()):
        assert np.array_equal(a, b)
    assert taken.checkpoint_complete
    states = taken.checkpoint
    computed = _check_cut(states)
    assert 0 < sum(computed) < sum(w.computed for w in taken.workers)
    ident = _identity(spec)
    for s in states:
        write_worker_checkpoint(tmp_path, s, ident)
    finalize_checkpoint(tmp_path, spec.workers, ident)
    resumed = _sim(spec, resume=read_checkpoint(tmp_path, ident))
    out_resumed = resumed.run()
    counts = np.array([w.computed for w in resumed.workers])
    for w in resumed.workers:
        assert (w.clock == counts).all() and w.rejected["duplicate"] == 0
        torch.testing.assert_close(w.params, resumed.workers[0].params)
    # The ledger of the resumed run numbers each origin's gradients from its saved count on, without a gap.
    origin, index = out_resumed.records.arrays()[:2]
    for j in range(spec.workers):
        assert np.array_equal(np.sort(index[origin == j]), np.arange(computed[j], counts[j]))
    # And it replays the rest of the run that took the checkpoint exactly: each worker restarts at the
    # virtual time of its snapshot with its sampler and compute-time generator where they were, and each
    # message of the channel state arrives when it arrived then. Same gradients (same records: start, end,
    # vector clock at the start, so the same staleness), same stop, bit-identical replicas.
    for a, b in zip(taken.workers, resumed.workers):
        assert torch.equal(a.params, b.params) and (a.clock == b.clock).all()
    after = _records_after(out_taken.records.arrays(), computed)
    for a, b in zip(after, _records_after(out_resumed.records.arrays(), computed)):
        assert np.array_equal(a, b)
    assert out_taken.stop_reason == out_resumed.stop_reason and out_taken.train_end == out_resumed.train_end
    assert out_taken.end_time == out_resumed.end_time


def _records_after(arrays, computed):
    """The records of gradients computed after each origin's snapshot, ordered by (origin, index)."""
    origin, index, start, end, clock = arrays
    keep = index >= np.array(computed)[origin]
    order = np.lexsort((index[keep], origin[keep]))
    return [x[keep][order] for x in (origin, index, start, end, np.asarray(clock))]


# -- the reader's bad input -----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    spec = _spec(workers=3)
    c = Cluster(spec)
    c.compute(0)
    c.compute(2)
    c.begin(1)
    for _ in range(3):
        for r in range(3):
            c.poll(r)
    ident = _identity(spec)
    for s in c.parts:
        write_worker_checkpoint(tmp_path, s, ident)
    return tmp_path, spec, ident


def test_a_checkpoint_without_manifest_is_partial(saved):
    path, spec, ident = saved
    with pytest.raises(CheckpointIncomplete, match="never completed"):
        read_checkpoint(path, ident)
    (path / "worker-00002.json").unlink()
    with pytest.raises(CheckpointIncomplete, match="worker 2"):
        finalize_checkpoint(path, 3, ident)


def test_a_corrupted_tensor_file_is_detected(saved):
    path, spec, ident = saved
    finalize_checkpoint(path, 3, ident)
    assert len(read_checkpoint(path, ident)) == 3
    f = path / "worker-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="worker 1's tensors"):
        read_checkpoint(path, ident)


def test_corrupted_metadata_is_detected(saved):
    path, spec, ident = saved
    finalize_checkpoint(path, 3, ident)
    f = path / "worker-00000.json"
    f.write_text(f.read_text().replace('"computed": 1', '"computed": 9'))
    with pytest.raises(CheckpointCorrupt, match="manifest"):
        read_checkpoint(path, ident)


def test_a_checkpoint_of_another_run_is_refused(saved):
    path, spec, ident = saved
    finalize_checkpoint(path, 3, ident)
    with pytest.raises(CheckpointMismatch, match="task"):
        read_checkpoint(path, {**ident, "task": "mnist-mlp"})
    with pytest.raises(CheckpointMismatch, match="workers"):
        read_checkpoint(path, {**ident, "workers": 4})
    states = read_checkpoint(path, ident)
    other = _spec(workers=4)
    _, _, workers = _build(other)
    with pytest.raises(CheckpointError, match="cannot resume"):
        WorkerProtocol.resume(workers[0], StopPolicy(), states[0])
    bigger = _build(dataclasses.replace(_spec(workers=3, dim=7)))[2]
    with pytest.raises(CheckpointError, match="values"):
        WorkerProtocol.resume(bigger[0], StopPolicy(), states[0])
