"""Tests for the run outputs: event log, metrics.csv, plots and the report.

Every expected value below is written out by hand from the tiny schedule in ``_schedule``; none is computed by
the code under test.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dasgd.metrics.eventlog import (
    EventLogError,
    EventLogWriter,
    read_event_log,
    write_event_log,
    write_metrics_csv,
)
from dasgd.metrics.plots import plot_run, run_figures
from dasgd.runs.report import NA, ReportError, format_summary, format_value, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _schedule() -> dict[str, Any]:
    """Two workers, five gradients, written out of completion order on purpose.

    Sorted by end time: k0 = w0#0, k1 = w1#0, k2 = w0#1, k3 = w1#1, k4 = w0#2. By hand:
    k0: nothing missing                                  s=0, s^=0
    k1: clock [0,0] misses w0#0 (k0)                      s=1, s^=1-0=1
    k2: clock [1,0] misses w1#0 (k1)                      s=1, s^=2-1=1
    k3: clock [1,1] misses w0#1 (k2)                      s=1, s^=3-2=1
    k4: clock [2,0] misses w1#0 (k1), w1#1 (k3), holds k2 s=2, s^=4-1=3
    S_avg = 5/5 = 1.0, S_max = 2, S^_avg = 6/5 = 1.2, S^_max = 3.
    """
    rows = [  # origin, index, start, end, clock
        (0, 2, 2.0, 4.0, [2, 0]),
        (0, 0, 0.0, 1.0, [0, 0]),
        (0, 1, 1.0, 2.0, [1, 0]),
        (1, 0, 0.0, 1.5, [0, 0]),
        (1, 1, 1.5, 3.0, [1, 1]),
    ]
    return {
        "origin": np.array([r[0] for r in rows], dtype=np.int64),
        "index": np.array([r[1] for r in rows], dtype=np.int64),
        "start": np.array([r[2] for r in rows], dtype=np.float64),
        "end": np.array([r[3] for r in rows], dtype=np.float64),
        "clock": np.array([r[4] for r in rows], dtype=np.int64),
        "evals": [
            {"worker": 0, "time": 2.5, "gradients": 3, "test_accuracy": 0.5, "test_loss": 0.75},
            {"worker": 1, "time": 1.25, "gradients": 2, "test_accuracy": 0.25, "test_loss": 1.5},
            {
                "worker": 0,
                "time": 4.5,
                "gradients": 5,
                "test_accuracy": 0.875,
                "test_loss": 0.125,
                "lr": 0.01,
            },
        ],
        "runs": [
            {"event": "start", "time": 0.0},
            {"event": "stop", "time": 4.0, "reason": "max_gradients"},
            {"event": "drained", "time": 4.5},
        ],
    }


def _write_schedule(path: Path) -> dict[str, Any]:
    data = _schedule()
    write_event_log(path, **data)
    return data


# ---------------------------------------------------------------- event log


def test_reading_without_clocks_keeps_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    data = _write_schedule(path)
    full, light = read_event_log(path), read_event_log(path, clocks=False)
    for name in ("origin", "index", "start", "end"):
        np.testing.assert_array_equal(getattr(light, name), getattr(full, name))
    assert light.evals == full.evals and light.runs == full.runs
    assert light.clock.shape[0] == 0
    with pytest.raises(EventLogError, match="without its clocks"):
        light.staleness()
    # The clock is not read, but the fields before it still are: a bad origin is still an error.
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"origin": ' + str(data["origin"][0]), '"origin": "x"', 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EventLogError, match="origin"):
        read_event_log(path, clocks=False)


def test_clock_entries_beyond_int32_are_read_exactly(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    big = 2**31 + 5
    write_event_log(path, [0, 1, 0], [0, 0, 1], [0.0, 0.0, 1.0], [1.0, 1.5, 2.0], [[0, 0], [0, 0], [1, big]])
    log = read_event_log(path)
    assert log.clock.dtype == np.int64
    np.testing.assert_array_equal(log.clock, [[0, 0], [0, 0], [1, big]])
    path.write_text(path.read_text().replace(str(big), str(2**70)))
    with pytest.raises(EventLogError, match="too large"):
        read_event_log(path)


def test_round_trip_equals_inputs(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    data = _write_schedule(path)
    log = read_event_log(path)
    for name in ("origin", "index", "clock"):
        got = getattr(log, name)
        assert got.dtype == (np.int32 if name == "clock" else np.int64)  # clocks are stored narrow
        np.testing.assert_array_equal(got, data[name])
    for name in ("start", "end"):
        got = getattr(log, name)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, data[name])
    assert log.clock.shape == (5, 2)
    assert log.world_size == 2
    assert log.num_gradients == 5
    assert log.evals == data["evals"]
    assert log.runs == data["runs"]
    assert not log.origin.flags.writeable


def test_writer_writes_contract_lines_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLogWriter(path) as writer:
        writer.write_gradient(2, 17, 1.234, 1.240, [5, 3, 17, 4])
        writer.write_eval(0, 2.5, 812, {"test_accuracy": 0.91, "test_loss": 0.33})
    with EventLogWriter(path) as writer:  # a second writer appends, never truncates
        writer.write_run("stop", 3.0, reason="time_limit")
    lines = path.read_text().splitlines()
    assert (
        lines[0]
        == '{"type": "gradient", "origin": 2, "index": 17, "start": 1.234, "end": 1.24, "clock": [5, 3, 17, 4]}'
    )
    assert json.loads(lines[1]) == {
        "type": "eval",
        "worker": 0,
        "time": 2.5,
        "gradients": 812,
        "test_accuracy": 0.91,
        "test_loss": 0.33,
    }
    assert json.loads(lines[2]) == {"type": "run", "event": "stop", "time": 3.0, "reason": "time_limit"}
    assert len(lines) == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda w: w.write_gradient(0, 0, 0.0, 1.0, [0, True]),
        lambda w: w.write_eval(0, 1.0, 3, {"time": 0.5}),
        lambda w: w.write_eval(0, 1.0, 3, {"acc": "high"}),
    ],
)
def test_writer_rejects_bad_events(tmp_path: Path, call: Any) -> None:
    with EventLogWriter(tmp_path / "events.jsonl") as writer, pytest.raises(EventLogError):
        call(writer)


def test_writer_rejects_clock_width_change(tmp_path: Path) -> None:
    with EventLogWriter(tmp_path / "events.jsonl") as writer:
        writer.write_gradient(0, 0, 0.0, 1.0, [0, 0])
        with pytest.raises(EventLogError, match="3 entries"):
            writer.write_gradient(1, 0, 0.0, 1.0, [0, 0, 0])


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ('{"type": "gradient", "origin": 0, "index": 1', "not valid JSON"),
        ('{"type": "gradient", "origin": 0, "index": 1, "start": 0.0, "end": 1.0}', "'clock'"),
        (
            '{"type": "gradient", "origin": 0, "index": 1, "start": 0.0, "end": 1.0, "clock": [1, 0, 0]}',
            "3 entries",
        ),
        (
            '{"type": "gradient", "origin": 5, "index": 1, "start": 0.0, "end": 1.0, "clock": [1, 0]}',
            "origin 5",
        ),
        (
            '{"type": "gradient", "origin": 0, "index": "1", "start": 0.0, "end": 1.0, "clock": [1, 0]}',
            "'index'",
        ),
        ('{"type": "eval", "worker": 0, "time": 1.0, "gradients": 2, "acc": "x"}', "'acc'"),
        ('{"type": "eval", "worker": 0, "time": 1.0}', "'gradients'"),
        ('{"type": "heartbeat", "time": 1.0}', "heartbeat"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, words: str) -> None:
    path = tmp_path / "events.jsonl"
    good = '{"type": "gradient", "origin": 0, "index": 0, "start": 0.0, "end": 1.0, "clock": [0, 0]}'
    # Line 2 is blank: skipped, but still counted, so the bad line is physical line 3.
    path.write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(EventLogError, match=words) as info:
        read_event_log(path)
    assert f"{path}:3:" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_staleness_of_hand_worked_schedule(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write_schedule(path)
    stats = read_event_log(path).staleness()
    assert stats.count == 5
    assert stats.s_avg == pytest.approx(1.0)
    assert stats.s_max == 2
    assert stats.loose_avg == pytest.approx(1.2)
    assert stats.loose_max == 3
    np.testing.assert_array_equal(stats.per_gradient, [0, 1, 1, 1, 2])
    np.testing.assert_array_equal(stats.loose, [0, 1, 1, 1, 3])


def test_metrics_csv_content(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write_schedule(path)
    out = tmp_path / "metrics.csv"
    write_metrics_csv(read_event_log(path), out)
    assert out.read_text() == (
        "time,gradients,test_accuracy,test_loss,lr\n"
        "1.25,2,0.25,1.5,\n"
        "2.5,3,0.5,0.75,\n"
        "4.5,5,0.875,0.125,0.01\n"
    )


def test_metrics_csv_of_log_without_evals(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("")
    out = tmp_path / "metrics.csv"
    write_metrics_csv(read_event_log(path), out)
    assert out.read_text() == "time,gradients\n"


# ---------------------------------------------------------------- plots


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC)
    assert data[: len(PNG_MAGIC)] == PNG_MAGIC


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _lines(ax: Any) -> list[tuple[str, list[float], list[float]]]:
    """(label, x, y) of every line drawn on ``ax``, as plain lists."""
    return [
        (line.get_label(), [float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
        for line in ax.get_lines()
    ]


def test_plot_run_writes_every_png(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write_schedule(path)
    log = read_event_log(path)
    figures = run_figures(log, title="tiny")
    names = ["accuracy.png", "loss.png", "staleness.png", "throughput.png"]
    assert list(figures) == names
    # Each metric per worker, by time and by gradients held, exactly the evals of _schedule (sorted by time).
    for name, w0, w1 in (("accuracy.png", [0.5, 0.875], [0.25]), ("loss.png", [0.75, 0.125], [1.5])):
        by_time, by_grads = figures[name].axes
        assert _lines(by_time) == [("worker 0", [2.5, 4.5], w0), ("worker 1", [1.25], w1)], name
        assert _lines(by_grads) == [("worker 0", [3.0, 5.0], w0), ("worker 1", [2.0], w1)], name
    assert figures["loss.png"].axes[0].get_yscale() == "log"  # every loss > 0
    assert figures["accuracy.png"].axes[0].get_yscale() == "linear"
    # Staleness: s_k = [0, 1, 1, 1, 2] and s^_k = [0, 1, 1, 1, 3] by hand (_schedule's docstring), one bar per
    # integer value, then the average and the maximum as vertical lines.
    strict, loose = figures["staleness.png"].axes
    for ax, counts, avg, peak in ((strict, [1, 3, 1], 1.0, 2.0), (loose, [1, 3, 0, 1], 1.2, 3.0)):
        (bars,) = ax.patches
        values, edges, _ = bars.get_data()
        assert values.tolist() == counts
        assert edges.tolist() == [i - 0.5 for i in range(len(counts) + 1)]
        (avg_line, peak_line) = ax.get_lines()
        assert avg_line.get_xdata() == pytest.approx([avg, avg])
        assert list(peak_line.get_xdata()) == [peak, peak]
    # Throughput: each worker's gradients by completion time, from (0, 0): w0 ends 1, 2, 4; w1 ends 1.5, 3.
    (ax,) = figures["throughput.png"].axes
    assert _lines(ax) == [
        ("worker 0", [0.0, 1.0, 2.0, 4.0], [0.0, 1.0, 2.0, 3.0]),
        ("worker 1", [0.0, 1.5, 3.0], [0.0, 1.0, 2.0]),
    ]
    assert all(fig.get_suptitle() == "tiny" for fig in figures.values())
    # plot_run writes exactly these figures (the same pixels as the figures checked above).
    out = tmp_path / "plots"
    written = plot_run(log, out, title="tiny")
    assert written == [out / n for n in names]
    for name in names:
        _assert_png(out / name)
        assert (out / name).read_bytes() == _png(figures[name]), name


def test_plot_run_quadratic_loss_only(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    data = _schedule()
    data["evals"] = [
        {"worker": 0, "time": 1.0, "gradients": 1, "loss": 4.0},
        {"worker": 0, "time": 2.0, "gradients": 3, "loss": 0.5},
    ]
    write_event_log(path, **data)
    log = read_event_log(path)
    figures = run_figures(log, time_label="virtual time (s)")
    assert list(figures) == ["loss.png", "staleness.png", "throughput.png"]
    by_time, by_grads = figures["loss.png"].axes
    assert _lines(by_time) == [("worker 0", [1.0, 2.0], [4.0, 0.5])]
    assert _lines(by_grads) == [("worker 0", [1.0, 3.0], [4.0, 0.5])]
    assert by_time.get_xlabel() == "virtual time (s)" and by_time.get_ylabel() == "loss"
    out = tmp_path / "plots"
    written = plot_run(log, out, time_label="virtual time (s)")
    assert [p.name for p in written] == ["loss.png", "staleness.png", "throughput.png"]
    _assert_png(out / "loss.png")
    assert (out / "loss.png").read_bytes() == _png(figures["loss.png"])
    assert not (out / "accuracy.png").exists()


def test_plot_run_empty_log_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "run", "event": "start", "time": 0.0}\n')
    out = tmp_path / "plots"
    assert plot_run(read_event_log(path), out) == []
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- report


def _summary() -> dict[str, Any]:
    return {
        "task": "logistic",
        "algorithm": "dasgd",
        "workers": 2,
        "topology": "complete",
        "stop_reason": "max_gradients",
        "time_unit": "wall",
        "wall_time_s": 12.5,
        "samples_per_s": 3200.0,
        "final_metrics": {"test_accuracy": 0.9125, "test_loss": 0.3125},
        "gradients_computed": 4000,
        "gradients_applied": [4000, 4000],
        "gradients_lost": 0,
        "staleness": {
            "count": 4000,
            "s_avg": 2.25,
            "s_max": 7,
            "loose_avg": 3.5,
            "loose_max": 12,
            "anomalies": 0,
        },
        "replicas_agree": True,
        "max_replica_diff": 0.0,
        "per_worker": [
            {
                "rank": 0,
                "computed": 2100,
                "applied": 4000,
                "rejected": {"duplicate": 2, "corrupt": 1},
                "sent_messages": 150,
                "sent_bytes": 123456,
            },
            {
                "rank": 1,
                "computed": 1900,
                "applied": 4000,
                "rejected": {},
                "sent_messages": 140,
                "sent_bytes": 9876,
            },
        ],
    }


def test_report_contains_summary_numbers(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "staleness.png").write_bytes(PNG_MAGIC)
    (plots / "accuracy.png").write_bytes(PNG_MAGIC)
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for expected in (
        "**task** logistic",
        "**algorithm** dasgd",
        "**workers** 2",
        "**topology** complete",
        "**stop reason** max_gradients",
        "| final test accuracy | 0.9125 |",
        "| final test loss | 0.3125 |",
        "| gradients computed | 4000 |",
        "| gradients applied | 4000 on each of 2 replicas |",
        "| gradients lost | 0 |",
        "| S_avg (average staleness) | 2.25 |",
        "| S_max (maximum staleness) | 7 |",
        "| S^_avg (average loose staleness) | 3.5 |",
        "| S^_max (maximum loose staleness) | 12 |",
        "| wall time (s) | 12.5 |",
        "| samples/s | 3200 |",
        "| replicas agree | yes (max difference 0) |",
        "| 0 | 2100 | 4000 | 3 (corrupt: 1, duplicate: 2) | 150 | 123456 |",
        "| 1 | 1900 | 4000 | 0 | 140 | 9876 |",
        "![Test accuracy](plots/accuracy.png)",
        "![Staleness histogram](plots/staleness.png)",
    ):
        assert expected in text, expected
    # Only plots that exist are embedded, in the fixed order.
    assert "plots/loss.png" not in text
    assert text.index("plots/accuracy.png") < text.index("plots/staleness.png")


def test_report_missing_keys_render_na(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{}")
    text = write_report(tmp_path).read_text()
    for label in (
        "final test accuracy",
        "final test loss",
        "gradients computed",
        "gradients applied",
        "gradients lost",
        "S_avg (average staleness)",
        "S^_max (maximum loose staleness)",
        "wall time (s)",
        "samples/s",
        "replicas agree",
    ):
        assert f"| {label} | {NA} |" in text, label
    assert "**task** n/a" in text
    assert "![" not in text


def test_report_wrong_types_render_na(tmp_path: Path) -> None:
    summary = {
        "staleness": 5,
        "final_metrics": [1, 2],
        "gradients_applied": [1, "a"],
        "per_worker": [{"rank": "zero", "rejected": "many"}, 7],
        "replicas_agree": "maybe",
        "time_unit": "virtual",
        "wall_time_s": 3.0,
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = write_report(tmp_path).read_text()
    assert "| S_avg (average staleness) | n/a |" in text
    assert "| gradients applied | n/a |" in text
    assert "| replicas agree | n/a |" in text
    assert "| virtual time (s) | 3 |" in text
    assert "| zero | n/a | n/a | n/a | n/a | n/a |" in text


def test_report_without_summary_file(tmp_path: Path) -> None:
    text = write_report(tmp_path).read_text()
    assert "summary.json was not found" in text
    assert "| gradients computed | n/a |" in text


def test_report_invalid_summary_names_file(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match="summary.json"):
        write_report(tmp_path)


def test_format_summary_lines() -> None:
    text = format_summary(_summary())
    assert text == (
        "logistic / dasgd: 2 workers, topology complete, stopped by max_gradients\n"
        "gradients: 4000 computed, applied 4000 on each of 2 replicas, 0 lost; "
        "replicas agree: yes (max difference 0)\n"
        "staleness: S_avg 2.25, S_max 7, S^_avg 3.5, S^_max 12\n"
        "final: test accuracy 0.9125, test loss 0.3125; 12.5 s (wall), 3200 samples/s"
    )


def test_applied_counts_that_differ_show_the_range() -> None:
    few = format_summary({"gradients_applied": [3990, 4000]})
    assert "applied 3990 to 4000 (per replica: 3990, 4000)" in few
    many = format_summary({"gradients_applied": [4000] * 9 + [3990]})
    assert "applied 3990 to 4000 over 10 replicas" in many


def test_format_summary_empty_and_quadratic() -> None:
    assert format_summary({}).count(NA) >= 10
    text = format_summary({"final_metrics": {"loss": 0.0625}, "time_unit": "virtual", "wall_time_s": 2.0})
    assert "loss 0.0625" in text
    assert "2 s (virtual)" in text


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "n/a"),
        (True, "yes"),
        (np.bool_(False), "no"),
        (4000, "4000"),
        (np.int64(7), "7"),
        (12.0, "12"),
        (0.912345, "0.9123"),
        (np.float64(2.25), "2.25"),
        (float("nan"), "nan"),
        ("", "n/a"),
        ([1], "n/a"),
    ],
)
def test_format_value(value: Any, shown: str) -> None:
    assert format_value(value) == shown
