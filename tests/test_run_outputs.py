"""What a run leaves and says at its end: divergence (exit 3), spec re-runs and torchrun directories, the
end-of-run phases and the flags that skip them, TensorBoard scalars.

Each test names the reproduced problem it pins (the old behaviour) and checks the new one.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from dasgd.cli import main
from dasgd.metrics.eventlog import read_event_log
from dasgd.worker.rules import exploded

# The README's example before this fix: 64 workers at lr 0.02 on the quadratic went from loss 16 to 1,509
# and exited 0 with nothing on the terminal.
README_DIVERGING = ["simulate", "--task", "quadratic", "--workers", "64", "--lr", "0.02", "--no-progress"]
SMALL = ["simulate", "--task", "quadratic", "--workers", "4", "--dim", "5", "--max-gradients", "200",
         "--no-progress"]  # fmt: skip


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main()'s exit code (argparse's SystemExit included), its stdout and its stderr."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- divergence -------------------------------------------------------------------------------------------


def test_the_exploding_rule() -> None:
    first = {"loss": 2.0}
    assert exploded(first, {"loss": 19.9}, 10.0) == ""
    assert "above 10 x its first evaluation 2" in exploded(first, {"loss": 20.1}, 10.0)
    assert "nan" in exploded(first, {"loss": math.nan}, None)  # non-finite counts whatever the factor
    assert "inf" in exploded(first, {"test_loss": math.inf}, 0.0)
    assert exploded(first, {"loss": 1e9}, None) == ""  # factor off: only NaN/inf
    assert exploded({"loss": 0.0}, {"loss": 5.0}, 10.0) == ""  # a first loss of 0 is no reference
    assert exploded({"test_loss": 2.3}, {"test_loss": 30.0}, 10.0)  # classification tasks' key


def test_the_readme_example_that_diverged_silently_now_stops_with_exit_3_and_a_marked_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    rc, out, err = call([*README_DIVERGING, "--no-theory", "--run-dir", str(run)], capsys)
    assert rc == 3, err
    assert "stopped by diverged" in out
    # The message: where, why (DASGD's full stepsize vs DDP's averaged step) and how to choose a stepsize.
    assert "dasgd: error: the run diverged (worker 0 at t = 0.3 s, 1793 gradients" in err
    assert "every gradient at the full stepsize" in err and "64 times as far per gradient as DDP" in err
    assert "--sweep lr=0.01,0.005,0.0025" in err and "docs/stepsize.md" in err
    # The run directory is written, with the point of divergence in the event log, report and plots.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "diverged"
    marks = [e for e in read_event_log(run / "events.jsonl", clocks=False).runs if e["event"] == "diverged"]
    assert marks == [
        {
            "event": "diverged",
            "time": pytest.approx(0.3),
            "worker": 0,
            "gradients": 1793,
            "metric": "loss",
            "first_loss": pytest.approx(16.0218, rel=1e-4),
            "loss": pytest.approx(410.198, rel=1e-4),
        }
    ]
    report = (run / "report.md").read_text()
    assert "## Diverged" in report and "1793 gradients" in report
    assert (run / "plots" / "loss.png").is_file()
    # The negative control: with the rule off (only NaN/inf) the run goes on to its budget, as it did
    # before (loss 16 -> 1,509, exit 0).
    rc, out, err = call([*README_DIVERGING, "--no-theory", "--no-plots", "--diverge-factor", "0",
                         "--run-dir", str(tmp_path / "off")], capsys)  # fmt: skip
    assert rc == 0, err
    assert "stopped by max_gradients" in out and "loss 1509" in out


def test_a_sweep_reports_diverged_points_without_failing(tmp_path: Path, capsys) -> None:
    rc, out, err = call(
        ["simulate", "--task", "quadratic", "--workers", "8", "--dim", "5", "--max-gradients", "400",
         "--no-theory", "--no-plots", "--sweep", "lr=2,0.01", "--run-dir", str(tmp_path / "sweep"),
         "--no-progress"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert "note: lr=2: diverged" in err and "lr=0.01" not in err
    assert "stopped by" in out and "diverged" in out and "max_gradients" in out


@pytest.mark.multiprocess
def test_a_real_run_that_diverges_exits_3(tmp_path: Path) -> None:
    import subprocess

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dasgd", "train", "--task", "quadratic", "--workers", "2", "--lr", "5",
         "--dim", "5", "--max-gradients", "2000", "--eval-every", "0.05", "--no-theory", "--no-plots",
         "--run-dir", str(run), "--no-progress"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "the run diverged" in proc.stderr and "2 times as far per gradient as DDP" in proc.stderr
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "diverged"
    assert any(e["event"] == "diverged" for e in read_event_log(run / "events.jsonl", clocks=False).runs)


# -- run directories --------------------------------------------------------------------------------------


def test_rerunning_a_runs_spec_goes_to_a_new_directory_and_spec_yaml_holds_the_values_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = Path("runs") / "first"
    rc, _, err = call([*SMALL, "--no-theory", "--no-plots", "--run-dir", str(first)], capsys)
    assert rc == 0, err
    written = yaml.safe_load((first / "spec.yaml").read_text())
    # Was `lr: null` and `batch_size: null`: the task defaults actually used are recorded.
    assert written["lr"] == pytest.approx(0.5 / 4) and written["batch_size"] == 64
    before = (first / "summary.json").read_bytes()
    stamp = (first / "summary.json").stat().st_mtime_ns
    # Was: the re-run replaced runs/first/summary.json (its spec.yaml carries run_dir: runs/first).
    rc, out, err = call([*SMALL[:1], "--spec", str(first / "spec.yaml"), "--no-progress"], capsys)
    assert rc == 0, err
    assert f"note: {first / 'spec.yaml'} is the spec of the run in {first}" in err
    assert (first / "summary.json").read_bytes() == before
    assert (first / "summary.json").stat().st_mtime_ns == stamp
    new = [p for p in Path("runs").iterdir() if p.name.startswith("sim-quadratic-")]
    assert len(new) == 1 and (new[0] / "summary.json").is_file()
    assert f"run directory: {new[0]}" in out
    # Replacing the original stays possible, explicitly.
    rc, _, err = call([*SMALL[:1], "--spec", str(first / "spec.yaml"), "--run-dir", str(first)], capsys)
    assert rc == 2 and "--overwrite" in err
    # A hand-written spec's run_dir (not an earlier run's) is used as it is.
    Path("mine.yaml").write_text("task: quadratic\nworkers: 2\ndim: 5\nmax_gradients: 50\nrun_dir: mine\n")
    rc, _, err = call(["simulate", "--spec", "mine.yaml", "--no-theory", "--no-plots", "--no-progress"], capsys)
    assert rc == 0, err
    assert Path("mine/summary.json").is_file()


def test_torchrun_ranks_agree_on_a_new_directory_per_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: every torchrun job wrote runs/<task>-torchrun (a second job needed --overwrite)."""
    import argparse

    from dasgd.cli import _torchrun_run_dir
    from dasgd.experiments.spec import resolve_spec
    from dasgd.runs.launcher import host_store

    monkeypatch.chdir(tmp_path)
    spec = resolve_spec({}, task="quadratic", startup_timeout=10)
    args = argparse.Namespace(run_dir=None, spec=None)
    env = {"TORCHELASTIC_RUN_ID": "job/7", "TORCHELASTIC_RESTART_COUNT": "0"}
    # Without an agent store: named by the rendezvous alone, the same on every rank.
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        for k, v in {**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}.items():
            monkeypatch.setenv(k, v)
        assert _torchrun_run_dir(args, spec) == Path("runs/quadratic-torchrun-job_7-r0")
    # With torchrun's agent store: rank 0 picks runs/<task>-torchrun-<id>-<time>, the others read it.
    store = host_store()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("RANK", "0")
    chosen = _torchrun_run_dir(args, spec)
    assert chosen.parent == Path("runs") and chosen.name.startswith("quadratic-torchrun-job_7-2")
    monkeypatch.setenv("RANK", "1")
    assert _torchrun_run_dir(args, spec) == chosen
    # The next job (another rendezvous id) gets another directory.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job8")
    monkeypatch.setenv("RANK", "0")
    assert _torchrun_run_dir(args, spec) != chosen
    # --run-dir is used as it is, on every rank.
    monkeypatch.setenv("RANK", "1")
    assert _torchrun_run_dir(argparse.Namespace(run_dir="x", spec=None), spec) == Path("x")


