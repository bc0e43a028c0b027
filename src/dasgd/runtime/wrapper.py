"""DASGD inside your own training loop, in the spirit of DistributedDataParallel.

    dist.init_process_group("gloo")                 # torchrun sets the environment
    model = Net(); opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dasgd_model = dasgd.DecentralizedSGD(model, opt)   # 1: wrap
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward()
        dasgd_model.step()                              # 2: instead of opt.step()
    report = dasgd_model.finish()                       # 3: drain; replicas agree

``step()`` applies the gradients that arrived from peers, applies this worker's own gradient at once with
the optimizer's stepsize, and pushes it to the peers; it never waits for anyone. ``finish()`` is the
end-of-run drain: every worker announces its gradient count and applies everything it is owed, then the
replicas are compared.

Only plain SGD is the faithful algorithm (fixed stepsize, no momentum, no weight decay, no Nesterov): those
would make updates depend on order and history, which is outside the theory. They are rejected with a
message rather than silently changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dasgd.algorithms import DASGD
from dasgd.core.ledger import StalenessLedger
from dasgd.core.topology import Topology, complete, parse_topology
from dasgd.runtime.clock import WallClock
from dasgd.runtime.loop import send_all
from dasgd.runtime.session import DistributedSession
from dasgd.transport.handshake import agree_run_nonce
from dasgd.transport.torchdist import TorchDistTransport
from dasgd.worker.protocol import Finished, StopPolicy, WorkerProtocol
from dasgd.worker.worker import Gradient, Worker

__all__ = ["DecentralizedSGD", "FinishReport"]


@dataclass(frozen=True)
class FinishReport:
    """What ``finish()`` found. Staleness numbers are exact for the run (computed at rank 0, sent to all)."""

    computed: int
    """Gradients this worker computed."""
    total_computed: int
    """Gradients all workers computed (T)."""
    applied: int
    """Gradients this replica holds at the end (should equal total_computed)."""
    lost: int
    """Gradients some replica is missing (0 unless a worker died)."""
    replicas_agree: bool
    max_replica_diff: float
    s_avg: float
    s_max: int
    loose_avg: float
    loose_max: int


class DecentralizedSGD:
    """Wrap ``model`` and its plain-SGD ``optimizer`` for DASGD over the default process group.

    Args:
        model: the local replica; its parameters are moved into one flat buffer (same Parameter objects).
        optimizer: a ``torch.optim.SGD`` over the model's parameters; its ``lr`` is the fixed stepsize.
        topology: "complete" (default), "ring", "torus", ... or a Topology.
        key: shared secret for HMAC-signed messages, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        topology: str | Topology = "complete",
        key: bytes | None = None,
    ) -> None:
        self._lr = _plain_sgd_lr(optimizer)
        self.session = DistributedSession("gloo")
        n, rank = self.session.world_size, self.session.rank
        topo = (
            topology
            if isinstance(topology, Topology)
            else (complete(n) if topology == "complete" else parse_topology(topology, n))
        )
        # Identical x0 everywhere, as the algorithm requires: rank 0's initial parameters win.
        # (through a CPU copy: the collective group is Gloo, whatever device the model is on)
        for p in model.parameters():
            host = p.data.detach().cpu()
            dist.broadcast(host, src=0, group=self.session.collective_group)
            p.data.copy_(host)
        self.worker = Worker(rank, n, model, topo, DASGD(), self._lr)
        params = self.worker.params
        nonce = agree_run_nonce(self.session.collective_group)  # binds every message to this run
        if params.is_cuda:
            # CUDA replicas: headers over Gloo, payloads over NCCL (see transport/splitplane.py).
            from dasgd.transport.splitplane import SplitPlaneTransport, make_data_groups

            up, down = make_data_groups("nccl")
            self.transport = SplitPlaneTransport(
                rank,
                n,
                params.numel(),
                params.dtype,
                params.device,
                self.session.p2p_group,
                up,
                down,
                key=key,
                nonce=nonce,
            )
        else:
            self.transport = TorchDistTransport(
                rank, n, params.numel(), params.dtype, group=self.session.p2p_group, key=key, nonce=nonce
            )
        self.clock = WallClock(self.session.shared_origin(time.time()))
        self.ledger = StalenessLedger(n)
        self.model = model
        self._clock_at_start = self.worker.clock.copy()
        self._t_start = self.clock.now()
        self._finished = False
        # No stop rules of its own: the user's loop decides when to stop; the drain keeps the default timeout.
        self.protocol = WorkerProtocol(
            self.worker, StopPolicy(accuracy_metric=None), self.ledger, start=self._t_start
        )

    @property
    def stop_requested(self) -> bool:
        """A peer asked everyone to stop (call ``request_stop()`` to ask them yourself)."""
        return self.worker.stop_requested

    def step(self) -> None:
        """Apply arrived gradients, apply and push this worker's own gradient (from ``param.grad``)."""
        if self._finished:
            raise RuntimeError("finish() was called; this DecentralizedSGD takes no more steps")
        from dasgd.worker.replica import flat_grad

        w, p = self.worker, self.protocol
        t_end = self.clock.now()
        grad = flat_grad(self.model, w.params)
        gradient = Gradient(grad, self._clock_at_start, float("nan"))
        send_all(self.transport, p.gradient_done(gradient, self._t_start, t_end))
        if w.diverged:
            send_all(self.transport, w.request_stop())  # the peers stop too, rather than wait for this one
            raise FloatingPointError(
                f"worker {w.rank}: the gradient holds a NaN or an infinity (the model diverged); it was not "
                "applied or sent, and every worker was asked to stop. Lower the learning rate, or check the loss "
                "for a division by zero or a log of zero"
            )
        # Gradients from peers land after our own one, so that the record above describes exactly the
        # replica the user's forward/backward pass ran on.
        dead = self.transport.stats().dead_peers  # before polling, so nothing a dead peer sent is left
        send_all(self.transport, p.receive(self.transport.poll(), dead))
        self._clock_at_start = w.clock.copy()
        self._t_start = self.clock.now()

    def request_stop(self) -> None:
        """Ask every worker to stop (e.g. when this one reached a target); they see ``stop_requested``."""
        send_all(
            self.transport, self.worker.request_stop()
        )  # a signal only: this worker goes on until finish()

    def finish(self, timeout: float = 300.0) -> FinishReport:
        """End of run: drain until every replica holds every gradient, then compare replicas."""
        if self._finished:
            raise RuntimeError("finish() was already called")
        self._finished = True
        p, transport = self.protocol, self.transport
        send_all(transport, p.stop(self.clock.now(), "finished", tell_peers=False))
        deadline = time.monotonic() + timeout
        while True:
            # Dead peers read before polling (what they sent is queued first): the drain completes without
            # them instead of waiting for a final count that will never come.
            dead = set(transport.stats().dead_peers)
            out, action = p.drain(self.clock.now(), transport.poll(), dead)
            send_all(transport, out)
            if isinstance(action, Finished):
                break
            if time.monotonic() > deadline:
                p.give_up(self.clock.now())
                raise TimeoutError(f"the drain did not complete in {timeout:.0f} s: a peer may be stuck")
            transport.wait(0.05)
        transport.flush(max(0.0, deadline - time.monotonic()))
        report = self._compare()
        self.transport.expect_shutdown()  # before any peer's SHUTDOWN can arrive (barrier below)
        self.session.barrier()
        self.transport.shutdown()
        return report

    def _compare(self) -> FinishReport:
        from dasgd.core.ledger import compute_staleness
        from dasgd.metrics.agreement import replica_tolerance

        g = self.session.collective_group
        w = self.worker
        n = w.world_size
        clocks = torch.from_numpy(w.clock.copy())
        hi, lo = w.params.detach().cpu().double().clone(), w.params.detach().cpu().double().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=g)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=g)
        cmin = clocks.clone()
        dist.all_reduce(cmin, op=dist.ReduceOp.MIN, group=g)
        counts = torch.zeros(n, dtype=torch.int64)
        counts[w.rank] = w.computed
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=g)
        origin, index, _, end, clock = self.ledger.arrays()
        rows = np.concatenate([origin[:, None], index[:, None], clock], axis=1).astype(np.int64)
        payload = np.concatenate([rows.ravel().view(np.uint8), end.astype(np.float64).view(np.uint8)])
        gathered = self.session.gather_bytes(payload.tobytes())
        stats = torch.zeros(4, dtype=torch.float64)
        if gathered is not None:
            o, i, e, c = [], [], [], []
            for blob in gathered:
                arr = np.frombuffer(blob, dtype=np.uint8)
                k = len(arr) // (8 * (n + 3))
                r = arr[: k * 8 * (n + 2)].view(np.int64).reshape(k, n + 2)
                o.append(r[:, 0])
                i.append(r[:, 1])
                c.append(r[:, 2:])
                e.append(arr[k * 8 * (n + 2) :].view(np.float64))
            st = compute_staleness(np.concatenate(o), np.concatenate(i), np.concatenate(e), np.concatenate(c))
            stats = torch.tensor([st.s_avg, st.s_max, st.loose_avg, st.loose_max], dtype=torch.float64)
        dist.broadcast(stats, src=0, group=g)
        total = int(counts.sum())
        lost = int(torch.clamp(counts - cmin, min=0).sum())
        diff = float((hi - lo).abs().max()) if hi.numel() else 0.0
        scale = max(1.0, float(hi.abs().max())) if hi.numel() else 1.0
        tol = replica_tolerance(np.dtype(str(w.params.dtype).replace("torch.", "")), total)
        agree = lost == 0 and int(w.clock.sum()) == total and diff / scale <= tol
        return FinishReport(
            w.computed,
            total,
            int(w.clock.sum()),
            lost,
            agree,
            diff,
            float(stats[0]),
            int(stats[1]),
            float(stats[2]),
            int(stats[3]),
        )

    def close(self) -> None:
        """Leave the process group if this object created it."""
        self.session.close()

    def __enter__(self) -> DecentralizedSGD:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _plain_sgd_lr(optimizer: torch.optim.Optimizer) -> float:
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"DecentralizedSGD needs torch.optim.SGD (fixed-stepsize SGD is the algorithm the theory covers), "
            f"got {type(optimizer).__name__}; adaptive optimizers are outside DASGD's guarantees"
        )
    lrs = set()
    for group in optimizer.param_groups:
        for key, bad in (("momentum", 0), ("weight_decay", 0), ("nesterov", False), ("dampening", 0)):
            if group.get(key, bad) != bad:
                raise ValueError(
                    f"DecentralizedSGD needs plain SGD, but the optimizer sets {key}={group[key]}; "
                    f"remove it (momentum and weight decay make updates order-dependent)"
                )
        lrs.add(float(group["lr"]))
    if len(lrs) != 1:
        raise ValueError(f"DecentralizedSGD needs one stepsize for all parameters, got {sorted(lrs)}")
    return lrs.pop()
