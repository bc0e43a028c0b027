"""RunSummary: the typed summary.json. Round trips byte for byte, has a field for every key, leaves unset
optional keys out, reads as a read-only mapping, and keeps keys it does not know."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

import dasgd
from dasgd.cli_common import plain
from dasgd.experiments.spec import resolve_spec
from dasgd.runs.report import SUMMARY_KEYS
from dasgd.runs.results import _json_default
from dasgd.runs.simulate import simulate
from dasgd.runs.summary import UNSET, RunSummary, SummaryError, WorkerSummary

FIELDS = [f.name for f in dataclasses.fields(RunSummary) if f.name != "extra"]
WORKER_FIELDS = [f.name for f in dataclasses.fields(WorkerSummary) if f.name != "extra"]
OPTIONAL = [
    "target_accuracy",
    "time_to_target_s",
    "gradients_to_target",
    "failed_workers",
    "simulation",
    "target_loss",
]


def _text(summary: RunSummary) -> str:
    """summary.json's text, as write_run_outputs writes it."""
    return json.dumps(summary.to_dict(), indent=2, default=_json_default) + "\n"


@pytest.fixture(scope="module")
def quad_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSummary, Path]:
    """A small simulated run without a target: its summary and run directory."""
    run_dir = tmp_path_factory.mktemp("quad")
    spec = resolve_spec({}, simulate=True, task="quadratic", workers=3, max_gradients=90, dim=10, seed=1)
    return simulate(spec, run_dir), run_dir


@pytest.fixture(scope="module")
def target_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSummary, Path]:
    """A simulated run with a target accuracy it cannot reach (time and gradients to target are None)."""
    run_dir = tmp_path_factory.mktemp("target")
    spec = resolve_spec(
        {}, simulate=True, task="digits-logreg", workers=2, max_gradients=60, target_accuracy=0.999, seed=2
    )
    return simulate(spec, run_dir), run_dir


# -- (a) a real run's summary.json round-trips byte for byte ----------------------------------------------


@pytest.mark.parametrize("fixture", ["quad_run", "target_run"])
def test_a_simulated_runs_summary_json_round_trips_byte_for_byte(request, fixture):
    summary, run_dir = request.getfixturevalue(fixture)
    text = (run_dir / "summary.json").read_text()
    assert text == _text(summary)  # the file is the returned summary's to_dict()
    back = RunSummary.from_dict(json.loads(text))
    assert _text(back) == text
    assert back.extra == {} and all(w.extra == {} for w in back.per_worker)
    assert back == RunSummary.from_dict(json.loads(_text(back)))


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_real_runs_summary_round_trips_and_reports_failed_workers(tmp_path):
    summary = dasgd.train(task="quadratic", workers=2, max_gradients=40, seed=3, run_dir=str(tmp_path / "r"))
    assert isinstance(summary, dasgd.RunSummary)
    assert summary.failed_workers == {}  # set by the launcher, even when empty: the key is in the file
    text = (tmp_path / "r" / "summary.json").read_text()
    assert list(json.loads(text))[-1] == "failed_workers"
    assert _text(RunSummary.from_dict(json.loads(text))) == text == _text(summary)
    assert summary.simulation is UNSET and "simulation" not in text


# -- (b) no key without a field ----------------------------------------------------------------------------


def test_every_key_of_a_run_with_every_optional_key_is_a_field(target_run):
    summary, _ = target_run
    assert summary.target_accuracy == 0.999 and summary.simulation  # the run set these two itself
    # A simulated run charges nothing for evaluation: no worker has an evaluation entry (real runs' evaluating
    # worker does).
    assert all("evaluation" not in entry for entry in summary.to_dict()["per_worker"])
    workers = [
        dataclasses.replace(w, evaluation={"evaluations": 1, "eval_s": 0.5}) for w in summary.per_worker
    ]
    full = dataclasses.replace(
        summary, failed_workers={"1": -9}, recomputed_after_resume=7, target_loss=0.5, per_worker=workers
    )
    out = full.to_dict()
    assert sorted(out) == sorted(FIELDS)  # every field a key, and no key that is not a field
    assert full.extra == {}
    for entry in out["per_worker"]:
        assert list(entry) == WORKER_FIELDS
    # The keys the report reads are documented on the dataclass too.
    assert set(SUMMARY_KEYS) <= set(FIELDS)


def test_keys_come_in_todays_order(quad_run, target_run):
    summary, _ = quad_run
    keys = list(summary.to_dict())
    assert keys[:12] == FIELDS[:12]  # task ... final_metrics
    assert keys[12] == "gradients_computed" and keys[-1] == "simulation"
    with_target = list(target_run[0].to_dict())
    i = with_target.index("final_metrics")
    assert with_target[i + 1 : i + 4] == ["target_accuracy", "time_to_target_s", "gradients_to_target"]
    # `dasgd simulate --target-loss` appends its three keys at the end, in the order it assigns them.
    by_loss = dataclasses.replace(summary, target_loss=1.0, gradients_to_target=40, time_to_target_s=0.2)
    assert list(by_loss.to_dict())[-4:] == [
        "simulation",
        "target_loss",
        "gradients_to_target",
        "time_to_target_s",
    ]
    # With a target accuracy as well, the two stay where the run put them.
    both = dataclasses.replace(target_run[0], target_loss=1.0)
    assert list(both.to_dict())[i + 1 : i + 4] == with_target[i + 1 : i + 4]
    assert list(both.to_dict())[-1] == "target_loss"


