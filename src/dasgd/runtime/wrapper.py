"""DASGD inside your own training loop, in the spirit of DistributedDataParallel.

    dist.init_process_group("gloo")                 # torchrun sets the environment
    model = Net(); opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dasgd_model = dasgd.DecentralizedSGD(model, opt)   # 1: wrap
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward()
        dasgd_model.step()                              # 2: instead of opt.step()
    report = dasgd_model.finish()                       # 3: drain; replicas agree

``step()`` applies this worker's own *update* at once, pushes it to the peers, then applies the updates that
arrived from peers; it never waits for anyone. ``finish()`` is the end-of-run drain: every worker announces
its count and applies everything it is owed, buffers are averaged, then the replicas are compared.

What travels is an update vector ``u``, with the sender's stepsize folded in, and every replica (the
sender's own included) applies it as ``x -= u``:

- faithful mode (the default): ``u = lr_t * g``, ``lr_t`` read from the optimizer at this step, so learning-
  rate schedulers work, and a receiver never re-scales a peer's update with its own (possibly different)
  current stepsize. Only plain SGD is accepted; momentum, Nesterov, weight decay and other optimizers are
  refused with a message naming ``faithful=False``.
- practical mode (``faithful=False``): the user's optimizer runs on this worker's own gradient, as a local
  preconditioner (momentum, Nesterov, weight decay, Adam, AdamW, ...); ``u`` is the change its ``step()``
  made. Outside the paper's theory, and reported as such.

Either way every replica applies the same set of update vectors, and vector addition commutes, so replicas
agree at the end up to float rounding: that is what ``FinishReport.replicas_agree`` checks.

Guards (every step, cheap): the model must stay where it was wrapped (no ``model.to(...)``, no freezing or
unfreezing), nothing else may write the parameters (a second ``optimizer.step()``, ``model.load_state_dict``
mid-run, in-place edits), and a dead transport thread is raised at once. Every failure is a
:mod:`dasgd.errors` exception. docs/wrapper.md has the full story.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dasgd.algorithms import DASGD
from dasgd.core.ledger import StalenessLedger
from dasgd.core.topology import Topology, complete, parse_topology
from dasgd.errors import (
    DivergedError,
    DrainTimeoutError,
    ModelChangedError,
    OutsideWriteError,
    SetupError,
    SnapshotError,
    TransportFailedError,
    UnsupportedModelError,
    UnsupportedOptimizerError,
    WrapperStateError,
)
from dasgd.runtime.clock import WallClock
from dasgd.runtime.loop import send_all
from dasgd.runtime.session import DistributedSession
from dasgd.runtime.wrapper_log import TensorBoardMissing, WrapperScalars, require_tensorboard
from dasgd.transport.handshake import agree_run_nonce
from dasgd.transport.torchdist import TorchDistTransport
from dasgd.worker.protocol import Finished, StopPolicy, WorkerProtocol
from dasgd.worker.replica import ReplicaError, flat_grad
from dasgd.worker.worker import Gradient, Worker

__all__ = ["SUPPORTED_DTYPES", "DecentralizedSGD", "FinishReport"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""Parameter dtypes a replica may have (what the wire carries). Integer and complex parameters are refused."""

_SNAPSHOT_FORMAT = "dasgd.DecentralizedSGD/1"


