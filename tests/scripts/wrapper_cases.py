"""Two-rank scenarios of dasgd.DecentralizedSGD, run by tests/test_wrapper.py.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python wrapper_cases.py CASE [ARG]

Every rank prints one line ``RESULT {json}``: what the case measured, or ``{"error": type, "message": ...}``
when the wrapper raised (both ranks hit the same refusal at the same step). Then the process exits at once
(``os._exit``), so no Gloo teardown can hang it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dasgd
from dasgd.worker.replica import flat_grad

RANK = int(os.environ.get("RANK", "0"))


def data(rank: int, n: int = 64, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 8, generator=g) + shift
    y = (x[:, 0] > shift).long()
    return x, y


def gather_max_diff(t: torch.Tensor) -> float:
    hi, lo = t.detach().double().clone(), t.detach().double().clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


def report_dict(r: dasgd.runtime.wrapper.FinishReport) -> dict:
    return {k: getattr(r, k) for k in r.__dataclass_fields__}


def case_sched_bn(_: str) -> dict:
    """A BatchNorm model under StepLR with gamma 0 after 5 steps, each rank on differently shifted data.

    Stepsizes: this worker's updates must stop at step 5, and the final replica must be x0 minus every
    update with its sender's stepsize at the time. Buffers: the running statistics drift apart while
    training; finish() must make them the replicas' mean (num_batches_tracked: the maximum)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.0)
    x0 = trainer.worker.params.detach().clone()
    own = torch.zeros_like(x0)
    x, y = data(RANK, shift=float(RANK))
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        own += opt.param_groups[0]["lr"] * flat_grad(model, x0)
        trainer.step()
        sched.step()
        time.sleep(0.005)
    bn = model[1]
    before_mean = bn.running_mean.clone()
    dist.all_reduce(before_mean)
    before_mean /= 2
    rep = trainer.finish()
    dist.all_reduce(own)
    return {
        "report": report_dict(rep),
        "err": float((trainer.worker.params - (x0 - own)).abs().max()),
        "stepsizes": trainer.stepsizes,
        "mean_diff": gather_max_diff(bn.running_mean),
        "var_diff": gather_max_diff(bn.running_var),
        "count": int(bn.num_batches_tracked),
        "avg_err": float((bn.running_mean - before_mean).abs().max()),
    }


def case_cast(arg: str) -> dict:
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    x, y = data(RANK)
    for i in range(6):
        if i == 3:
            model.to(torch.float64)
            x = x.double()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        trainer.step()
    return {"report": report_dict(trainer.finish(timeout=20))}


def case_dtype(arg: str) -> dict:
    name, _, size = arg.partition(":")
    dtype = getattr(torch, name)
    torch.manual_seed(0)
    width = int(size or 0)  # a hidden layer this wide: payloads large enough to travel detached
    model = (nn.Sequential(nn.Linear(8, width), nn.Linear(width, 4)) if width else nn.Linear(8, 4)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = dasgd.DecentralizedSGD(model, opt)
    x, y = data(RANK)
    x = x.to(dtype)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        trainer.step()
    rep = trainer.finish()
    return {"report": report_dict(rep), "closed": trainer.transport._closed}


def case_practical(arg: str) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    if arg == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    trainer = dasgd.DecentralizedSGD(model, opt, faithful=False)
    x, y = data(RANK)
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        trainer.step()
    rep = trainer.finish()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    return {"report": report_dict(rep), "loss": loss, "diff": gather_max_diff(trainer.worker.params)}


def case_sender_dies(_: str) -> dict:
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)

    def broken(*args: object, **kwargs: object) -> int:
        raise ValueError("injected failure in the sender thread")

    trainer.transport._send_message = broken  # type: ignore[method-assign]
    x, y = data(RANK)
    for i in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        try:
            trainer.step()
        except Exception as exc:
            return {"error": type(exc).__name__, "message": str(exc), "step": i,
                    "cause": type(exc.__cause__).__name__}
        time.sleep(0.02)
    return {"error": None}


def case_snapshot(arg: str) -> dict:
    """``save PATH``: train, finish, save rank 0's snapshot. ``load PATH``: load it on both ranks, train on."""
    mode, path = arg.split(":", 1)
    torch.manual_seed(1 if mode == "load" else 0)  # the load run starts elsewhere: the snapshot must win
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = dasgd.DecentralizedSGD(model, opt, faithful=False)
    x, y = data(RANK)
    out: dict = {}
    if mode == "load":
        snap = torch.load(path, weights_only=False)
        trainer.load_state_dict(snap)
        out["restored_err"] = float((trainer.worker.params - snap["replica"]).abs().max())
        out["restored_momentum"] = bool(opt.state)
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        trainer.step()
    rep = trainer.finish()
    if mode == "save" and RANK == 0:
        torch.save(trainer.state_dict(), path)
    out["report"] = report_dict(rep)
    return out


def main() -> None:
    case, arg = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
    torch.set_num_threads(1)
    try:
        result = globals()[f"case_{case}"](arg)
    except Exception as exc:  # the refusal the test expects: reported, not a crash
        result = {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()[-1500:]}
    print("RESULT " + json.dumps(result, default=float), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
