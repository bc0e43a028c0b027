"""dasgd.DecentralizedSGD against the normal PyTorch things that used to fail silently.

One test per failure seen in a user's loop: each reproduces it and checks the new behaviour (it works, or it
is refused at once with a message saying what to do). Two-rank cases run as two real processes on loopback
(tests/scripts/wrapper_cases.py, bounded in time, cleaned up); guards that need no peer run in this process
on a one-rank Gloo group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dasgd
from dasgd.errors import (
    DasgdError,
    ModelChangedError,
    OutsideWriteError,
    SnapshotError,
    UnsupportedModelError,
    UnsupportedOptimizerError,
)

pytestmark = [pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "scripts" / "wrapper_cases.py"
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(case: str, arg: str = "", timeout: float = 60.0) -> list[dict]:
    """Run ``case`` on two processes; return each rank's RESULT (killing both if one overruns)."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(CASES), case, arg],
            env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            assert lines, f"no result from {case}: {err[-3000:]}"
            results.append(json.loads(lines[-1][len("RESULT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


@pytest.fixture
def one_rank():
    """A one-rank Gloo group in this process: the wrapper's guards need no peer."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


def backward(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()


@pytest.fixture(scope="module")
def sched_bn() -> list[dict]:
    """One two-rank run serves items 1 and 2: a BatchNorm model under a StepLR schedule."""
    return two_ranks("sched_bn")


# -- 1. learning-rate schedulers ---------------------------------------------------------------------------
def test_1_a_scheduler_sets_each_updates_stepsize_and_replicas_still_agree(sched_bn):
    """Was: the stepsize was read once at wrap time, so StepLR(gamma=0) kept moving the weights. Now every
    update carries its sender's stepsize of the moment: the final replica is x0 minus the sum over both
    workers of lr_t * g_t, and the report says the stepsize was not constant."""
    for res in sched_bn:
        rep = res["report"]
        assert res["stepsizes"] == [0.1] * 5 + [0.0] * 15
        assert res["err"] < 1e-6, res["err"]  # read-once lr: 0.1 * all 40 gradients, far from this
        assert rep["replicas_agree"] and rep["applied"] == rep["total_computed"] == 40
        assert rep["stepsize_constant"] is False and rep["stepsize_min"] == 0.0 and rep["stepsize_max"] == 0.1
        assert rep["faithful"] is True


# -- 2. buffers -------------------------------------------------------------------------------------------
def test_2_batchnorm_buffers_are_averaged_at_finish_and_covered_by_agreement(sched_bn):
    """Was: BatchNorm running statistics drifted apart and finish() still said replicas_agree=True. Now
    finish() averages float buffers (the maximum for counters), and the report shows the drift it fixed."""
    for res in sched_bn:
        rep = res["report"]
        assert rep["buffers"] == 3 and rep["buffer_spread"] > 0.05  # the drift is real (different data)
        assert res["mean_diff"] == 0.0 and res["var_diff"] == 0.0 and rep["max_buffer_diff"] == 0.0
        assert res["avg_err"] < 1e-6  # running_mean is the mean of the replicas' values before finish()
        assert res["count"] == 20  # num_batches_tracked: the largest count, not an average
        assert rep["replicas_agree"]


# -- 3. model.to() after wrapping ----------------------------------------------------------------------------
def test_3_casting_the_model_after_wrapping_is_refused_at_that_step():
    """Was: model.to(float64) killed the sender thread, training went on, and finish() waited 300 s to blame
    a dead peer. Now the step right after the cast refuses, naming it (both ranks, within seconds)."""
    for res in two_ranks("cast", timeout=45):
        assert res["error"] == "ModelChangedError", res
        assert "model.to(torch.float64)" in res["message"] and "wrap it" in res["message"]


def test_3_moving_the_model_after_wrapping_is_refused(one_rank):
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    backward(model, opt)
    trainer.step()
    model.to("meta")  # a device change; this machine may have no second real device
    with pytest.raises(ModelChangedError, match=r"model\.to\('meta'\) after wrapping"):
        trainer.step()


def test_3_a_dead_transport_thread_is_raised_at_the_next_step():
    """A sender thread that dies (here: an injected error) surfaces as TransportFailedError on the next
    step, with the thread's exception chained, instead of a drain timeout minutes later."""
    for res in two_ranks("sender_dies", timeout=45):
        assert res["error"] == "TransportFailedError", res
        assert "injected failure" in res["message"] and res["cause"] == "ValueError"
        assert res["step"] <= 3


# -- 4. 16-bit and other dtypes ----------------------------------------------------------------------------
def test_4_a_bfloat16_model_finishes_with_a_report():
    """Was: a bf16 model crashed in finish() (np.dtype("bfloat16")) with no report, transport left open."""
    for res in two_ranks("dtype", "bfloat16:8000"):  # 96k parameters: payloads travel detached
        assert "error" not in res, res
        rep = res["report"]
        assert rep["replicas_agree"] and rep["applied"] == 60 and rep["lost"] == 0
        eps = torch.finfo(torch.bfloat16).eps
        assert eps <= rep["tolerance"] <= 4 * eps * 60**0.5 + 1e-12
        assert res["closed"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_4_finish_reports_for_every_supported_dtype(one_rank, dtype):
    model = nn.Linear(8, 2).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x.to(dtype)).float(), y).backward()
        trainer.step()
    rep = trainer.finish(timeout=20)
    assert rep.replicas_agree and rep.applied == 3
    assert rep.tolerance == pytest.approx((4 if dtype != torch.float64 else 64) * torch.finfo(dtype).eps * 3**0.5)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_4_parameters_of_other_dtypes_are_refused_up_front(dtype):
    model = nn.Linear(4, 2)
    model.weight = nn.Parameter(torch.zeros(2, 4, dtype=dtype), requires_grad=dtype.is_complex)
    if not dtype.is_complex:
        model.weight.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedModelError, match="real floating-point"):
        dasgd.DecentralizedSGD(model, opt)  # before any process group is needed


# -- 5. load_state_dict mid-run ----------------------------------------------------------------------------
def test_5_model_load_state_dict_mid_run_is_refused_at_the_next_step(one_rank):
    """Was: loading a state_dict mid-run on every rank made the replicas diverge, seen only at finish()."""
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        backward(model, opt)
        trainer.step()
    model.load_state_dict(saved)
    backward(model, opt)
    with pytest.raises(OutsideWriteError, match=r"model\.load_state_dict\(\).*trainer\.load_state_dict\(\)"):
        trainer.step()


def test_5_the_wrappers_own_snapshot_restores_a_run_on_every_rank(tmp_path):
    """trainer.state_dict() after finish(), loaded on both ranks of a new run before the first step: the
    replica, buffers and momentum come back, ids go on from the snapshot's clock, and replicas agree."""
    path = tmp_path / "snap.pt"
    for res in two_ranks("snapshot", f"save:{path}"):
        assert res["report"]["replicas_agree"]
    for res in two_ranks("snapshot", f"load:{path}"):
        assert "error" not in res, res
        assert res["restored_err"] == 0.0 and res["restored_momentum"]
        rep = res["report"]
        assert rep["computed"] == 12 and rep["total_computed"] == 24 and rep["applied"] == 24
        assert rep["replicas_agree"] and rep["lost"] == 0


def test_5_wrapper_load_state_dict_mid_run_is_refused(one_rank):
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    snap = trainer.state_dict()
    trainer.load_state_dict(snap)  # before the first step: fine
    backward(model, opt)
    trainer.step()
    with pytest.raises(SnapshotError, match="before the first trainer.step"):
        trainer.load_state_dict(snap)


# -- 6. freezing / unfreezing ------------------------------------------------------------------------------
def test_6_unfreezing_a_parameter_mid_run_is_refused_naming_it(one_rank):
    """Was: an opaque 'size of tensor a (714) must match (4810)'. Now the step names the parameter."""
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    backward(model, opt)
    trainer.step()
    model[0].weight.requires_grad_(True)
    backward(model, opt)
    with pytest.raises(ModelChangedError, match=r"'0\.weight' was unfrozen .* before wrapping"):
        trainer.step()


def test_6_freezing_a_parameter_mid_run_is_refused(one_rank):
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    model[1].bias.requires_grad_(False)
    backward(model, opt)
    with pytest.raises(ModelChangedError, match=r"'1\.bias' was frozen"):
        trainer.step()


# -- 7. optimizer.step() as well -------------------------------------------------------------------------
def test_7_calling_optimizer_step_as_well_is_refused_at_once(one_rank):
    """Was: caught only at finish() (agree=False) with no cause. Now optimizer.step() itself raises."""
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    backward(model, opt)
    trainer.step()
    before = trainer.worker.params.clone()
    with pytest.raises(OutsideWriteError, match=r"call trainer\.step\(\) instead"):
        opt.step()
    assert torch.equal(trainer.worker.params, before)  # refused before it changed anything


def test_7_an_in_place_edit_of_a_parameter_is_refused_at_the_next_step(one_rank):
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    backward(model, opt)
    trainer.step()
    with torch.no_grad():
        model.weight.mul_(0.5)
    backward(model, opt)
    with pytest.raises(OutsideWriteError, match="written outside the wrapper since the last"):
        trainer.step()


# -- other failures, each its own exception type ------------------------------------------------------------
def test_divergence_and_misuse_raise_dasgd_errors_with_the_natural_builtin(one_rank):
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dasgd.DecentralizedSGD(model, opt)
    x, y = batch()
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.raises(FloatingPointError, match="diverged") as info:
        trainer.step()
    assert type(info.value).__name__ == "DivergedError" and isinstance(info.value, DasgdError)
    trainer.finish(timeout=20)
    with pytest.raises(RuntimeError, match="finish\\(\\) was called") as info:
        trainer.step()
    assert type(info.value).__name__ == "WrapperStateError"
    opt.step()  # after finish() the optimizer is the user's again


# -- practical mode ---------------------------------------------------------------------------------------
def test_practical_mode_runs_adam_as_a_local_preconditioner():
    """faithful=False: each worker's optimizer makes its update, every replica applies every update once,
    so the replicas agree; the report marks the run as outside the theory. (SGD with momentum, Nesterov and
    weight decay: the bn-cnn example below.)"""
    for res in two_ranks("practical", "adam"):
        assert "error" not in res, res
        rep = res["report"]
        assert rep["replicas_agree"] and rep["faithful"] is False and rep["applied"] == 50
        assert res["diff"] < 1e-5 and res["loss"] < 0.4  # it trains


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.01), "got Adam"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "momentum=0.9"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-4), "weight_decay"),
    ],
)
def test_faithful_mode_refuses_other_optimizers_naming_the_opt_in(make, needle):
    model = nn.Linear(4, 2)
    with pytest.raises(UnsupportedOptimizerError, match=needle) as info:
        dasgd.DecentralizedSGD(model, make(model.parameters()))
    assert "faithful=False" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DasgdError)


