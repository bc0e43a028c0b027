"""`dasgd simulate`: the command end to end, bad input, and sweeps (grid, table, plots, resume)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dasgd.cli import main
from dasgd.experiments.spec import SpecError
from dasgd.metrics.eventlog import read_event_log
from dasgd.metrics.plots import run_figures
from dasgd.metrics.sweep_plots import SWEEP_PLOT_METRICS, sweep_figure, sweep_figures
from dasgd.runs.sweep import loss_to_target, parse_sweep, plan_sweep

# A small, stable quadratic: lr 0.02 keeps lr * L * S_max well below 1 even at 16 workers.
QUAD = ["--task", "quadratic", "--dim", "5", "--lr", "0.02", "--seed", "1"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dasgd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )


def exit_code(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.multiprocess  # runs the CLI in a process of its own
def test_simulate_end_to_end_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "simulate",
        *QUAD,
        "--workers",
        "3",
        "--max-gradients",
        "90",
        "--latency",
        "0.002",
        "--straggler-share",
        "0.34",
        "--slowdown",
        "3",
        "--run-dir",
        str(run_dir),
    )
    assert proc.returncode == 0, proc.stderr
    for name in (
        "spec.yaml",
        "events.jsonl",
        "metrics.csv",
        "summary.json",
        "report.md",
        "plots/staleness.png",
    ):
        assert (run_dir / name).is_file(), name
    # The staleness figure is the one drawn from the run's own event log (tests/test_metrics.py checks what
    # such a figure shows), with the run's title and time unit.
    figures = run_figures(
        read_event_log(run_dir / "events.jsonl"),
        time_label="virtual time (s)",
        title="dasgd on quadratic, 3 workers",
    )
    assert (run_dir / "plots" / "staleness.png").read_bytes() == _png(figures["staleness.png"])
    assert "simulation:" in proc.stdout and "virtual" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["time_unit"] == "virtual"
    assert summary["gradients_computed"] >= 90 and summary["gradients_lost"] == 0
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["simulation"]["latency"] == 0.002
    # round(0.34 * 3) = 1 straggler, 3x slower: with a constant 10 ms step it computes a third as many.
    stragglers = summary["simulation"]["stragglers"]
    assert list(stragglers.values()) == [3.0]
    computed = {w["rank"]: w["computed"] for w in summary["per_worker"]}
    slow = int(next(iter(stragglers)))
    fast = np.mean([c for r, c in computed.items() if r != slow])
    assert abs(3 * computed[slow] - fast) <= 4  # a step of granularity at either end of the run


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--loss", "2"], ["--loss", "[0, 1)"]),
        (["--crash", "x"], ["--crash", "WORKER@TIME"]),
        (["--crash", "7@1"], ["--crash", "worker 7"]),
        (["--link-down", "0-1@3-2"], ["--link-down"]),
        (["--compute", "weird"], ["--compute", "constant, lognormal, trace"]),
        (["--compute", "trace", "--trace", "/nonexistent/steps.txt"], ["--trace", "does not exist"]),
        (["--compute-time", "abc"], ["--compute-time"]),
        (["--target-loss", "-1"], ["--target-loss"]),
        (["--sweep", "nokey=1"], ["--sweep", "nokey", "sweepable keys"]),
        (["--sweep", "workers=a"], ["--sweep", "--workers", "'a'"]),
        (["--sweep", "workers"], ["--sweep", "KEY=V1,V2"]),
        (["--sweep", "workers=4,4"], ["--sweep", "twice"]),
        (["--sweep", "slowdown=0.5"], ["--sweep", "--slowdown", ">= 1"]),
        (["--sweep", "slowdown=1,1.0"], ["--sweep", "the same"]),
        (["--workers", "8", "--sweep", "workers=4,16"], ["--sweep", "--workers"]),
        (["--sweep", "workers=2,4", "--crash", "3@0.1"], ["--sweep", "workers=2", "--crash"]),
        (
            ["--sweep", "workers=4,5", "--sweep", "topology=ring,torus"],
            ["workers=5,topology=torus", "--topology"],
        ),
        (["--calibrate", "/nonexistent-run"], ["--calibrate", "events.jsonl"]),
    ],
)
def test_bad_simulate_input_exits_2_naming_the_flag(args, needles, tmp_path, capsys):
    run_dir = tmp_path / "r"
    code = exit_code(["simulate", *QUAD, "--max-gradients", "20", "--run-dir", str(run_dir), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err
    assert not run_dir.exists()  # rejected before anything ran


# -- sweeps -----------------------------------------------------------------------------------------------
SWEEP = [*QUAD, "--max-gradients", "240", "--target-loss", "0.5", "--eval-every", "0.02", "--no-progress"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sweep")
    argv = [
        "simulate",
        *SWEEP,
        "--sweep",
        "workers=4,16",
        "--sweep",
        "slowdown=1,3",
        "--run-dir",
        str(run_dir),
    ]
    assert main(argv) == 0
    return run_dir


def test_a_2x2_sweep_writes_one_row_per_point_a_table_and_a_figure_per_key(sweep_dir):
    rows = read_rows(sweep_dir / "sweep.csv")
    assert [(r["workers"], float(r["slowdown"])) for r in rows] == [("4", 1), ("4", 3), ("16", 1), ("16", 3)]
    for key in ("gradients_computed", "s_avg", "s_max", "s_hat_avg", "s_hat_max", "final_loss", "wall_s"):
        assert all(r[key] for r in rows), key
    for row in rows:
        point = sweep_dir / "points" / f"workers={row['workers']},slowdown={float(row['slowdown']):g}"
        summary = json.loads((point / "summary.json").read_text())
        assert summary["workers"] == int(row["workers"]) and summary["time_unit"] == "virtual"
        assert int(row["gradients_computed"]) == summary["gradients_computed"]
    md = (sweep_dir / "sweep.md").read_text()
    assert md.count("[report](points/") == 4 and "sweep_workers.png" in md


def _cell(text: str) -> float:
    return float(text) if text else math.nan  # an empty cell (never reached the target) is a gap


def test_the_sweep_figures_draw_the_table(sweep_dir):
    """Each panel of sweep_<key>.png holds, per value of the other key, the table's column against the key."""
    table = read_rows(sweep_dir / "sweep.csv")
    value = {(int(r["workers"]), float(r["slowdown"])): r for r in table}
    # The rows as the sweep handed them to the figures: numbers, None where the table has an empty cell.
    rows = [
        {
            "workers": int(r["workers"]),
            "slowdown": float(r["slowdown"]),
            **{c: (float(r[c]) if r[c] else None) for c, _ in SWEEP_PLOT_METRICS},
        }
        for r in table
    ]
    figures = sweep_figures(rows, {"workers": [4, 16], "slowdown": [1.0, 3.0]}, title="dasgd on quadratic")
    assert list(figures) == ["sweep_workers.png", "sweep_slowdown.png"]
    for name, xs, lines in (
        (
            "sweep_workers.png",
            [4, 16],
            [("slowdown=1", [(4, 1.0), (16, 1.0)]), ("slowdown=3", [(4, 3.0), (16, 3.0)])],
        ),
        (
            "sweep_slowdown.png",
            [1.0, 3.0],
            [("workers=4", [(4, 1.0), (4, 3.0)]), ("workers=16", [(16, 1.0), (16, 3.0)])],
        ),
    ):
        for ax, (column, label) in zip(figures[name].axes, SWEEP_PLOT_METRICS, strict=True):
            assert ax.get_ylabel() == label
            drawn = ax.get_lines()
            assert [line.get_label() for line in drawn] == [want for want, _ in lines], (name, column)
            for line, (_, points) in zip(drawn, lines):
                assert list(line.get_xdata()) == xs
                want = [_cell(value[p][column]) for p in points]
                np.testing.assert_array_equal(line.get_ydata(), want, err_msg=f"{name} {column}")
        png = sweep_dir / "plots" / name
        assert png.read_bytes() == _png(figures[name]), name  # the file is this figure


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_a_slowdown_sweep_without_stragglers_slows_a_quarter_of_the_workers(sweep_dir):
    assert "straggler_share was set to 0.25" in (sweep_dir / "sweep.md").read_text()
    expected = {(4, 1): 0, (4, 3): 1, (16, 1): 0, (16, 3): 4}  # round(0.25 n) workers, only if slowdown > 1
    for (n, slowdown), count in expected.items():
        summary = json.loads(
            (sweep_dir / "points" / f"workers={n},slowdown={slowdown}" / "summary.json").read_text()
        )
        assert sorted(summary["simulation"]["stragglers"].values()) == [float(slowdown)] * count


