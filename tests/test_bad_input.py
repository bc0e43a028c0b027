"""Bad input (issue 12, items 10-14): every malformed invocation exits 2 with one line naming the flag or file
and the fix, never a traceback and never lost work; random flag sets and spec files (hypothesis) either do
that or make a valid run.

Everything runs in-process through the CLI's own ``main`` (an uncaught exception fails the test outright);
the runs that do happen are tiny simulations of the quadratic.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dasgd.cli import main
from dasgd.experiments.spec import SpecError

TINY = ["--task", "quadratic", "--workers", "2", "--max-gradients", "20", "--no-progress"]
BASE = ["--task", "quadratic", "--max-gradients", "20", "--no-progress"]  # a spec file may set the workers
BINARY = b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfd" + bytes(range(256)) * 4


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main()'s exit code (argparse's SystemExit included) and what it wrote to stderr."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, *needles: str) -> str:
    """Exit 2 with exactly one line, a ``dasgd: error:`` holding every needle; returns that line."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dasgd: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def _files(tmp: Path) -> dict[str, str]:
    """The files the cases below point at, made in ``tmp``; the placeholders in their argv name them."""
    (tmp / "binary.bin").write_bytes(BINARY)
    (tmp / "a-dir").mkdir()
    (tmp / "a-file").write_text("not a directory\n")
    paths = {"BIN": tmp / "binary.bin", "DIR": tmp / "a-dir", "FILE": tmp / "a-file", "RUN": tmp / "run"}
    specs = {
        "SIM5": {"simulation": 5},
        "SIMSTR": {"simulation": "abc"},
        "SIMLIST": {"simulation": [1, 2]},
        "SIMPAIRS": {"simulation": [["latency", 0.1]]},  # dict() would have taken it as a mapping
        "SIMKEY": {"simulation": {1: 2}},
        "INTKEY": {1: 2},
        "NULLS": {"workers": None, "dim": None, "seed": None},  # null means "the default": a valid spec
        "BANDWIDTH0": {"simulation": {"bandwidth": 0}},
        "STRAGGLER_INF": {"stragglers": ["1x1e309"]},
        "STRAGGLER_PAIR": {"stragglers": [[1]]},
        "BATCH": {"batch_size": 1.0e9},
        "DIM": {"dim": 2.0e9},
        "WORKERS_INF": {"workers": float("inf")},
        "LINKS_INT": {"simulation": {"links": 5}},
        "NEWLINE_KEY": {"bad\nkey": 1},
    }
    for name, values in specs.items():
        paths[name] = tmp / f"{name.lower()}.yaml"
        paths[name].write_text(yaml.safe_dump(values))
    return {k: str(v) for k, v in paths.items()}