def test_the_simulate_commands_json_ends_with_its_loss_target(tmp_path, capsys):
    from dasgd.cli import main

    args = ["simulate", "--task", "quadratic", "--workers", "2", "--max-gradients", "60", "--dim", "8"]
    args += ["--target-loss", "100", "--json", "--no-progress", "--run-dir", str(tmp_path / "c")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed)[-3:] == ["target_loss", "gradients_to_target", "time_to_target_s"]
    assert printed["target_loss"] == 100.0 and printed["gradients_to_target"] is not None
    # summary.json was written before the target was measured: it has none of the three.
    on_disk = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert not {"target_loss", "gradients_to_target", "time_to_target_s"} & set(on_disk)
    assert {k: v for k, v in printed.items() if k in on_disk} == on_disk


# -- (c) optional keys are absent when unset, None is a value ----------------------------------------------


def test_unset_optional_keys_are_absent_and_none_is_kept(quad_run, target_run):
    summary, run_dir = quad_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    absent = [k for k in OPTIONAL if k != "simulation"]
    assert not set(absent) & set(on_disk)
    assert all(getattr(summary, k) is UNSET for k in absent) and not summary.failed_workers
    back = RunSummary.from_dict(on_disk)
    assert all(getattr(back, k) is UNSET for k in absent)
    assert not set(absent) & set(back.to_dict())
    # A target never reached: the keys are there, with null values (None is not UNSET).
    missed = json.loads((target_run[1] / "summary.json").read_text())
    assert missed["time_to_target_s"] is None and missed["gradients_to_target"] is None
    assert RunSummary.from_dict(missed).time_to_target_s is None


def test_only_optional_fields_may_be_unset_or_missing(quad_run):
    summary, _ = quad_run
    with pytest.raises(SummaryError, match="gradients_lost"):
        dataclasses.replace(summary, gradients_lost=UNSET)
    data = summary.to_dict()
    del data["gradients_lost"], data["per_worker"][0]["sent_bytes"]
    with pytest.raises(SummaryError, match="gradients_lost"):
        RunSummary.from_dict(data)
    data["gradients_lost"] = 0
    with pytest.raises(SummaryError, match="sent_bytes"):
        RunSummary.from_dict(data)
    with pytest.raises(SummaryError, match="fields"):
        dataclasses.replace(summary, extra={"task": "x"})  # extra must not shadow a field


# -- (d) a read-only Mapping ----------------------------------------------------------------------------------


def test_reads_as_a_read_only_mapping_of_the_files_keys(quad_run):
    summary, _ = quad_run
    assert isinstance(summary, Mapping)
    out = summary.to_dict()
    assert list(summary) == list(out) and len(summary) == len(out)
    assert dict(summary) == out and summary.keys() == out.keys()
    assert summary["final_metrics"]["loss"] == summary.final_metrics["loss"]
    assert summary["per_worker"][1]["computed"] == summary.per_worker[1].computed
    assert summary.get("exactly_once") is True and summary["exactly_once"] is True
    assert summary.get("target_accuracy") is None and "target_accuracy" not in summary
    assert "simulation" in summary and "extra" not in summary
    with pytest.raises(KeyError):
        summary["target_accuracy"]
    with pytest.raises(KeyError):
        summary["extra"]
    with pytest.raises(TypeError):
        summary["gradients_lost"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        del summary["task"]  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.gradients_lost = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(summary)
    # `summary | {...}` gives a new dict, as with the dict dasgd.train used to return.
    merged = summary | {"run_dir": "x"}
    assert type(merged) is dict and merged["run_dir"] == "x" and "run_dir" not in summary
    assert ({"task": "y"} | summary)["task"] == summary.task


# -- (e) unknown keys survive -------------------------------------------------------------------------------


def test_unknown_keys_survive_a_round_trip(quad_run):
    summary, _ = quad_run
    data = {"schema": 7, **summary.to_dict(), "from_the_future": {"a": [1, 2]}}
    data["per_worker"] = [{**w, "new_counter": i} for i, w in enumerate(data["per_worker"])]
    back = RunSummary.from_dict(data)
    assert back.extra == {"schema": 7, "from_the_future": {"a": [1, 2]}}
    assert [w.extra for w in back.per_worker] == [{"new_counter": i} for i in range(3)]
    assert back["schema"] == 7 and "from_the_future" in back
    out = back.to_dict()
    assert list(out)[-2:] == ["schema", "from_the_future"]  # written back, after the known keys
    assert {k: out[k] for k in data} == data
    text = json.dumps(out, indent=2, default=plain)
    assert json.dumps(RunSummary.from_dict(json.loads(text)).to_dict(), indent=2) == text