@dataclass(frozen=True)
class FinishReport:
    """What ``finish()`` found. Staleness numbers are exact for the run (computed at rank 0, sent to all)."""

    computed: int
    """Updates this worker computed (including those of a snapshot loaded at start-up)."""
    total_computed: int
    """Updates all workers computed (T)."""
    applied: int
    """Updates this replica holds at the end (should equal total_computed)."""
    lost: int
    """Updates some replica is missing (0 unless a worker died)."""
    replicas_agree: bool
    """Every replica holds every update, parameters agree within ``tolerance`` and buffers are equal."""
    max_replica_diff: float
    s_avg: float
    s_max: int
    loose_avg: float
    loose_max: int
    faithful: bool = True
    """Faithful mode (plain SGD, the algorithm the theory covers); False: practical mode, outside it."""
    stepsize_constant: bool = True
    """Every own update used the same stepsize(s). False: a schedule ran, which is outside the paper's
    fixed-stepsize setting (replicas still agree: each update carries its sender's stepsize)."""
    stepsize_min: float = math.nan
    """Smallest stepsize this worker used (the first parameter group's lr), NaN without updates."""
    stepsize_max: float = math.nan
    """Largest stepsize this worker used (the first parameter group's lr), NaN without updates."""
    tolerance: float = 0.0
    """Relative parameter difference still counted as agreement (depends on the dtype and T)."""
    buffers: int = 0
    """Buffers averaged at finish (BatchNorm running statistics, counters, ...)."""
    buffer_spread: float = 0.0
    """Largest difference between replicas' buffers before they were averaged (how far they drifted)."""
    max_buffer_diff: float = 0.0
    """Largest difference between replicas' buffers after averaging (0 when they agree)."""