@pytest.mark.multiprocess
def test_two_torchrun_jobs_without_run_dir_write_two_directories(tmp_path: Path) -> None:
    import subprocess

    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "dasgd", "train", "--task", "quadratic",
           "--dim", "5", "--max-gradients", "100", "--no-theory", "--no-plots"]  # fmt: skip
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2, dirs  # was: one runs/quadratic-torchrun, the second job refused or overwriting
    for d in dirs:
        assert re.fullmatch(r"quadratic-torchrun-[0-9a-f]{8}-\d{8}-\d{6}(-\d+)?", d.name), d.name
        assert (d / "summary.json").is_file()


# -- the end of a run: phases, --no-theory / --no-plots ---------------------------------------------------


def test_the_bar_starts_with_the_workers_and_names_each_end_phase(monkeypatch, capsys) -> None:
    """Was: "phase=draining" while the workers were done and the CLI estimated constants and drew plots;
    and a bar started before the workers were up (first ETA 8:48:33)."""
    from dasgd.cli_common import _worker_phase, progress_printer
    from dasgd.experiments.spec import resolve_spec

    assert _worker_phase([{"phase": "drained"}, {"phase": "drain_timeout"}]) == "workers done"
    assert _worker_phase([{"phase": "training"}, {"phase": "drained"}]) == "draining"
    assert _worker_phase([{"phase": "starting"}, {"phase": "starting"}]) == "starting"
    spec = resolve_spec({}, task="quadratic", max_gradients=100)
    update, on_phase, close = progress_printer(spec, True)
    capsys.readouterr()
    update([{"phase": "starting", "computed": 0, "applied": 0}] * 2)
    assert capsys.readouterr().err == ""  # no bar while processes start
    update([{"phase": "training", "computed": 5, "applied": 10}] * 2)
    assert "training" in capsys.readouterr().err
    on_phase("summarising", 0, 1)
    on_phase("plotting", 0, 4)
    on_phase("plotting", 3, 4)
    on_phase("estimating constants (theory)", 0, 1)
    close()
    err = capsys.readouterr().err
    assert "plotting: 3/4" in err and "estimating constants (theory): 0/1" in err
    assert "draining" not in err