def test_practical_mode_refuses_lbfgs():
    model = nn.Linear(4, 2)
    with pytest.raises(UnsupportedOptimizerError, match="closure"):
        dasgd.DecentralizedSGD(model, torch.optim.LBFGS(model.parameters()), faithful=False)


def test_an_optimizer_over_other_parameters_is_refused():
    model = nn.Linear(4, 2)
    with pytest.raises(UnsupportedModelError, match="exactly the model's trainable parameters"):
        dasgd.DecentralizedSGD(model, torch.optim.SGD([model.weight], lr=0.1))


# -- the second example ------------------------------------------------------------------------------------
def test_bn_cnn_example_under_torchrun(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(ROOT / "examples" / "torchrun_bn_cnn.py")],
        capture_output=True,
        text=True,
        timeout=100,
        env=ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("workers=")][0]
    fields = dict(kv.split("=") for kv in line.split())
    assert fields["replicas_agree"] == "True" and fields["lost"] == "0" and fields["faithful"] == "False"
    assert float(fields["max_buffer_diff"]) == 0.0 and float(fields["buffer_spread"]) > 0.0
    assert fields["stepsize_constant"] == "False"  # the cosine schedule ran
    assert float(fields["test_accuracy"]) >= 0.6  # it trains (chance: 0.1; runs measured 0.75-0.91)


def test_tensorboard_scalars_from_the_wrapper(one_rank, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = dasgd.DecentralizedSGD(model, opt, tensorboard=tmp_path / "tb")
    for _ in range(45):
        backward(model, opt)
        trainer.step()
        trainer.log_scalar("train/loss", 0.5)
    report = trainer.finish()
    trainer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss/worker0",
        "throughput/updates_per_s/worker0",
        "staleness/peer_updates_per_step/worker0",
        "staleness/s_avg",
        "staleness/s_max",
    } <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss/worker0")] == list(range(1, 46))
    assert len(acc.Scalars("throughput/updates_per_s/worker0")) == 2  # one per 20 own updates
    assert acc.Scalars("staleness/s_avg")[0].value == pytest.approx(report.s_avg)


def test_tensorboard_without_the_package_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setattr("dasgd.runtime.wrapper_log.tensorboard_available", lambda: False)
    model = nn.Linear(8, 2)
    with pytest.raises(dasgd.SetupError, match=r"pip install 'dasgd\[tensorboard\]'"):
        dasgd.DecentralizedSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), tensorboard="tb")
