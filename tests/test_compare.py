"""`dasgd compare`: plan, resume, rows and verdict from hand-made summaries, plots, CLI exit codes, and one
small comparison end to end in the simulator with every algorithm registered at test time."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dasgd.algorithms import ALGORITHMS
from dasgd.cli import main
from dasgd.experiments.spec import RunSpec, SpecError
from dasgd.metrics.compare_plots import comparison_figures, curve_of, plot_comparison
from dasgd.metrics.eventlog import EventLog
from dasgd.runs.compare import (
    aggregate_rows,
    compare_verdict,
    parse_algorithms,
    parse_seeds,
    plan_comparison,
    run_comparison,
)

DIGITS = {"task": "digits-logreg", "workers": 3, "max_gradients": 60, "target_accuracy": 0.8}


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def two_algorithms(monkeypatch):
    """A second registered name ("alt", DASGD's class), so plans and runs of two algorithms can be tested."""
    monkeypatch.setitem(ALGORITHMS, "alt", ALGORITHMS["dasgd"])
    return ("dasgd", "alt")


def fake_summary(time_to_target: float | None, grads: int | None, sent: list[int], **extra: Any) -> dict:
    return {
        "time_to_target_s": time_to_target,
        "gradients_to_target": grads,
        "final_metrics": {"test_accuracy": extra.get("acc", 0.85), "test_loss": 0.5},
        "samples_per_s": extra.get("sps", 1000.0),
        "staleness": {"s_avg": extra.get("s_avg", 2.5), "loose_max": extra.get("s_hat_max", 9)},
        "per_worker": [{"rank": r, "sent_bytes": b} for r, b in enumerate(sent)],
        "gradients_computed": extra.get("computed", 100),
        "wall_time_s": extra.get("train", 10.0),
        "gradients_lost": 0,
    }


class FakeRunner:
    """Writes what a finished run leaves (spec.yaml, summary.json, report.md) and records each call."""

    def __init__(self, summaries: dict[str, dict], fail: set[str] = frozenset()) -> None:
        self.summaries = summaries
        self.fail = set(fail)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, spec: RunSpec, run_dir: Path) -> dict:
        self.calls.append((spec.algorithm, spec.seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(spec.to_yaml())
        if spec.algorithm in self.fail:
            raise RuntimeError(f"{spec.algorithm} blew up")
        summary = self.summaries[spec.algorithm]
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (run_dir / "report.md").write_text("# done\n")
        return summary


# -- parsing ------------------------------------------------------------------------------------------


def test_parse_algorithms_keeps_the_order_given_and_accepts_lists():
    assert parse_algorithms("b, a", known=["a", "b", "c"]) == ("b", "a")
    assert parse_algorithms(["a", "c,b"], known=["a", "b", "c"]) == ("a", "c", "b")


@pytest.mark.parametrize(
    ("text", "needle"),
    [("a,zzz", "unknown algorithm 'zzz'; choose from: a, b"), ("a,,b", "comma-separated"), ("a,a", "twice")],
)
def test_parse_algorithms_rejects_bad_lists_naming_the_flag(text, needle):
    with pytest.raises(SpecError) as info:
        parse_algorithms(text, known=["a", "b"])
    assert info.value.flag == "--algorithms" and needle in str(info.value)


def test_parse_seeds_forms_and_errors():
    assert parse_seeds(["0", "2,5"]) == (0, 2, 5)
    assert parse_seeds(3) == (3,)
    for bad in (["-1"], ["x"], ["1", "1"]):
        with pytest.raises(SpecError, match="--seeds"):
            parse_seeds(bad)


# -- plan ---------------------------------------------------------------------------------------------


def test_plan_gives_every_algorithm_the_same_spec_in_its_own_directory(tmp_path, two_algorithms):
    plan = plan_comparison(
        {"task": "quadratic", "lr": 0.1},
        {"workers": 4, "stragglers": ["1x4"], "max_gradients": 50},
        ["alt", "dasgd"],
        tmp_path / "out",
        simulate=True,
    )
    assert [r.algorithm for r in plan.runs] == ["alt", "dasgd"]
    assert [r.run_dir for r in plan.runs] == [tmp_path / "out" / "alt", tmp_path / "out" / "dasgd"]
    for run in plan.runs:
        assert run.spec.algorithm == run.algorithm
        assert run.spec.stragglers == ((1, 4.0),)
        assert (run.spec.task, run.spec.workers, run.spec.lr, run.spec.max_gradients) == (
            "quadratic",
            4,
            0.1,
            50,
        )
    assert plan.runs[0].spec.simulation == plan.runs[1].spec.simulation
    assert not plan.has_target and plan.time_unit == "virtual"


def test_plan_with_several_seeds_nests_a_directory_per_seed(tmp_path):
    plan = plan_comparison({}, {"task": "quadratic"}, ["dasgd"], tmp_path, seeds=[3, 1])
    assert [(r.seed, r.spec.seed, r.run_dir) for r in plan.runs] == [
        (3, 3, tmp_path / "dasgd" / "seed-3"),
        (1, 1, tmp_path / "dasgd" / "seed-1"),
    ]
    assert plan.runs[0].label == "dasgd seed 3"


@pytest.mark.parametrize(
    ("overrides", "kwargs", "flag"),
    [
        ({"algorithm": "dasgd"}, {}, "--algorithm"),
        ({"run_dir": "x"}, {}, "--run-dir"),
        ({"seed": 1}, {"seeds": [2]}, "--seeds"),
        ({"workers": 0}, {}, "--workers"),
        ({"target_accuracy": 0.9}, {"target_loss": 0.1}, "--target-loss"),
        ({}, {"target_loss": -1.0}, "--target-loss"),
    ],
)
def test_plan_rejects_conflicting_or_bad_input_naming_the_flag(tmp_path, overrides, kwargs, flag):
    with pytest.raises(SpecError) as info:
        plan_comparison({"task": "digits-logreg"}, overrides, ["dasgd"], tmp_path, **kwargs)
    assert info.value.flag == flag


# -- run, resume, rows --------------------------------------------------------------------------------


def quad_plan(tmp_path: Path, names=("dasgd", "alt"), target: float | None = 0.5, seeds=None):
    overrides = {"task": "digits-logreg", "max_gradients": 40, "target_accuracy": target}
    return plan_comparison({}, overrides, list(names), tmp_path / "cmp", seeds=seeds, simulate=True)


def test_rows_come_from_each_runs_summary(tmp_path, two_algorithms):
    runner = FakeRunner(
        {
            "dasgd": fake_summary(2.0, 120, [100, 300], s_avg=3.5, s_hat_max=12, sps=5000.0),
            "alt": fake_summary(5.0, 400, [1000, 1000, 4000], s_avg=0.0, s_hat_max=0),
        }
    )
    plan = quad_plan(tmp_path)
    outcome = run_comparison(plan, run_one=runner)
    assert runner.calls == [("dasgd", 0), ("alt", 0)] and outcome.ran == ["dasgd", "alt"]
    rows = {r["algorithm"]: r for r in read_csv(plan.out_dir / "compare.csv")}
    assert float(rows["dasgd"]["time_to_target_s"]) == 2.0
    assert int(rows["dasgd"]["gradients_to_target"]) == 120
    assert float(rows["dasgd"]["bytes_sent_per_worker"]) == 200.0  # (100 + 300) / 2
    assert float(rows["alt"]["bytes_sent_per_worker"]) == 2000.0  # (1000 + 1000 + 4000) / 3
    assert float(rows["dasgd"]["s_avg"]) == 3.5 and int(rows["dasgd"]["s_hat_max"]) == 12
    assert float(rows["dasgd"]["samples_per_s"]) == 5000.0 and float(rows["alt"]["final_accuracy"]) == 0.85
    assert rows["dasgd"]["reached"] == "1" and rows["alt"]["reached"] == "1"
    md = (plan.out_dir / "compare.md").read_text()
    assert (
        "| dasgd | 1 | 1/1 | 2 | 120 | 0.85 | 0.5 | 5000 | 3.5 | 12 | 200 | [report](dasgd/report.md) |" in md
    )
    report = (plan.out_dir / "report.md").read_text()
    # 5.0 / 2.0, from the rows
    assert "**dasgd** reached the target (test accuracy >= 0.5) first: 2 virtual s, 120 gradients." in report
    assert "- alt: 2.5x dasgd's time (5 virtual s, 400 gradients)." in report
    assert {"compare.csv", "compare_runs.csv", "compare.md", "report.md", "compare.yaml"} <= {
        p.name for p in plan.out_dir.iterdir()
    }


def test_a_finished_comparison_is_reused_and_an_interrupted_run_is_rerun(tmp_path, two_algorithms):
    summaries = {"dasgd": fake_summary(2.0, 120, [1]), "alt": fake_summary(3.0, 150, [1])}
    plan = quad_plan(tmp_path)
    first = FakeRunner(summaries)
    run_comparison(plan, run_one=first)
    again = FakeRunner(summaries)
    seen: list[tuple[int, int, str]] = []
    outcome = run_comparison(
        plan, run_one=again, on_run=lambda run, i, n, status: seen.append((i, n, status))
    )
    assert again.calls == [] and outcome.reused == ["dasgd", "alt"]
    assert seen == [(1, 2, "running"), (1, 2, "reused"), (2, 2, "running"), (2, 2, "reused")]
    # An interrupted run: its directory lacks report.md (the last file a run writes).
    (plan.out_dir / "alt" / "report.md").unlink()
    third = FakeRunner(summaries)
    outcome = run_comparison(plan, run_one=third)
    assert third.calls == [("alt", 0)] and outcome.reused == ["dasgd"] and outcome.ran == ["alt"]


def test_a_run_whose_spec_changed_is_run_again(tmp_path, two_algorithms):
    summaries = {"dasgd": fake_summary(2.0, 120, [1]), "alt": fake_summary(3.0, 150, [1])}
    run_comparison(quad_plan(tmp_path), run_one=FakeRunner(summaries))
    runner = FakeRunner(summaries)
    run_comparison(quad_plan(tmp_path, target=0.6), run_one=runner)
    assert runner.calls == [("dasgd", 0), ("alt", 0)]


def test_a_failed_run_is_recorded_the_others_finish_and_a_rerun_retries_it(tmp_path, two_algorithms):
    summaries = {"dasgd": fake_summary(2.0, 120, [1]), "alt": fake_summary(3.0, 150, [1])}
    plan = quad_plan(tmp_path)
    # A stale summary of an older run in alt's directory must not make the failed rerun look finished.
    run_comparison(plan, run_one=FakeRunner(summaries))
    (plan.out_dir / "alt" / "report.md").unlink()
    outcome = run_comparison(plan, run_one=FakeRunner(summaries, fail={"alt"}))
    assert outcome.failed == ["alt"] and outcome.reused == ["dasgd"]
    assert not (plan.out_dir / "alt" / "summary.json").exists()
    rows = {r["algorithm"]: r for r in read_csv(plan.out_dir / "compare_runs.csv")}
    assert rows["alt"]["status"] == "failed" and "alt blew up" in rows["alt"]["error"]
    report = (plan.out_dir / "report.md").read_text()
    assert "alt: no run finished" in report and "## Failed runs" in report
    retry = FakeRunner(summaries)
    assert run_comparison(plan, run_one=retry).ran == ["alt"] and retry.calls == [("alt", 0)]


def test_medians_over_seeds_count_a_miss_as_never_with_a_lower_bound():
    def run(alg, t, g, train, computed):
        return {
            "algorithm": alg,
            "status": "ran",
            "time_to_target_s": t,
            "gradients_to_target": g,
            "train_time_s": train,
            "gradients_computed": computed,
            "s_avg": 1.0,
        }

    runs = [
        run("a", 2.0, 20, 9.0, 90),
        run("a", None, None, 10.0, 100),
        run("a", 4.0, 40, 9.0, 90),
        run("b", 1.0, 10, 8.0, 80),
        run("b", None, None, 8.0, 80),
        {"algorithm": "c", "status": "failed"},
    ]
    rows = {r["algorithm"]: r for r in aggregate_rows(runs, ["a", "b", "c"], has_target=True)}
    # a: times sorted (2, 4, never) -> median 4; 2 of 3 reached.
    assert (rows["a"]["time_to_target_s"], rows["a"]["gradients_to_target"], rows["a"]["reached"]) == (
        4.0,
        40,
        2,
    )
    assert rows["a"]["time_to_target_at_least_s"] is None
    # b: (1, never) -> median never; bound: median of (1, 8) = 4.5, gradients median of (10, 80) = 45.
    assert rows["b"]["time_to_target_s"] is None and rows["b"]["time_to_target_at_least_s"] == 4.5
    assert rows["b"]["gradients_to_target_at_least"] == 45
    assert (rows["c"]["runs"], rows["c"]["failed"], rows["c"]["time_to_target_s"]) == (0, 1, None)
    no_target = aggregate_rows(runs, ["a"], has_target=False)[0]
    assert no_target["time_to_target_s"] is None and no_target["reached"] is None and no_target["runs"] == 3


def row(alg: str, t: float | None, bound: float | None = None, runs: int = 1, acc: float = 0.9) -> dict:
    return {
        "algorithm": alg,
        "runs": runs,
        "time_to_target_s": t,
        "time_to_target_at_least_s": bound,
        "gradients_to_target": None if t is None else 10,
        "final_accuracy": acc,
    }


def test_verdict_names_the_first_and_the_ratio_over_each_other_one():
    rows = [row("b", 5.0), row("a", 2.0), row("c", None, bound=8.0), row("d", 2.0), row("e", None, runs=0)]
    v = compare_verdict(rows, has_target=True, target_text="test accuracy >= 0.9", time_unit="wall")
    assert v.winner == "a"  # first in table order among the fastest (a and d tie at 2.0)
    assert v.ratios == {"b": 2.5, "d": 1.0} and v.at_least == {"c": 4.0} and v.failed == ("e",)
    text = "\n".join(v.lines)
    assert "- b: 2.5x a's time" in text and "- d: 1x a's time" in text
    assert "- c: did not reach the target in the 8 s it trained, so more than 4x a's time." in text
    assert "- e: no run finished" in text


def test_verdict_says_plainly_when_nobody_reached_the_target_or_there_is_none():
    v = compare_verdict(
        [row("a", None, 3.0), row("b", None)], has_target=True, target_text="loss <= 1", time_unit="virtual"
    )
    assert v.winner is None and v.lines[0].startswith("No algorithm reached the target (loss <= 1)")
    v = compare_verdict(
        [row("a", None, acc=0.7), row("b", None, acc=0.8)], has_target=False, target_text="", time_unit="wall"
    )
    assert v.winner is None and "No target was set" in v.lines[0] and "**b** (0.8)" in v.lines[1]


# -- plots --------------------------------------------------------------------------------------------


def test_curve_counts_the_gradients_computed_by_each_evaluation():
    ends = np.array([0.3, 0.1, 0.5, 0.2])
    log = EventLog(
        origin=np.zeros(4, dtype=np.int64),
        index=np.arange(4),
        start=ends - 0.05,
        end=ends,
        clock=np.zeros((4, 1), dtype=np.int64),
        evals=[
            {"worker": 0, "time": 0.25, "gradients": 1, "test_accuracy": 0.5},
            {"worker": 0, "time": 0.0, "gradients": 0, "test_accuracy": 0.1},
            {"worker": 0, "time": 0.5, "gradients": 3, "test_accuracy": 0.7},
            {"worker": 0, "time": 0.6, "gradients": 4, "test_accuracy": 0.8, "final": 1.0},
        ],
        world_size=1,
    )
    curve = curve_of(log, "test_accuracy", "x")
    assert curve.time.tolist() == [0.0, 0.25, 0.5]
    assert curve.gradients.tolist() == [0, 2, 4]  # ends <= t: none; 0.1, 0.2; all four
    assert curve.value.tolist() == [0.1, 0.5, 0.7]  # the final evaluation is not on the curve


def test_plot_comparison_skips_runs_without_a_log(tmp_path):
    assert plot_comparison([("a", tmp_path / "missing")], tmp_path / "plots") == []


# -- CLI ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--algorithms", "dasgd,nope"], ["--algorithms", "unknown algorithm 'nope'", "choose from: dasgd"]),
        (["--algorithm", "dasgd"], ["--algorithm", "--algorithms a,b,c"]),
        (["--latency", "0.1"], ["--latency", "--simulate"]),
        (["--seeds", "x"], ["--seeds"]),
        (["--seeds", "1", "--seed", "2"], ["--seeds", "not both"]),
        (["--simulate", "--sweep", "workers=2,4"], ["--sweep"]),
        (["--workers", "0"], ["--workers"]),
        (["no-such-spec.yaml"], ["SPEC", "does not exist"]),
    ],
)
def test_cli_bad_input_exits_2_naming_the_problem(tmp_path, capsys, args, needles):
    code = exit_code(["compare", "--task", "quadratic", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def _training_curve(run_dir: Path, metric: str) -> tuple[list[float], list[float], list[float]]:
    """(times, gradients computed by then, values) of a run's evaluations during training, read here from
    its events.jsonl: what its line in the comparison figures must show."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    ends = [e["end"] for e in events if e["type"] == "gradient"]
    evals = sorted(
        (e["time"], e[metric]) for e in events if e["type"] == "eval" and metric in e and not e.get("final")
    )
    return (
        [t for t, _ in evals],
        [float(sum(end <= t for end in ends)) for t, _ in evals],
        [v for _, v in evals],
    )


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_cli_compares_every_registered_algorithm_in_the_simulator_end_to_end(tmp_path, capsys):
    names = list(ALGORITHMS)
    spec = tmp_path / "spec.yaml"
    # Every algorithm passes 0.8 test accuracy within 15 to 49 gradients here (the simulator is deterministic;
    # measured), and the target stops each run there: the budget of 120 leaves every one of them room.
    spec.write_text("task: digits-logreg\nworkers: 3\nmax_gradients: 120\ntarget_accuracy: 0.8\n")
    out = tmp_path / "cmp"
    argv = ["compare", str(spec), "--algorithms", ",".join(names), "--simulate", "--straggler", "1x4"]
    argv += ["--out", str(out), "--no-progress"]
    assert exit_code(argv) == 0
    captured = capsys.readouterr()
    assert f"[1/{len(names)}] {names[0]}: running (simulated)" in captured.err
    rows = {r["algorithm"]: r for r in read_csv(out / "compare.csv")}
    assert list(rows) == names
    times: dict[str, float] = {}
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["algorithm"] == name and summary["time_unit"] == "virtual"
        assert summary["per_worker"][1]["slowdown"] == 4.0
        r = rows[name]
        assert float(r["s_avg"]) == pytest.approx(summary["staleness"]["s_avg"])
        assert float(r["final_accuracy"]) == pytest.approx(summary["final_metrics"]["test_accuracy"])
        sent = [w["sent_bytes"] for w in summary["per_worker"]]
        assert float(r["bytes_sent_per_worker"]) == pytest.approx(sum(sent) / len(sent))
        assert summary["stop_reason"] == "target_accuracy", (name, summary["stop_reason"])
        assert summary["time_to_target_s"] is not None, name
        times[name] = summary["time_to_target_s"]
        assert r["reached"] == "1" and float(r["time_to_target_s"]) == pytest.approx(times[name])
    report = (out / "report.md").read_text()
    best = min(times, key=lambda n: (times[n], names.index(n)))
    assert f"**{best}** reached the target" in report
    for name, t in times.items():
        if name != best:
            assert f"- {name}: {t / times[best]:.4g}x {best}'s time" in report
    assert "No algorithm reached the target" not in report
    # The figures draw each run's evaluations during training, read here from its own event log, and the
    # target; the files are these figures.
    figures = comparison_figures(
        [(n, out / n) for n in names],
        time_label="virtual time (s)",
        target_accuracy=0.8,
        title="digits-logreg, 3 workers",
    )
    assert list(figures) == ["accuracy_vs_time.png", "accuracy_vs_gradients.png"]
    curves = {n: _training_curve(out / n, "test_accuracy") for n in names}
    for png, axis in (("accuracy_vs_time.png", 0), ("accuracy_vs_gradients.png", 1)):
        (ax,) = figures[png].axes
        *lines, target = ax.get_lines()
        assert [line.get_label() for line in lines] == names
        for name, line in zip(names, lines):
            assert list(line.get_xdata()) == curves[name][axis], (png, name)
            assert list(line.get_ydata()) == curves[name][2], (png, name)
            assert curves[name][2][-1] >= 0.8 > max(curves[name][2][:-1]), name  # it stopped at the target
        assert list(target.get_ydata()) == [0.8, 0.8]
        assert (out / "plots" / png).read_bytes() == _png(figures[png]), png
    # The same command again reuses every finished run.
    stamps = {n: (out / n / "summary.json").stat().st_mtime_ns for n in names}
    assert exit_code(argv) == 0
    assert "already finished, reused" in capsys.readouterr().err
    assert stamps == {n: (out / n / "summary.json").stat().st_mtime_ns for n in names}
    assert math.isfinite(float(rows[names[0]]["samples_per_s"]))


def test_cli_comparison_where_no_algorithm_can_reach_the_target(tmp_path, capsys):
    """The control of the test above: the report's other outcome, on an input where it must hold.

    The evaluation interval (10 virtual s) is far beyond the budget (3 gradients, about 0.02 virtual s), so
    the only evaluation during training is of x0 at time 0 (the final one never counts), and x0 is below the
    target. No run can reach it.
    """
    from dasgd.experiments.spec import resolve_spec
    from dasgd.runs.build import build_task

    x0_spec = resolve_spec({}, task="digits-logreg", workers=3)
    task = build_task(x0_spec)
    assert task.evaluate(task.build_model(x0_spec.seed), full=False)["test_accuracy"] < 0.5
    names = ["dasgd", "sync"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "task: digits-logreg\nworkers: 3\nmax_gradients: 3\neval_every: 10.0\ntarget_accuracy: 0.5\n"
    )
    out = tmp_path / "cmp"
    argv = ["compare", str(spec), "--algorithms", ",".join(names), "--simulate", "--out", str(out)]
    assert exit_code([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    rows = {r["algorithm"]: r for r in read_csv(out / "compare.csv")}
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert f"seed: {x0_spec.seed}\n" in (out / name / "spec.yaml").read_text(), name  # the same x0
        times, _, _ = _training_curve(out / name, "test_accuracy")
        assert times == [0.0], (name, times)
        assert summary["time_to_target_s"] is None and summary["gradients_to_target"] is None, name
        assert summary["stop_reason"] == "max_gradients", name
        assert rows[name]["reached"] == "0" and rows[name]["time_to_target_s"] == "", name
    report = (out / "report.md").read_text()
    assert "No algorithm reached the target (test accuracy >= 0.5) within the budget." in report
    assert "** reached the target" not in report  # no winner line