# (argv with placeholders, what the one line must say). Every case named in issue 12, items 10-13.
CASES = {
    # Item 10: spec files whose simulation section is not a mapping (dict() ran before the type check).
    "spec simulation: 5": (["simulate", "--spec", "SIM5"], ["simulation", "must be a mapping", "int"]),
    "spec simulation: 'abc'": (["simulate", "--spec", "SIMSTR"], ["simulation", "must be a mapping"]),
    "spec simulation: a list": (["simulate", "--spec", "SIMLIST"], ["simulation", "must be a mapping"]),
    "spec simulation: pairs": (["simulate", "--spec", "SIMPAIRS"], ["simulation", "must be a mapping"]),
    "spec simulation: int keys": (["simulate", "--spec", "SIMKEY"], ["simulation", "is not a name"]),
    "spec int keys": (["train", "--spec", "INTKEY"], ["SPEC", "is not a name"]),
    "train spec simulation: 5": (["train", "--spec", "SIM5"], ["simulation", "must be a mapping"]),
    # Item 10: binary files (UnicodeDecodeError), a directory and /dev/null ("does not exist").
    "binary spec": (["simulate", "--spec", "BIN"], ["SPEC", "binary.bin", "is not UTF-8 text"]),
    "binary trace": (
        ["simulate", "--compute", "trace", "--trace", "BIN"],
        ["--trace", "binary.bin", "is not UTF-8 text"],
    ),
    "binary compare file": (
        ["compare", "BIN", "--simulate", "--algorithms", "dasgd"],
        ["SPEC", "binary.bin", "is not UTF-8 text"],
    ),
    "spec is a directory": (["train", "--spec", "DIR"], ["SPEC", "a-dir", "is a directory"]),
    "spec is /dev/null": (["train", "--spec", "/dev/null"], ["SPEC", "/dev/null", "is not a regular file"]),
    "trace is a directory": (
        ["simulate", "--compute", "trace", "--trace", "DIR"],
        ["--trace", "a-dir", "is a directory"],
    ),
    "trace is /dev/null": (
        ["simulate", "--compute", "trace", "--trace", "/dev/null"],
        ["--trace", "is not a regular file"],
    ),
    "compare file is a directory": (
        ["compare", "DIR", "--simulate", "--algorithms", "dasgd"],
        ["SPEC", "is a directory"],
    ),
    "compare file is /dev/null": (
        ["compare", "/dev/null", "--simulate", "--algorithms", "dasgd"],
        ["SPEC", "is not a regular file"],
    ),
    # Item 11: an output directory under a regular file (an uncaught OSError).
    "train --run-dir under a file": (["train", "--run-dir", "FILE/run"], ["--run-dir", "not a directory"]),
    "simulate --run-dir under a file": (
        ["simulate", "--run-dir", "FILE/run"],
        ["--run-dir", "not a directory"],
    ),
    "sweep --run-dir under a file": (
        ["simulate", "--sweep", "workers=2,3", "--run-dir", "FILE/run"],
        ["--run-dir", "not a directory"],
    ),
    "compare --out under a file": (
        ["compare", "--simulate", "--algorithms", "dasgd", "--out", "FILE/out"],
        ["--out", "not a directory"],
    ),
    "--run-dir is a file": (["simulate", "--run-dir", "FILE"], ["--run-dir", "is not a directory"]),
    # Item 13: an unset secret variable, infinite and huge straggler factors, unbounded sizes, bandwidth 0.
    "unset --secret-env": (["train", "--secret-env", "DASGD_TEST_UNSET_SECRET"], ["--secret-env", "not set"]),
    "--straggler 1x1e309": (["train", "--straggler", "1x1e309"], ["--straggler:", "inf"]),
    "--straggler 1x1e300": (["train", "--straggler", "1x1e300"], ["--straggler:", "1e+300"]),
    "simulate --straggler 1x1e309": (["simulate", "--straggler", "1x1e309"], ["--straggler:"]),
    "spec straggler 1x1e309": (["train", "--spec", "STRAGGLER_INF"], ["--straggler:"]),
    "spec straggler [1]": (["train", "--spec", "STRAGGLER_PAIR"], ["--straggler:", "[RANK, FACTOR]"]),
    "--batch-size 1e9": (["train", "--batch-size", "1000000000"], ["--batch-size", "held in memory"]),
    "spec batch_size 1e9": (["simulate", "--spec", "BATCH"], ["--batch-size", "held in memory"]),
    "--dim 2e9": (["train", "--dim", "2000000000"], ["--dim", "float64"]),
    "spec dim 2e9": (["simulate", "--spec", "DIM"], ["--dim", "float64"]),
    "--dim x --batch-size too large together": (
        ["simulate", "--dim", "5000000", "--batch-size", "100"],
        ["--dim", "batch size 100 x dim 5000000", "--batch-size"],
    ),
    "--bandwidth 0": (["simulate", "--bandwidth", "0"], ["--bandwidth", "must be positive"]),
    "spec bandwidth 0": (["simulate", "--spec", "BANDWIDTH0"], ["--bandwidth", "must be positive"]),
    # Found on the way (by the hypothesis tests below or by hand).
    "spec workers .inf": (["simulate", "--spec", "WORKERS_INF"], ["--workers", "not a valid int"]),
    "spec links: 5": (["simulate", "--spec", "LINKS_INT"], ["links", "list"]),
    "spec key with a line break": (
        ["simulate", "--spec", "NEWLINE_KEY"],
        ["--bad\\nkey", "unknown spec key"],
    ),
    "--compute-time inf": (["simulate", "--compute-time", "inf"], ["--compute-time", "not a valid float"]),
    "--latency inf": (["simulate", "--latency", "inf"], ["--latency", "not a valid float"]),
    "--crash 1@1e309": (["simulate", "--crash", "1@1e309"], ["--crash", "not a finite number"]),
    "--crash 1@+-": (["simulate", "--crash", "1@+-"], ["--crash", "not a finite number"]),
    "--link-down 0-1@0-inf": (["simulate", "--link-down", "0-1@0-1e999"], ["--link-down", "finite"]),
    "--slowdown 1e300": (["simulate", "--slowdown", "1e300"], ["--slowdown", "at most"]),
    "--eval-every 1e-300 simulated": (["simulate", "--eval-every", "1e-300"], ["--eval-every", "at least"]),
    "--calibrate a binary run": (["simulate", "--calibrate", "BINRUN"], ["--calibrate", "not UTF-8"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_named_in_the_issue_exits_2_with_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DASGD_TEST_UNSET_SECRET", raising=False)
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    files = _files(tmp_path)
    (tmp_path / "binrun").mkdir()
    (tmp_path / "binrun" / "events.jsonl").write_bytes(BINARY)
    files["BINRUN"] = str(tmp_path / "binrun")
    argv, needles = CASES[case]
    argv = [files.get(a, a.replace("FILE", files["FILE"])) for a in argv]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, err = call([*argv, *BASE], capsys)
    line = assert_refused(rc, err, *needles)
    assert "--stragglers" not in line  # not a flag (the field's name is)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing was written


def test_null_values_in_a_spec_file_mean_the_defaults(tmp_path, capsys):
    files = _files(tmp_path)
    rc, err = call(["simulate", "--spec", files["NULLS"], *TINY, "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 0, err
    written = yaml.safe_load((tmp_path / "r" / "spec.yaml").read_text())
    assert (written["workers"], written["dim"], written["seed"]) == (2, 100, 0)


@pytest.mark.parametrize(
    ("extra", "rc", "ran"),
    [
        # The theory section overflowed: a traceback after the run, report lost. Now the run also diverges
        # (NaN/inf): exit code 3, with the report written.
        (["--lr", "1e300"], 3, True),
        (["--noise", "1e300"], 3, True),  # an infinite loss: diverged (exit 3; it exited 0 before)
        (["--crash", "0@0", "--crash", "1@0"], 1, False),  # no replica left: IndexError in the summary
        (["--crash-rate", "1e300"], 1, False),
    ],
)
def test_extreme_valid_settings_end_with_a_report_or_one_line(extra, rc, ran, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = call(["simulate", *TINY, *extra, "--run-dir", str(run)], capsys)
    assert code == rc and "Traceback" not in err, err
    assert all(line.startswith("dasgd: ") for line in err.splitlines()), err
    assert (run / "report.md").is_file() == ran
    if not ran:
        assert err.startswith("dasgd: run failed: every worker crashed") and err.count("\n") == 1, err


# --- Item 11: an existing run directory is refused unless --overwrite; with it no stale file is left ------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny simulated run (copied by each test that damages or reuses it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["simulate", *TINY, "--run-dir", str(run)]) == 0
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", [["simulate"], ["train"], ["simulate", "--sweep", "seed=1,2"]])
def test_an_existing_run_directory_is_refused_without_overwrite(finished_run, tmp_path, capsys, command):
    run = _copy(finished_run, tmp_path / "run")
    before = _snapshot(run)
    rc, err = call([*command, *TINY, "--run-dir", str(run)], capsys)
    # A sweep may resume its own directory, never a single run's: refused as not a sweep directory.
    assert_refused(
        rc, err, "--run-dir", str(run), "sweep directory" if "--sweep" in command else "--overwrite"
    )
    assert _snapshot(run) == before


def test_overwrite_replaces_an_earlier_runs_outputs_and_leaves_no_stale_file(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    (run / "plots" / "accuracy.png").write_bytes(b"an old run's figure")  # a quadratic run draws none
    (run / "notes.txt").write_text("mine\n")
    rc, err = call(["simulate", *TINY, "--seed", "3", "--run-dir", str(run), "--overwrite"], capsys)
    assert rc == 0, err
    assert not (run / "plots" / "accuracy.png").exists()
    assert (run / "notes.txt").read_text() == "mine\n"  # not dasgd's: left alone
    assert yaml.safe_load((run / "spec.yaml").read_text())["seed"] == 3


def test_a_non_empty_directory_that_is_no_run_is_refused_even_with_overwrite(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious\n")
    for extra in ([], ["--overwrite"]):
        rc, err = call(["simulate", *TINY, "--run-dir", str(tmp_path / "mine"), *extra], capsys)
        assert_refused(rc, err, "--run-dir", "not a dasgd run directory")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious\n"
    (tmp_path / "empty").mkdir()
    rc, err = call(["simulate", *TINY, "--run-dir", str(tmp_path / "empty")], capsys)
    assert rc == 0, err  # an empty directory is a new one


def test_default_run_directories_never_collide(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the same second, most likely: the second gets a suffix, not a refusal
        rc, err = call(["simulate", *TINY], capsys)
        assert rc == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").is_file() for r in runs)


def test_compare_resumes_its_own_directory_refuses_others_and_overwrite_starts_afresh(
    finished_run, tmp_path, capsys
):
    argv = ["compare", "--simulate", "--algorithms", "dasgd", *TINY[:6], "--no-progress"]
    rc, err = call([*argv, "--out", str(finished_run)], capsys)
    assert_refused(rc, err, "--out", "comparison directory")
    out = tmp_path / "cmp"
    assert call([*argv, "--out", str(out)], capsys)[0] == 0
    (out / "plots" / "stale.png").write_bytes(b"old")
    rc, err = call([*argv, "--out", str(out)], capsys)
    assert rc == 0 and "already finished, reused" in err, err
    assert (out / "plots" / "stale.png").exists()  # resuming keeps the directory
    rc, err = call([*argv, "--out", str(out), "--overwrite"], capsys)
    assert rc == 0 and "reused" not in err, err
    assert not (out / "plots" / "stale.png").exists()


def test_the_api_refuses_an_existing_run_directory_unless_overwrite(finished_run, tmp_path, monkeypatch):
    import dasgd

    run = _copy(finished_run, tmp_path / "run")
    with pytest.raises(SpecError, match="overwrite=True") as info:
        dasgd.train(task="quadratic", workers=2, max_gradients=20, run_dir=str(run))
    assert info.value.flag == "run_dir"
    with pytest.raises(SpecError, match="not a directory"):
        dasgd.train(task="quadratic", run_dir=str(run / "spec.yaml" / "x"))
    with pytest.raises(SpecError, match="must be a mapping"):
        dasgd.train(5)  # type: ignore[arg-type]
    seen = []
    monkeypatch.setattr("dasgd.runs.launcher.launch_local", lambda spec, run_dir: seen.append(run_dir))
    dasgd.train(task="quadratic", workers=2, max_gradients=20, run_dir=str(run), overwrite=True)
    assert seen == [run] and not (run / "summary.json").exists() and not (run / "plots").exists()


# --- Item 12: `dasgd report` never replaces good outputs with worse ones -----------------------------------


def _truncate(text: bytes) -> bytes:
    return text[: len(text) - 7]


DAMAGE = {
    "corrupt": lambda b: b.replace(b'"gradient"', b'"gradjent"', 1),
    "truncated": _truncate,
    "binary": lambda b: BINARY,
    "empty": lambda b: b"",
    "only blank lines": lambda b: b"\n\n",
    "a JSON list": lambda b: b"[1, 2]\n",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_report_on_a_bad_event_log_exits_2_and_leaves_the_outputs(finished_run, tmp_path, capsys, damage):
    run = _copy(finished_run, tmp_path / "run")
    events = run / "events.jsonl"
    events.write_bytes(DAMAGE[damage](events.read_bytes()))
    before = _snapshot(run)
    rc, err = call(["report", str(run)], capsys)
    assert_refused(rc, err, "events.jsonl", "left as it was")
    assert _snapshot(run) == before
    assert not list(run.glob(".dasgd-*"))  # nothing left behind either


@pytest.mark.parametrize("name", ["events.jsonl", "spec.yaml"])
def test_theory_on_a_binary_file_exits_2_naming_it(finished_run, tmp_path, capsys, name):
    run = _copy(finished_run, tmp_path / "run")
    (run / name).write_bytes(BINARY)
    assert_refused(*call(["theory", str(run)], capsys), name, "not UTF-8 text")


def test_report_on_a_damaged_summary_exits_2_and_leaves_the_outputs(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    (run / "summary.json").write_text("[]")
    before = _snapshot(run)
    assert_refused(*call(["report", str(run)], capsys), "summary.json", "JSON object")
    assert _snapshot(run) == before


def test_report_rebuilds_a_good_run_and_puts_the_old_outputs_back_when_rendering_fails(
    finished_run, tmp_path, capsys, monkeypatch
):
    run = _copy(finished_run, tmp_path / "run")
    (run / "metrics.csv").write_text("old\n")
    rc, err = call(["report", str(run)], capsys)
    assert rc == 0, err
    assert (run / "metrics.csv").read_text() != "old\n"
    before = _snapshot(run)

    def fail(run_dir, log=None, **options):
        (run_dir / "metrics.csv").write_text("half\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dasgd.runs.results.render_run_dir", fail)
    rc, err = call(["report", str(run)], capsys)
    assert rc == 1 and err.count("\n") == 1 and "No space left" in err and "put back" in err, err
    assert _snapshot(run) == before


# --- Item 14: random flag sets and spec files --------------------------------------------------------------

_NUM_BAD = ["nan", "inf", "-inf", "-1", "0", "1e309", "abc", "[1]", ""]

# flag: (valid values, for a tiny run; bad values). A drawn flag set mixes both.
FLAGS: dict[str, tuple[st.SearchStrategy, list[str]]] = {
    "--workers": (st.integers(1, 3).map(str), ["0", "-1", "200000", "1.5", "abc", "1e309"]),
    "--lr": (st.sampled_from(["0.01", "0.1"]), _NUM_BAD),
    "--batch-size": (st.integers(1, 64).map(str), ["0", "-5", "1000000000", "1e9", "x"]),
    "--seed": (st.integers(0, 2**32).map(str), ["-1", "1.5", "s"]),
    "--max-gradients": (st.integers(1, 30).map(str), ["0", "-3", "1e3", "inf"]),
    "--max-seconds": (st.sampled_from(["0.05", "1e6", "1e300"]), _NUM_BAD),
    "--eval-every": (st.sampled_from(["0.01", "0.5", "1e300"]), [*_NUM_BAD, "1e-300"]),
    "--straggler": (
        st.sampled_from(["1x2", "0x1", "1x1e6"]),
        ["1x1e309", "1x1e300", "1x0.5", "1xnan", "9x2", "x", "1x-1", "1x+-", "-1x2"],
    ),
    "--grads-per-message": (st.integers(1, 4).map(str), ["0", "1000000", "-1"]),
    "--dim": (st.integers(1, 50).map(str), ["0", "2000000000", "-1", "1e3"]),
    "--noise": (st.sampled_from(["0", "1", "1e300"]), ["-1", "nan", "inf"]),
    "--condition": (st.sampled_from(["1", "100", "1e300"]), ["0.5", "nan", "inf"]),
    "--topology": (
        st.sampled_from(["complete", "ring"]),
        ["torus:0x0", "random-regular:99", "edges:/nonexistent", "bogus", "edges:/dev/null", "torus:1x"],
    ),
    "--algorithm": (st.sampled_from(["dasgd", "sync", "gossip", "local-sgd"]), ["nope", ""]),
    "--cap-scale": (st.sampled_from(["0", "1"]), ["2", "nan", "-0.5"]),
    "--staleness-bound": (st.integers(1, 10).map(str), ["0", "-2"]),
    "--local-steps": (st.integers(1, 4).map(str), ["0", "-1"]),
    "--drain-timeout": (st.sampled_from(["1", "1e300"]), ["0", "-1", "nan", "inf"]),
    "--compute-time": (st.sampled_from(["0.001", "0.5", "1e300"]), _NUM_BAD),
    "--compute": (st.sampled_from(["constant", "lognormal"]), ["trace", "x"]),
    "--compute-sigma": (st.sampled_from(["0", "1", "1e300"]), ["-1", "nan", "inf"]),
    "--latency": (st.sampled_from(["0", "0.01", "1e300"]), ["-1", "nan", "inf"]),
    "--latency-sigma": (st.sampled_from(["0", "1"]), ["-1", "nan"]),
    "--bandwidth": (st.sampled_from(["1e6", "inf", "1e-300"]), ["0", "-1", "nan", "x"]),
    "--loss": (st.sampled_from(["0", "0.3"]), ["1", "-0.1", "nan"]),
    "--loss-mode": (st.sampled_from(["retransmit", "count"]), ["x"]),
    "--retransmit-after": (st.sampled_from(["0.001", "0.1"]), ["0", "inf", "-1"]),
    "--straggler-share": (st.sampled_from(["0", "0.5"]), ["2", "nan", "-1"]),
    "--slowdown": (st.sampled_from(["1", "4"]), ["0.5", "1e7", "inf", "nan"]),
    "--crash": (st.sampled_from(["1@0.05", "0@0"]), ["1@1e309", "1@inf", "9@1", "x", "1@-1", "1@+-"]),
    "--crash-rate": (st.sampled_from(["0", "1", "1e300"]), ["-1", "nan", "inf"]),
    "--link-down": (st.sampled_from(["0-1@0-0.05"]), ["0-0@0-1", "0-1@1-0", "0-1@0-1e999", "x"]),
}


@st.composite
def flag_sets(draw: st.DrawFn) -> list[str]:
    argv: list[str] = []
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), min_size=1, max_size=4, unique=True)):
        valid, bad = FLAGS[flag]
        argv += [flag, draw(st.one_of(valid, st.sampled_from(bad)))]
    return argv


def assert_refused_or_ran(rc: int, err: str, run: Path) -> None:
    """rc 2 with one ``dasgd: error:`` line (argparse adds its usage), or a run that wrote its directory (rc 1:
    the run itself reported a failure, e.g. every worker crashed, each problem one ``dasgd:`` line; rc 3: the
    run diverged, said in one line, and its directory is written with the point marked)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if rc == 2:
        errors = [line for line in lines if line.startswith("dasgd: error: ")]
        assert len(errors) == 1, err
        assert all(line.startswith(("usage:", " ", "(see `", "dasgd: error: ")) for line in lines), err
        return
    assert rc in (0, 1, 3), (rc, err)
    assert all(line.startswith("dasgd: ") for line in lines), err
    if rc == 3:
        assert any(line.startswith("dasgd: error: the run diverged") for line in lines), err
    assert rc == 1 or (run / "summary.json").is_file(), err


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=flag_sets())
def test_random_flag_sets_are_refused_with_one_line_or_run(argv, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        rc, err = call(["simulate", *TINY, *argv, "--run-dir", str(run)], capsys)
        assert_refused_or_ran(rc, err, run)


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 2**31, 2**63, 10**30, -(10**30)]),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 1e-300, 0.5]),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_VALID = {
    "workers": st.integers(1, 3),
    "lr": st.sampled_from([0.01, 0.1]),
    "batch_size": st.integers(1, 64),
    "seed": st.integers(0, 2**31),
    "dim": st.integers(1, 50),
    "noise": st.sampled_from([0.0, 1.0]),
    "condition": st.sampled_from([1.0, 10.0]),
    "algorithm": st.sampled_from(["dasgd", "sync", "gossip"]),
    "topology": st.sampled_from(["complete", "ring"]),
    "stragglers": st.sampled_from([["1x2"], {1: 3}, "1x4"]),
    "grads_per_message": st.integers(1, 4),
    "local_steps": st.integers(1, 4),
    "staleness_bound": st.integers(1, 8),
    "cap_scale": st.sampled_from([0.0, 0.5]),
    "eval_every": st.sampled_from([0.01, 1.0]),
    "max_seconds": st.sampled_from([0.05, 1e300]),
    "drain_timeout": st.sampled_from([1.0, 1e300]),
    "data": st.just("shared"),
    "notes": st.just({"who": "me"}),
}
_SIM_VALID = {
    "compute_time": st.sampled_from([0.001, 0.5]),
    "latency": st.sampled_from([0.0, 0.01]),
    "bandwidth": st.sampled_from([1e6, None, "inf"]),
    "loss": st.sampled_from([0.0, 0.3]),
    "crashes": st.sampled_from([["1@0.05"], [[0, 0.02]]]),
    "link_down": st.sampled_from([["0-1@0-0.05"]]),
    "links": st.sampled_from([[[0, 1, 0.01, 1e8]], ["0-1:0.01:1e8"]]),
    "slowdown": st.sampled_from([1.0, 3.0]),
    "straggler_share": st.sampled_from([0.0, 0.5]),
    "batched": st.booleans(),
}


@st.composite
def spec_dicts(draw: st.DrawFn) -> dict:
    spec: dict = {"task": "quadratic", "workers": 2, "max_gradients": 20}
    for key in draw(st.lists(st.sampled_from(sorted(_VALID)), max_size=4, unique=True)):
        spec[key] = draw(st.one_of(_VALID[key], _JUNK))
    sim_keys = draw(st.lists(st.sampled_from(sorted(_SIM_VALID)), max_size=3, unique=True))
    if sim_keys:
        spec["simulation"] = {k: draw(st.one_of(_SIM_VALID[k], _JUNK)) for k in sim_keys}
    if draw(st.integers(0, 9)) == 0:
        spec["simulation"] = draw(_JUNK)  # the section itself of the wrong type
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.text(max_size=6))] = draw(_JUNK)  # an unknown key
    return spec


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=spec_dicts())
def test_random_spec_files_are_refused_with_one_line_or_run(spec, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path, run = Path(tmp) / "spec.yaml", Path(tmp) / "run"
        path.write_text(yaml.safe_dump(spec))
        rc, err = call(["simulate", "--spec", str(path), "--no-progress", "--run-dir", str(run)], capsys)
        assert_refused_or_ran(rc, err, run)
