"""Bad values named in the hardening issue: each exits 2 with one line naming the flag a user types, never a
traceback and never a run (in-process, through the CLI's own main)."""

from __future__ import annotations

import pytest

from dasgd.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # An infinite or astronomically large straggler factor used to be written as "1xinf" (unreadable by the
        # workers) or to kill a worker with OverflowError in sleep; the message named "--stragglers".
        (["train", "--workers", "2", "--straggler", "1x1e309"], "--straggler: slowdown inf for worker 1"),
        (["train", "--workers", "2", "--straggler", "1x1e300"], "--straggler: slowdown 1e+300 for worker 1"),
        (["simulate", "--workers", "2", "--straggler", "1xnan"], "--straggler: '1xnan' is not RANKxFACTOR"),
        (["train", "--workers", "2", "--straggler", "3x2"], "--straggler: worker 3 does not exist"),
        # Bandwidth 0 silently meant unlimited.
        (["simulate", "--bandwidth", "0"], "--bandwidth: must be positive"),
        # An unset secret variable was found only inside the workers (rc 1 after their tracebacks).
        (["train", "--workers", "2", "--secret-env", "DASGD_TEST_UNSET_SECRET"], "--secret-env: environment"),
        (["train", "--grads-per-message", str(2**20)], "--grads-per-message: must be at most 65536"),
        (["train", "--startup-timeout", "0"], "--startup-timeout: must be a positive number of seconds"),
        (["train", "--startup-timeout", "inf"], "--startup-timeout: inf is not a valid float"),
    ],
)
def test_a_bad_value_exits_2_with_one_line_naming_the_flag(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DASGD_TEST_UNSET_SECRET", raising=False)
    rc = main([*args, "--task", "quadratic", "--max-gradients", "10", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_largest_straggler_factor_is_accepted():
    from dasgd.experiments.spec import MAX_SLOWDOWN, resolve_spec

    spec = resolve_spec({}, task="quadratic", workers=2, stragglers=[f"1x{MAX_SLOWDOWN:g}"])
    assert spec.slowdown(1) == MAX_SLOWDOWN
    assert resolve_spec(spec.to_dict()).stragglers == spec.stragglers  # it survives spec.yaml


def test_an_unlimited_bandwidth_survives_the_spec_file_round_trip():
    import math

    from dasgd.experiments.spec import resolve_spec

    spec = resolve_spec({}, simulate=True, task="quadratic")
    assert math.isinf(spec.simulation.bandwidth)
    assert math.isinf(resolve_spec(spec.to_dict(), simulate=True).simulation.bandwidth)