def test_staleness_grows_with_the_number_of_workers_as_worked_out_by_hand(sweep_dir):
    """Constant 10 ms steps, 1 ms latency, complete graph: all n workers finish round r together at 10r ms.

    A round-r gradient started at 10(r-1) ms, before the round r-1 gradients of the other n-1 workers
    arrived (1 ms later), so it misses those n-1; and in the global order (ties by origin) it comes after the
    i other round-r gradients ranked before it, which it misses too. s = n - 1 + i, i = 0..n-1, so
    S_avg = 1.5 (n - 1) in steady state (the first round misses less, so the run average is a little lower).
    """
    rows = {
        int(r["workers"]): float(r["s_avg"])
        for r in read_rows(sweep_dir / "sweep.csv")
        if float(r["slowdown"]) == 1
    }
    assert rows[16] > rows[4]
    for n, s_avg in rows.items():
        assert 0.9 * 1.5 * (n - 1) <= s_avg <= 1.5 * (n - 1)


def test_to_target_columns_match_the_evaluations_in_the_event_log(sweep_dir):
    for row in read_rows(sweep_dir / "sweep.csv"):
        point = sweep_dir / "points" / f"workers={row['workers']},slowdown={float(row['slowdown']):g}"
        evals = [json.loads(line) for line in (point / "events.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e.get("type") == "eval" and not e.get("final")]
        first = min((e for e in evals if e["loss"] <= 0.5), key=lambda e: e["time"])
        assert int(row["gradients_to_target"]) == first["gradients"] > 0
        assert float(row["time_to_target_s"]) == first["time"]


def test_rerunning_a_sweep_reuses_finished_points_and_finishes_an_interrupted_one(sweep_dir, capsys):
    points = sorted((sweep_dir / "points").iterdir())
    assert len(points) == 4
    interrupted = sweep_dir / "points" / "workers=16,slowdown=3"
    before = {p.name: (p / "summary.json").stat().st_mtime_ns for p in points}
    before_rows = read_rows(sweep_dir / "sweep.csv")
    (interrupted / "summary.json").unlink()  # as if the sweep had been stopped while this point ran
    capsys.readouterr()
    argv = [
        "simulate",
        *SWEEP,
        "--sweep",
        "workers=4,16",
        "--sweep",
        "slowdown=1,3",
        "--run-dir",
        str(sweep_dir),
    ]
    assert main(argv) == 0
    assert "1 point(s) simulated, 3 reused" in capsys.readouterr().out
    after = {p.name: (p / "summary.json").stat().st_mtime_ns for p in points}
    assert {k: v for k, v in after.items() if k != interrupted.name} == {
        k: v for k, v in before.items() if k != interrupted.name
    }
    # Deterministic simulation: the re-run point gives the same numbers as before.
    columns = ("gradients_computed", "s_avg", "s_max", "s_hat_avg", "s_hat_max", "final_loss")
    strip = [{c: r[c] for c in columns} for r in before_rows]
    assert [{c: r[c] for c in columns} for r in read_rows(sweep_dir / "sweep.csv")] == strip


def test_a_point_whose_spec_changed_is_run_again(tmp_path, capsys):
    argv = ["simulate", *QUAD, "--max-gradients", "30", "--no-progress", "--run-dir", str(tmp_path)]
    assert main([*argv, "--sweep", "workers=2"]) == 0
    assert main([*argv, "--sweep", "workers=2"]) == 0
    assert main([*argv, "--latency", "0.004", "--sweep", "workers=2"]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("1 point(s) simulated, 0 reused") == 2 and out.count("0 point(s) simulated, 1 reused") == 1
    )


# -- pieces -------------------------------------------------------------------------------------------------
def test_parse_sweep_accepts_flag_spellings():
    assert parse_sweep("straggler-share=0.1,0.2") == ("straggler_share", ("0.1", "0.2"))
    assert parse_sweep("--crash=1@0.5+0@1,none") == ("crashes", ("1@0.5+0@1", "none"))
    with pytest.raises(SpecError, match="--sweep"):
        parse_sweep("workers=4,")


def test_plan_sweep_is_the_cartesian_product_in_the_order_given(tmp_path):
    plan = plan_sweep(
        {"task": "quadratic", "simulation": {"latency": 0.003}},
        {"max_gradients": 10, "simulation": {}},
        ["lr=0.1,0.05", "workers=3,2", "crash=1@0.5+0@1,none"],
        tmp_path,
    )
    assert [p.name for p in plan.points][:3] == [
        "lr=0.1,workers=3,crashes=1@0.5+0@1",
        "lr=0.1,workers=3,crashes=none",
        "lr=0.1,workers=2,crashes=1@0.5+0@1",
    ]
    assert len(plan.points) == 8
    last = plan.points[-1].spec
    assert (last.lr, last.workers, last.simulation.crashes) == (0.05, 2, ())
    first = plan.points[0].spec
    assert first.simulation.crashes == ((1, 0.5), (0, 1.0)) and first.simulation.latency == 0.003
    assert first.run_dir == str(tmp_path / "points" / plan.points[0].name)
    assert plan.notes == ()


def test_sweeping_workers_on_the_quadratic_without_lr_says_the_stepsize_follows(tmp_path):
    plan = plan_sweep(
        {"task": "quadratic"}, {"max_gradients": 10, "simulation": {}}, ["workers=2,8"], tmp_path
    )
    assert [p.spec.workers for p in plan.points] == [2, 8]
    assert any("0.5 / workers" in n for n in plan.notes)
    fixed = plan_sweep(
        {"task": "quadratic"}, {"max_gradients": 10, "lr": 0.01, "simulation": {}}, ["workers=2,8"], tmp_path
    )
    assert fixed.notes == ()


def test_loss_to_target_takes_the_first_evaluation_at_or_below_the_target():
    evals = [
        {"worker": 0, "time": 0.2, "gradients": 40, "loss": 0.9},
        {"worker": 0, "time": 0.0, "gradients": 0, "loss": 3.0},
        {"worker": 0, "time": 0.4, "gradients": 80, "loss": 0.5},
        {"worker": 0, "time": 0.6, "gradients": 120, "loss": 0.4},
        {"worker": 0, "time": 0.7, "gradients": 130, "loss": 0.05, "final": 1.0},  # after training stopped
    ]
    assert loss_to_target(evals, 0.5) == (80, 0.4)
    assert loss_to_target(evals, 0.1) == (None, None)
    assert loss_to_target([{"time": 1.0, "gradients": 5, "test_loss": 0.2, "loss": 9.0}], 0.3) == (5, 1.0)


def test_sweep_figure_draws_one_line_per_combination_of_the_other_keys():
    rows = [
        {"workers": 16, "slowdown": 1.0, "s_avg": 21.0, "s_hat_max": 31, "gradients_to_target": None},
        {"workers": 4, "slowdown": 1.0, "s_avg": 4.5, "s_hat_max": 7, "gradients_to_target": 100},
        {"workers": 4, "slowdown": 2.0, "s_avg": 4.0, "s_hat_max": 9, "gradients_to_target": 120},
        {"workers": 16, "slowdown": 2.0, "s_avg": 20.0, "s_hat_max": 50, "gradients_to_target": 300},
    ]
    fig = sweep_figure(rows, "workers", [16, 4], ["slowdown"])
    panels = fig.axes
    assert [ax.get_ylabel() for ax in panels] == [label for _, label in SWEEP_PLOT_METRICS]
    s_avg = panels[0].lines
    assert [line.get_label() for line in s_avg] == ["slowdown=1", "slowdown=2"]
    assert list(s_avg[0].get_xdata()) == [4.0, 16.0]  # numeric keys are drawn in increasing order
    assert list(s_avg[0].get_ydata()) == [4.5, 21.0] and list(s_avg[1].get_ydata()) == [4.0, 20.0]
    to_target = panels[2].lines[0].get_ydata()
    assert to_target[0] == 100 and math.isnan(to_target[1])  # no value: a gap, not a zero


def test_calibrate_replays_a_runs_step_times(tmp_path):
    """A run with one 3x straggler, replayed from its event log with no straggler flags: same work per worker."""
    common = ["simulate", *QUAD, "--workers", "3", "--max-gradients", "90", "--no-progress"]
    assert main([*common, "--straggler", "1x3", "--run-dir", str(tmp_path / "a")]) == 0
    assert main([*common, "--calibrate", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b"))
    assert b["simulation"]["compute"] == "trace"
    assert [w["computed"] for w in b["per_worker"]] == [w["computed"] for w in a["per_worker"]]
    assert a["per_worker"][1]["computed"] < a["per_worker"][0]["computed"] / 2
