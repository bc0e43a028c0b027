"""Settings have one source: every spec field's flag reaches the resolved spec.yaml of every command.

The walk covers each field of RunSpec (and of SimSpec for the simulation commands) that has a flag, so a new
setting is covered the moment it is declared; it fails, asking for a sample value, if none is given below.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dasgd import cli
from dasgd.experiments.settings import cli_fields, flag_of, kind_of
from dasgd.experiments.simspec import SimSpec
from dasgd.experiments.spec import RunSpec, load_spec_file, resolve_spec

# A valid value for each setting, different from its default, as typed on the command line, and as the
# resolved spec.yaml must hold it. None: a bare flag (a bool).
RUN_SAMPLES: dict[str, tuple[str | None, Any]] = {
    "task": ("digits-logreg", "digits-logreg"),
    "workers": ("3", 3),
    "algorithm": ("local-sgd", "local-sgd"),
    "topology": ("ring", "ring"),
    "lr": ("0.123", 0.123),
    "batch_size": ("7", 7),
    "seed": ("11", 11),
    "data": ("shards", "shards"),
    "max_gradients": ("77", 77),
    "max_seconds": ("9.5", 9.5),
    "target_accuracy": ("0.77", 0.77),
    "eval_every": ("0.3", 0.3),
    "stragglers": ("1x5", ["1x5"]),
    "grads_per_message": ("2", 2),
    "local_steps": ("3", 3),
    "staleness_bound": ("5", 5),
    "cap_scale": ("0.25", 0.25),
    "dim": ("12", 12),
    "noise": ("0.5", 0.5),
    "condition": ("4.0", 4.0),
    "device": ("cuda", "cuda"),
    "secret_env": ("MY_SECRET", "MY_SECRET"),
    "drain_timeout": ("33", 33.0),
    "startup_timeout": ("44", 44.0),
    "checkpoint_every": ("55", 55.0),
    "audit": (None, True),
    "diverge_factor": ("20", 20.0),
    "theory": (None, False),
    "plots": (None, False),
    "tensorboard": (None, True),
    "run_dir": ("RUN", "RUN"),
}
SIM_SAMPLES: dict[str, tuple[str | None, Any]] = {
    "compute": ("lognormal", "lognormal"),
    "compute_time": ("0.02", 0.02),
    "compute_sigma": ("0.7", 0.7),
    "trace": ("TRACE", "TRACE"),
    "straggler_share": ("0.25", 0.25),
    "slowdown": ("3", 3.0),
    "latency": ("0.002", 0.002),
    "latency_sigma": ("0.1", 0.1),
    "bandwidth": ("1e8", 1e8),
    "loss": ("0.1", 0.1),
    "loss_mode": ("count", "count"),
    "retransmit_after": ("0.02", 0.02),
    "crashes": ("1@0.5", ["1@0.5"]),
    "crash_rate": ("0.1", 0.1),
    "link_down": ("0-1@0.1-0.2", ["0-1@0.1-0.2"]),
    "batched": (None, False),
}


# Settings that only mean something beside another one.
NEEDS = {"target_accuracy": ["--task", "digits-logreg"]}


class _Captured(BaseException):
    """Raised by the stand-ins below once the command has resolved its spec (nothing is run)."""


def _capture(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Replace what each command runs by a stand-in that writes the spec.yaml the real one writes first."""

    def write(spec: RunSpec, run_dir: Path, *_, **__) -> None:
        (folder / "spec.yaml").write_text(spec.to_yaml())
        raise _Captured

    def compare(plan: Any, *_, **__) -> None:
        write(plan.runs[0].spec, folder)

    # The commands check the secret variable and create their run directory (runs/<task>-<time> by default)
    # before they run: give them both here, not in the working tree.
    monkeypatch.setenv("MY_SECRET", "not-a-real-secret")
    monkeypatch.chdir(folder)
    monkeypatch.setattr("dasgd.runs.launcher.launch_local", write)
    monkeypatch.setattr("dasgd.runs.simulate.simulate", write)
    monkeypatch.setattr("dasgd.runs.compare.run_comparison", compare)


