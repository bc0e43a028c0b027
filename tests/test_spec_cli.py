"""Spec validation at the edge and the CLI's exit codes: bad input is exit 2 with a message, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dasgd.experiments.spec import SpecError, resolve_spec


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "dasgd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"workers": 0}, "--workers"),
        ({"lr": -1}, "--lr"),
        ({"task": "cifar"}, "--task"),
        ({"stragglers": ["7x3"]}, "--straggler"),
        ({"stragglers": ["1x0.5"]}, "--straggler"),
        ({"target_accuracy": 1.5}, "--target-accuracy"),
        ({"data": "weird"}, "--data"),
        ({"max_gradients": "many"}, "--max-gradients"),
        ({"bogus_key": 1}, "--bogus-key"),
        ({"task": "quadratic", "target_accuracy": 0.9}, "--target-accuracy"),
    ],
)
def test_bad_values_name_their_flag(overrides, flag):
    with pytest.raises(SpecError) as info:
        resolve_spec({}, **overrides)
    assert info.value.flag == flag
    assert flag in str(info.value)


def test_default_budget_and_straggler_forms():
    spec = resolve_spec({"stragglers": {1: 5}}, task="digits-logreg", workers=2)
    # Without a stop rule a run gets its task's default budget (1,500 gradients for digits-logreg); with one,
    # nothing is added.
    assert spec.max_gradients == 1500 and spec.max_seconds is None
    timed = resolve_spec({}, task="digits-logreg", workers=2, max_seconds=3)
    assert timed.max_gradients is None and timed.max_seconds == 3
    assert spec.slowdown(1) == 5.0 and spec.slowdown(0) == 1.0
    assert resolve_spec({}, stragglers="1x4,0x2").stragglers == ((0, 2.0), (1, 4.0))


def test_spec_round_trips_through_yaml(tmp_path):
    from dasgd.experiments.spec import load_spec_file

    spec = resolve_spec({}, task="quadratic", dim=7, stragglers=["2x3"], workers=3, max_seconds=2)
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert resolve_spec(load_spec_file(path)) == spec


@pytest.mark.multiprocess  # runs the CLI in a process of its own
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--workers", "0"], "--workers"),
        (["train", "--straggler", "oops"], "--straggler"),
        (["train", "--task", "digits-logreg", "--workers", "5", "--topology", "torus"], "torus"),
        (["train", "--topology", "edges:/nonexistent/file.txt", "--task", "digits-logreg"], "file"),
        (["train", "--spec", "/nonexistent.yaml"], "does not exist"),
        (["train", "--lr", "abc"], "invalid float"),
        (["report", "/nonexistent-run"], "no events.jsonl"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message_and_no_traceback(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess  # runs the CLI in a process of its own
def test_cli_missing_dataset_says_how_to_install(tmp_path):
    proc = run_cli(
        "train",
        "--task",
        "fashion-cnn",
        "--run-dir",
        str(tmp_path / "r"),
        env={"DASGD_FASHION_MNIST_DIR": str(tmp_path / "empty")},
    )
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess  # runs the CLI in a process of its own
def test_bad_yaml_spec_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [1, 2\n")
    proc = run_cli("train", "--spec", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_audit_is_a_bool_and_a_non_bool_is_refused_with_the_fix() -> None:
    from dasgd.experiments.spec import SpecError, resolve_spec

    assert resolve_spec({"audit": True}, task="quadratic").audit is True
    assert resolve_spec({}, task="quadratic").audit is False
    with pytest.raises(SpecError, match=r"--audit: 1 is not a valid bool: give true or false"):
        resolve_spec({"audit": 1}, task="quadratic")