def test_no_theory_and_no_plots_skip_the_costly_phases_and_report_computes_them_later(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dasgd.experiments.spec import resolve_spec
    from dasgd.runs.simulate import simulate

    phases: list[str] = []

    def note(name: str, done: int, total: int) -> None:
        if not phases or phases[-1] != name:
            phases.append(name)

    spec = resolve_spec({}, simulate=True, task="quadratic", workers=4, dim=5, max_gradients=200)
    simulate(spec, tmp_path / "full", on_phase=note)
    assert phases == [
        "summarising",
        "writing events.jsonl and summary.json",
        "plotting",
        "estimating constants (theory)",
    ]
    phases.clear()
    run = tmp_path / "skipped"
    simulate(spec.__class__(**{**spec.__dict__, "theory": False, "plots": False}), run, on_phase=note)
    assert phases == ["summarising", "writing events.jsonl and summary.json", "writing report.md"]
    assert not (run / "plots").exists()
    assert "Not computed at the end of this run (`--no-theory`)" in (run / "report.md").read_text()
    rc, out, err = call(["report", str(run)], capsys)
    assert rc == 0, err
    assert (run / "plots" / "loss.png").is_file() and (run / "plots" / "theory_grad_norm.png").is_file()
    assert "Not computed" not in (run / "report.md").read_text()


# -- TensorBoard ------------------------------------------------------------------------------------------


def _scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_from_a_run_and_regenerated_by_report(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    rc, _, err = call([*SMALL, "--tensorboard", "--no-theory", "--no-plots", "--run-dir", str(run)], capsys)
    assert rc == 0, err
    tags = _scalars(run / "tensorboard")
    for tag in ("eval/loss/worker0", "staleness/s_k/all", "throughput/grad_per_s/all",
                "staleness/s_k/worker3", "throughput/grad_per_s/worker3"):  # fmt: skip
        assert tag in tags, sorted(tags)
    log = read_event_log(run / "events.jsonl")
    evals = [e for e in log.evals if not e.get("final")]
    loss = tags["eval/loss/worker0"]
    assert [s.step for s in loss[: len(evals)]] == [e["gradients"] for e in evals]
    assert loss[0].value == pytest.approx(evals[0]["loss"], rel=1e-6)
    # The staleness windows together hold every gradient once: their gradient-weighted mean is S_avg.
    stale = tags["staleness/s_k/all"]
    steps = [0] + [s.step for s in stale]
    weighted = sum(s.value * (b - a) for s, a, b in zip(stale, steps, steps[1:]))
    assert steps[-1] == log.num_gradients
    assert weighted / log.num_gradients == pytest.approx(log.staleness().s_avg, rel=1e-6)
    # `dasgd report --tensorboard` rebuilds the same series from events.jsonl alone (one file, not two).
    rc, out, err = call(["report", str(run), "--tensorboard", "--no-theory"], capsys)
    assert rc == 0, err
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    again = _scalars(run / "tensorboard")
    assert sorted(again) == sorted(tags)
    assert [s.value for s in again["staleness/s_k/all"]] == [s.value for s in tags["staleness/s_k/all"]]


def test_the_public_tensorboard_writer(tmp_path: Path) -> None:
    from dasgd.metrics.tensorboard import TensorBoardLog

    with TensorBoardLog(tmp_path / "tb") as tb:
        tb.scalar("loss", 1.5, 10, worker=2)
        tb.scalar("loss", 1.0, 20, worker=2)
        tb.scalar("lr", 0.1, 0)
    tags = _scalars(tmp_path / "tb")
    assert [(s.step, s.value) for s in tags["loss/worker2"]] == [(10, 1.5), (20, 1.0)]
    assert "lr" in tags


def test_tensorboard_without_the_package_is_exit_2_with_the_install_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    run = tmp_path / "run"
    rc, _, err = call([*SMALL, "--tensorboard", "--run-dir", str(run)], capsys)
    assert rc == 2 and "pip install 'dasgd[tensorboard]'" in err and "--tensorboard" in err
    assert not run.exists()  # refused before anything ran
    from dasgd.metrics.tensorboard import TensorBoardLog, TensorBoardMissing

    with pytest.raises(TensorBoardMissing, match=r"pip install 'dasgd\[tensorboard\]'"):
        TensorBoardLog(tmp_path / "tb")
    rc, _, err = call(["report", str(tmp_path), "--tensorboard"], capsys)
    assert rc == 2 and "pip install 'dasgd[tensorboard]'" in err