def _in(folder: Path, value: Any) -> Any:
    """The placeholders RUN and TRACE made paths in ``folder``."""
    paths = {"RUN": str(folder / "run"), "TRACE": str(folder / "trace.txt")}
    return paths.get(value, value) if isinstance(value, str) else value


def _args(cls: type, name: str, value: str | None, folder: Path) -> list[str]:
    return [flag_of(cls, name)] if value is None else [flag_of(cls, name), _in(folder, value)]


COMMANDS = {
    "train": ["train", "--task", "quadratic", "--no-progress"],
    "simulate": ["simulate", "--task", "quadratic", "--no-progress"],
    "compare": ["compare", "--task", "quadratic", "--algorithms", "dasgd", "--no-progress"],
    "compare --simulate": ["compare", "--simulate", "--task", "quadratic", "--algorithms", "dasgd"],
}


def _run(monkeypatch, folder: Path, argv: list[str]) -> dict[str, Any]:
    _capture(monkeypatch, folder)
    (folder / "trace.txt").write_text("0.01\n0.02\n")
    with pytest.raises(_Captured):
        cli.main(argv)
    return yaml.safe_load((folder / "spec.yaml").read_text())


def _run_cases() -> list[tuple[str, str]]:
    return [(c, f.name) for c in COMMANDS for f in cli_fields(RunSpec)]


@pytest.mark.parametrize(("command", "name"), _run_cases())
def test_every_run_setting_flag_reaches_the_resolved_spec_yaml(tmp_path, monkeypatch, capsys, command, name):
    assert name in RUN_SAMPLES, f"add a sample value for the new setting {name!r} to RUN_SAMPLES"
    typed, expected = RUN_SAMPLES[name]
    expected = _in(tmp_path, expected)
    field = next(f for f in dataclasses.fields(RunSpec) if f.name == name)
    assert expected != field.default, f"the sample for {name} must differ from its default"
    argv = [*COMMANDS[command], *NEEDS.get(name, []), *_args(RunSpec, name, typed, tmp_path)]
    if command.startswith("compare") and name == "algorithm":
        assert cli.main(argv) == 2  # a comparison names its algorithms with --algorithms
        return
    if name == "device" and not torch.cuda.is_available():
        # The value reached validation, which refuses a device this machine does not have.
        assert cli.main(argv) == 2
        assert "--device: no CUDA device is visible" in capsys.readouterr().err
        return
    written = _run(monkeypatch, tmp_path, argv)
    if command.startswith("compare") and name == "run_dir":
        # --run-dir names the comparison's folder: each run's spec gets a folder of its own under it.
        assert written["run_dir"].startswith(str(tmp_path / "run") + "/")
        return
    assert written[name] == expected
    # What a worker process (or a torchrun rank) reads back from spec.yaml is the same spec.
    again = resolve_spec(load_spec_file(tmp_path / "spec.yaml"), simulate=command != "train")
    assert again.to_dict()[name] == expected


@pytest.mark.parametrize(
    ("command", "name"),
    [(c, f.name) for c in ("simulate", "compare --simulate") for f in cli_fields(SimSpec)],
)
def test_every_simulation_setting_flag_reaches_the_resolved_spec_yaml(tmp_path, monkeypatch, command, name):
    assert name in SIM_SAMPLES, f"add a sample value for the new simulation setting {name!r} to SIM_SAMPLES"
    typed, expected = SIM_SAMPLES[name]
    expected = _in(tmp_path, expected)
    argv = [*COMMANDS[command], *_args(SimSpec, name, typed, tmp_path)]
    written = _run(monkeypatch, tmp_path, argv)
    assert written["simulation"][name] == expected
    again = resolve_spec(load_spec_file(tmp_path / "spec.yaml"), simulate=True)
    assert again.simulation.to_dict()[name] == expected


def test_every_setting_has_a_scalar_kind_or_its_own_parser():
    structured = {"stragglers", "simulation", "notes"}
    for f in dataclasses.fields(RunSpec):
        assert (kind_of(RunSpec, f.name) == "other") == (f.name in structured), f.name