class DecentralizedSGD:
    """Wrap ``model`` and its ``optimizer`` for DASGD over the default process group.

    Args:
        model: the local replica; its trainable parameters are moved into one flat buffer (same Parameter
            objects). Move and cast it (``.to(device, dtype)``) and choose what is frozen *before* wrapping.
        optimizer: over exactly the model's trainable parameters. Faithful mode: ``torch.optim.SGD`` without
            momentum, dampening, Nesterov or weight decay, one lr for all groups (read at every step, so a
            learning-rate scheduler works). Practical mode: any optimizer whose ``step()`` needs no closure.
        topology: "complete" (default), "ring", "torus", ... or a Topology.
        key: shared secret for HMAC-signed messages, or None.
        faithful: False runs the optimizer as a local preconditioner (practical mode, outside the theory).
        tensorboard: a directory for TensorBoard scalars (throughput, staleness, and what the loop logs with
            :meth:`log_scalar`), every rank into the same one; needs ``pip install 'dasgd[tensorboard]'``.

    Raises:
        UnsupportedOptimizerError, UnsupportedModelError: (ValueError) what is wrong and what to do instead.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        topology: str | Topology = "complete",
        key: bytes | None = None,
        *,
        faithful: bool = True,
        tensorboard: str | os.PathLike[str] | None = None,
    ) -> None:
        if tensorboard is not None:
            try:
                require_tensorboard()  # before any collective: every rank refuses alike
            except TensorBoardMissing as exc:
                raise SetupError(str(exc)) from None
        self.faithful = bool(faithful)
        self.model = model
        self.optimizer = optimizer
        _check_model(model, optimizer)
        if self.faithful:
            _faithful_lr(optimizer)
        else:
            _check_practical(optimizer)
        self.session = DistributedSession("gloo")
        n, rank = self.session.world_size, self.session.rank
        topo = (
            topology
            if isinstance(topology, Topology)
            else (complete(n) if topology == "complete" else parse_topology(topology, n))
        )
        # Identical x0 and buffers everywhere, as the algorithm requires: rank 0's win.
        # (through CPU copies: the collective group is Gloo, whatever device the model is on)
        for t in [*model.parameters(), *model.buffers()]:
            host = _host(t)
            dist.broadcast(host, src=0, group=self.session.collective_group)
            _write_back(t, host)
        try:
            # Stepsize 1: every message carries an update with its sender's stepsize folded in (module docstring).
            self.worker = Worker(rank, n, model, topo, DASGD(), 1.0)
        except ReplicaError as exc:
            raise UnsupportedModelError(str(exc)) from exc
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
        self._clock_at_start = self.worker.clock.copy()
        self._t_start = self.clock.now()
        self._finished = False
        self._steps = 0
        self._base = np.zeros(n, dtype=np.int64)  # the clock a snapshot loaded at start-up brought
        self._lrs = array("d")  # the stepsize (first group's lr) of every own update
        self._lr_groups: tuple[float, ...] | None = None
        self._lr_varied = False
        # What the guards compare with: where each trainable parameter lives, and what is frozen.
        names = {id(p): name for name, p in model.named_parameters()}
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._watch = [(p, names.get(id(p), "?"), p.data_ptr(), p.dtype, p.device) for p in self._trainable]
        self._frozen = [(p, names.get(id(p), "?")) for p in model.parameters() if not p.requires_grad]
        self._all_params = [(p, names.get(id(p), "?")) for p in model.parameters()]
        self._version = self._param_version()
        self._own_call = False
        self._hook = optimizer.register_step_pre_hook(self._on_optimizer_step)
        self._scalars = WrapperScalars(tensorboard, rank) if tensorboard is not None else None
        # No stop rules of its own: the user's loop decides when to stop; the drain keeps the default timeout.
        self.protocol = WorkerProtocol(
            self.worker, StopPolicy(accuracy_metric=None), self.ledger, start=self._t_start
        )

    @property
    def stop_requested(self) -> bool:
        """A peer asked everyone to stop (call ``request_stop()`` to ask them yourself)."""
        return self.worker.stop_requested

    @property
    def stepsizes(self) -> list[float]:
        """The stepsize (first parameter group's lr) of each own update, in order."""
        return self._lrs.tolist()

    # -- training -----------------------------------------------------------------------------------------
    def step(self) -> None:
        """Apply and push this worker's own update (from ``param.grad``), then apply arrived updates.

        Raises:
            ModelChangedError, OutsideWriteError: (RuntimeError) the model changed under the wrapper.
            UnsupportedOptimizerError: the optimizer's settings changed to something the mode refuses.
            DivergedError: (FloatingPointError) the own update holds a NaN or infinity.
            TransportFailedError: a transport thread died (its exception chained).
        """
        if self._finished:
            raise WrapperStateError("finish() was called; this DecentralizedSGD takes no more steps")
        self._check_transport()
        self._check_model()
        w, p = self.worker, self.protocol
        t_end = self.clock.now()
        update = self._own_update()
        gradient = Gradient(update, self._clock_at_start, float("nan"))
        send_all(self.transport, p.gradient_done(gradient, self._t_start, t_end))
        if w.diverged:
            send_all(self.transport, w.request_stop())  # the peers stop too, rather than wait for this one
            raise DivergedError(
                f"worker {w.rank}: the update holds a NaN or an infinity (the model diverged); it was not "
                "applied or sent, and every worker was asked to stop. Lower the learning rate, or check the loss "
                "for a division by zero or a log of zero"
            )
        # Updates from peers land after our own one, so that the record above describes exactly the
        # replica the user's forward/backward pass ran on.
        dead = self.transport.stats().dead_peers  # before polling, so nothing a dead peer sent is left
        send_all(self.transport, p.receive(self.transport.poll(), dead))
        self._steps += 1
        self._version = self._param_version()
        self._clock_at_start = w.clock.copy()
        self._t_start = self.clock.now()
        if self._scalars is not None:
            self._scalars.after_step(w.computed, w.applied, self._t_start)

    def log_scalar(self, tag: str, value: float) -> None:
        """Log ``value`` (a loss, an accuracy) under ``tag`` for this worker, at its own update count, into the
        TensorBoard directory given as ``tensorboard=`` (nothing without one)."""
        if self._scalars is not None:
            self._scalars.user(tag, float(value), self.worker.computed)

    def _own_update(self) -> torch.Tensor:
        """This step's update vector ``u`` (applied as ``x -= u`` everywhere); records the stepsize."""
        groups = self.optimizer.param_groups
        lr = _faithful_lr(self.optimizer) if self.faithful else 0.0  # settings may change mid-run
        lrs = tuple(float(g["lr"]) for g in groups)
        if self._lr_groups is None:
            self._lr_groups = lrs
        elif lrs != self._lr_groups:
            self._lr_varied = True
        self._lrs.append(lrs[0])
        params = self.worker.params
        if self.faithful:
            update = flat_grad(self.model, params)  # a fresh tensor
            update.mul_(-lr if groups[0].get("maximize", False) else lr)
            # The update is the optimizer's step: tell a learning-rate scheduler that one happened, so it
            # does not warn that its step() came before the optimizer's.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            return update
        # Practical mode: the optimizer takes its step on this replica, we read what it changed, undo it,
        # and let the worker apply it (and push it) like any other update.
        before = params.detach().clone()
        self._own_call = True
        try:
            self.optimizer.step()
        finally:
            self._own_call = False
        update = before - params.detach()
        params.copy_(before)
        return update

    def request_stop(self) -> None:
        """Ask every worker to stop (e.g. when this one reached a target); they see ``stop_requested``."""
        send_all(
            self.transport, self.worker.request_stop()
        )  # a signal only: this worker goes on until finish()

    # -- guards --------------------------------------------------------------------------------------------
    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._own_call and not self._finished:
            raise OutsideWriteError(
                "optimizer.step() was called on the optimizer wrapped by DecentralizedSGD: call trainer.step() "
                "instead (it applies the update and sends it to the peers; optimizer.step() would change this "
                "replica alone, and the replicas would stop agreeing)"
            )

    def _param_version(self) -> int:
        # Every in-place write through a Parameter (optimizer steps, load_state_dict, edits under no_grad)
        # bumps its version counter; the wrapper's own writes go to the flat buffer, whose counter is apart.
        return sum(p._version for p in self._trainable)

    def _check_model(self) -> None:
        """Refuse, naming the change, a model that no longer lives in the wrapper's flat buffer."""
        current = list(self.model.parameters())
        if len(current) != len(self._all_params):
            raise ModelChangedError(
                "the model gained or lost parameters after wrapping: build the whole model first, then wrap it"
            )
        for new, (old, name) in zip(current, self._all_params):
            if new is not old:
                how = (
                    f"model.to({str(new.device)!r}) after wrapping. Move the model first, then wrap it"
                    if new.device != old.device
                    else f"model.to({new.dtype}) after wrapping. Cast the model first, then wrap it"
                    if new.dtype != old.dtype
                    else "a new Parameter was assigned after wrapping. Set up the model first, then wrap it"
                )
                raise ModelChangedError(f"parameter {name!r} was replaced by another Parameter: {how}")
        for p, name, ptr, dtype, device in self._watch:
            if p.dtype != dtype:
                raise ModelChangedError(
                    f"parameter {name!r} is {p.dtype} now but was {dtype} when wrapped: model.to({p.dtype}) "
                    "(or .half(), .double(), ...) after wrapping. Cast the model first, then wrap it"
                )
            if p.device != device:
                raise ModelChangedError(
                    f"parameter {name!r} is on {p.device} now but was on {device} when wrapped: model.to("
                    f"{str(p.device)!r}) after wrapping. Move the model first, then wrap it"
                )
            if p.data_ptr() != ptr:
                raise ModelChangedError(
                    f"parameter {name!r} no longer lives in the wrapper's buffer (its .data was replaced after "
                    "wrapping): the wrapper would not see its updates. Set up the model first, then wrap it"
                )
            if not p.requires_grad:
                raise ModelChangedError(
                    f"parameter {name!r} was frozen (requires_grad=False) after wrapping: the set of trained "
                    "parameters is fixed when wrapping. Freeze it before wrapping, or set its group's lr to 0"
                )
            g = p.grad
            if g is not None and g.layout != torch.strided:
                raise UnsupportedModelError(
                    f"parameter {name!r} has a sparse gradient ({g.layout}): DASGD pushes dense update vectors; "
                    "use dense gradients (e.g. nn.Embedding(..., sparse=False))"
                )
        for p, name in self._frozen:
            if p.requires_grad:
                raise ModelChangedError(
                    f"parameter {name!r} was unfrozen (requires_grad=True) after wrapping: the set of trained "
                    "parameters is fixed when wrapping. Unfreeze it before wrapping (give it lr 0 until it "
                    "should train)"
                )
        if self._param_version() != self._version:
            before = "since wrapping" if self._steps == 0 else "since the last trainer.step()"
            raise OutsideWriteError(
                f"the parameters were written outside the wrapper {before} (optimizer.step(), "
                "model.load_state_dict(), or an in-place edit): the peers never see such a change, so the "
                "replicas would stop agreeing. Call only trainer.step(); load checkpoints with "
                "trainer.load_state_dict() on every rank before the first step (or into the model before "
                "wrapping)"
            )

    def _check_transport(self) -> None:
        failure = getattr(self.transport, "failure", None)
        if failure is not None:
            name, exc = failure
            raise TransportFailedError(
                f"the transport's thread {name} died: {type(exc).__name__}: {exc}. Messages to or from that "
                "peer no longer move, so this run cannot complete"
            ) from exc

    # -- end of run ----------------------------------------------------------------------------------------
    def finish(self, timeout: float = 300.0) -> FinishReport:
        """End of run: drain until every replica holds every update, average buffers, compare replicas.

        Raises:
            DrainTimeoutError: (TimeoutError) the drain did not complete within ``timeout`` seconds.
            TransportFailedError, ModelChangedError, OutsideWriteError: as in :meth:`step`.
        """
        if self._finished:
            raise WrapperStateError("finish() was already called")
        self._check_transport()
        self._check_model()
        self._finished = True
        self._hook.remove()
        p, transport = self.protocol, self.transport
        try:
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
                self._check_transport()
                if time.monotonic() > deadline:
                    p.give_up(self.clock.now())
                    raise DrainTimeoutError(
                        f"the drain did not complete in {timeout:.0f} s: a peer may be stuck or gone"
                    )
                transport.wait(0.05)
            transport.flush(max(0.0, deadline - time.monotonic()))
            self._check_transport()
            buffers = self._average_buffers()
            report = self._compare(*buffers)
        except BaseException:
            transport.close()  # the peers see this link close, and do not wait for us
            raise
        self.transport.expect_shutdown()  # before any peer's SHUTDOWN can arrive (barrier below)
        self.session.barrier()
        self.transport.shutdown()
        if self._scalars is not None:
            self._scalars.finish(report, self.worker.computed)
            self._scalars.close()
        return report

    def _average_buffers(self) -> tuple[int, float, float]:
        """Buffers become the same on every replica: floating-point ones the mean, the others (counters such
        as ``num_batches_tracked``) the maximum. Returns (buffers, spread before, difference after)."""
        g = self.session.collective_group
        n = self.worker.world_size
        buffers = [b for b in self.model.buffers()]
        if not buffers:
            return 0, 0.0, 0.0
        spread = _spread([_host(b) for b in buffers], g)
        floats = [b for b in buffers if b.is_floating_point() or b.is_complex()]
        others = [b for b in buffers if not (b.is_floating_point() or b.is_complex())]
        if floats:
            total = torch.cat([_host(b).reshape(-1) for b in floats])
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=g)
            total /= n
            dist.broadcast(total, src=0, group=g)  # one rounding for all: bitwise equal everywhere
            _scatter(floats, total)
        if others:
            top = torch.cat([_host(b).reshape(-1) for b in others])
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=g)
            _scatter(others, top)
        return len(buffers), spread, _spread([_host(b) for b in buffers], g)

    def _compare(self, n_buffers: int, buffer_spread: float, buffer_diff: float) -> FinishReport:
        from dasgd.core.ledger import compute_staleness

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
        # Staleness of this run only: ids and clocks count from the snapshot loaded at start-up, if any.
        index = index - self._base[origin] if len(origin) else index
        clock = np.maximum(clock - self._base[None, :], 0) if len(origin) else clock
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
        tol = replica_tolerance(w.params.dtype, total)
        agree = lost == 0 and int(w.clock.sum()) == total and diff / scale <= tol and buffer_diff == 0.0
        lrs = np.frombuffer(self._lrs, dtype=np.float64) if len(self._lrs) else np.zeros(0)
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
            faithful=self.faithful,
            stepsize_constant=not self._lr_varied and (lrs.size == 0 or bool((lrs == lrs[0]).all())),
            stepsize_min=float(lrs.min()) if lrs.size else math.nan,
            stepsize_max=float(lrs.max()) if lrs.size else math.nan,
            tolerance=tol,
            buffers=n_buffers,
            buffer_spread=buffer_spread,
            max_buffer_diff=buffer_diff,
        )

    # -- snapshots -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A snapshot of this worker: replica, buffers, vector clock, own update count, stepsizes and the
        optimizer's state (CPU tensors and plain values: ``torch.save`` it). Best taken after ``finish()``,
        when every replica holds every update."""
        w = self.worker
        return {
            "format": _SNAPSHOT_FORMAT,
            "world_size": w.world_size,
            "rank": w.rank,
            "faithful": self.faithful,
            "replica": w.params.detach().cpu().clone(),
            "buffers": {name: b.detach().cpu().clone() for name, b in self.model.named_buffers()},
            "clock": torch.from_numpy(w.clock.copy()),
            "computed": int(w.computed),
            "stepsizes": torch.tensor(self._lrs.tolist(), dtype=torch.float64),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a snapshot from :meth:`state_dict`: on every rank, the same snapshot, before the first step.

        The replica, buffers and optimizer state are restored, and the vector clock goes on from the
        snapshot's (each worker's update ids continue from the snapshot's count of that worker). It is a
        collective: every rank must call it, and it checks that they all loaded the same snapshot.

        Raises:
            SnapshotError: (ValueError) after the first step, another world size or model, or snapshots that
                differ between ranks.
        """
        if self._finished or self._steps:
            raise SnapshotError(
                "load_state_dict() mid-run: every replica would have to load the same state at the same point "
                "of the update history, which a running DASGD cannot arrange. Load the snapshot on every rank "
                "right after wrapping, before the first trainer.step()"
            )
        if not isinstance(state, Mapping) or state.get("format") != _SNAPSHOT_FORMAT:
            raise SnapshotError(
                f"not a DecentralizedSGD snapshot (expected format {_SNAPSHOT_FORMAT!r}): pass what "
                "trainer.state_dict() returned"
            )
        w = self.worker
        if int(state["world_size"]) != w.world_size:
            raise SnapshotError(
                f"the snapshot is of a run with {state['world_size']} workers, this one has {w.world_size}: "
                "the vector clock has one entry per worker"
            )
        replica = state["replica"]
        if replica.numel() != w.params.numel():
            raise SnapshotError(
                f"the snapshot's replica has {replica.numel()} parameters, this model has {w.params.numel()}"
            )
        mine = dict(self.model.named_buffers())
        theirs = state["buffers"]
        if set(mine) != set(theirs):
            raise SnapshotError(
                f"the snapshot's buffers {sorted(theirs)} are not this model's {sorted(mine)}"
            )
        self._check_model()
        clock = np.asarray(state["clock"], dtype=np.int64).copy()
        # Every rank must load the same snapshot, or the replicas start apart: compare digests.
        digest = hashlib.sha256(_bytes(replica))
        digest.update(clock.tobytes())
        for name in sorted(theirs):
            digest.update(_bytes(theirs[name]))
        value = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], dtype=torch.int64)
        hi, lo = value.clone(), value.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.session.collective_group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.session.collective_group)
        if int(hi) != int(lo):
            raise SnapshotError(
                "the ranks loaded different snapshots: load the same file (e.g. rank 0's, saved after "
                "finish()) on every rank"
            )
        with torch.no_grad():
            w.params.copy_(replica.to(w.params.device, w.params.dtype).reshape(-1))
            for name, b in mine.items():
                b.copy_(theirs[name].to(b.device, b.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        w.clock[:] = clock
        w.computed = int(clock[w.rank])
        self._base = clock.copy()
        self._clock_at_start = w.clock.copy()
        self._version = self._param_version()

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the process group if this object created it."""
        self._hook.remove()
        self.session.close()

    def __enter__(self) -> DecentralizedSGD:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def replica_tolerance(dtype: torch.dtype, updates: int) -> float:
    """Relative parameter difference still counted as agreement between replicas of ``dtype``.

    Replicas hold the same update SET but add it up in different orders, and float addition is not
    associative: rounding differences grow like sqrt(T) unit roundoffs. float32/float64 keep the factor 64
    of dasgd.metrics.agreement; the 16-bit types round so coarsely that the same factor would accept almost
    anything, so they get 4 (a 4-sigma bound of that random walk; docs/wrapper.md).
    """
    eps = float(torch.finfo(dtype).eps)
    factor = 4.0 if torch.finfo(dtype).bits == 16 else 64.0
    return factor * eps * max(1.0, math.sqrt(max(1, updates)))


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` that Gloo collectives take: float64 for real floats, its real view for complex,
    int64 for integers and booleans."""
    x = t.detach().cpu()
    if x.is_complex():
        return torch.view_as_real(x).double().clone()
    if x.is_floating_point():
        return x.double().clone()
    return x.long().clone()


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write_back(t: torch.Tensor, host: torch.Tensor) -> None:
    with torch.no_grad():
        if t.is_complex():
            t.copy_(torch.view_as_complex(host.to(torch.float64)).to(t.device, t.dtype))
        else:
            t.copy_(host.to(t.device, t.dtype))


def _scatter(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        k = _host(t).numel()
        _write_back(t, flat[offset : offset + k].reshape(_host(t).shape))
        offset += k


def _spread(hosts: list[torch.Tensor], group: Any) -> float:
    """Largest difference between the replicas' values of these tensors (all ranks get it)."""
    v = torch.cat([h.double().reshape(-1) for h in hosts]) if hosts else torch.zeros(0, dtype=torch.float64)
    if not v.numel():
        return 0.0
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    return float((hi - lo).max())


def _check_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UnsupportedModelError("the model has no trainable parameters: nothing to train")
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype not in SUPPORTED_DTYPES:
            kind = "complex" if p.dtype.is_complex else ("integer" if not p.dtype.is_floating_point else "")
            raise UnsupportedModelError(
                f"parameter {name!r} is {p.dtype}{f' ({kind})' if kind else ''}: dasgd trains real floating-point "
                f"parameters ({', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)}). Cast the "
                "model (e.g. model.float()) before wrapping, or freeze that parameter"
            )
    ids = {id(p) for p in trainable}
    in_opt = [p for g in optimizer.param_groups for p in g["params"]]
    if {id(p) for p in in_opt} != ids or len(in_opt) != len(ids):
        raise UnsupportedModelError(
            "the optimizer must hold exactly the model's trainable parameters, each once (the wrapper trains "
            "all of them with every update): build it as torch.optim.X(model.parameters(), ...) after "
            "freezing what should stay fixed"
        )


def _faithful_lr(optimizer: torch.optim.Optimizer) -> float:
    """The one stepsize of a plain-SGD optimizer; refuses anything else, naming the practical mode."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise UnsupportedOptimizerError(
            f"DecentralizedSGD's faithful mode needs torch.optim.SGD (plain SGD is the algorithm the theory "
            f"covers), got {type(optimizer).__name__}. Pass faithful=False to run it as a local "
            "preconditioner (practical mode, outside DASGD's guarantees)"
        )
    lrs = set()
    for group in optimizer.param_groups:
        for key, bad in (("momentum", 0), ("weight_decay", 0), ("nesterov", False), ("dampening", 0)):
            if group.get(key, bad) != bad:
                raise UnsupportedOptimizerError(
                    f"DecentralizedSGD's faithful mode needs plain SGD, but the optimizer sets {key}={group[key]} "
                    "(momentum and weight decay make updates depend on order and history). Remove it, or pass "
                    "faithful=False to run it as a local preconditioner (practical mode, outside the theory)"
                )
        lrs.add(float(group["lr"]))
    if len(lrs) != 1:
        raise UnsupportedOptimizerError(
            f"DecentralizedSGD's faithful mode needs one stepsize for all parameters, got {sorted(lrs)}; pass "
            "faithful=False for per-group stepsizes (practical mode)"
        )
    return lrs.pop()


def _check_practical(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, torch.optim.LBFGS):
        raise UnsupportedOptimizerError(
            "LBFGS needs a closure that re-evaluates the loss several times per step, which a DASGD step (one "
            "update from one gradient) cannot give it; use SGD, Adam, AdamW, ..."
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise UnsupportedOptimizerError(
            "SparseAdam works on sparse gradients; DASGD pushes dense update vectors. Use Adam with dense "
            "gradients"
        )
