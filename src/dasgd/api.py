"""The library's entry point for a run on this machine: :func:`train` (re-exported as ``dasgd.train``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dasgd.experiments.spec import RunSpec, resolve_spec

if TYPE_CHECKING:
    from dasgd.runs.summary import RunSummary

__all__ = ["train"]


def train(
    spec: RunSpec | dict[str, Any] | None = None, *, overwrite: bool = False, **overrides: Any
) -> RunSummary:
    """Train with real worker processes on this machine; return the run summary.

    The summary (:class:`dasgd.RunSummary`) has one typed attribute per key of the run's ``summary.json``
    (``summary.final_metrics``, ``summary.gradients_lost``) and also reads as a read-only mapping with the
    file's keys (``summary["final_metrics"]["test_accuracy"]``); ``summary.to_dict()`` is the file's content.

    ``spec`` is a RunSpec, a dict of spec keys, or None; keyword arguments override it, e.g.
    ``dasgd.train(task="digits-logreg", workers=2, max_gradients=500)``. Raises SpecError for bad values.

    As ``dasgd train`` refuses an existing run directory without ``--overwrite``, a ``run_dir`` that already
    holds a run raises SpecError unless ``overwrite=True``, which removes that run's outputs first (only a
    directory with a ``spec.yaml``, ``summary.json`` or ``events.jsonl``; see :mod:`dasgd.runs.rundir`). An
    unwritable ``run_dir`` raises SpecError before any worker starts.
    """
    import dataclasses
    import datetime
    from collections.abc import Mapping

    from dasgd.runs.build import secret_key
    from dasgd.runs.launcher import launch_local
    from dasgd.runs.rundir import prepare_run_dir

    if isinstance(spec, RunSpec):
        values: Any = dataclasses.asdict(spec)
    else:
        values = dict(spec) if isinstance(spec, Mapping) else spec  # anything else: resolve_spec says why
    resolved = resolve_spec(values, **overrides)
    run_dir = (
        Path(resolved.run_dir)
        if resolved.run_dir
        else (Path("runs") / f"{resolved.task}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}")
    )
    resolved = dataclasses.replace(resolved, run_dir=str(run_dir))
    secret_key(resolved)  # an unset secret variable is reported before the run directory is touched
    prepare_run_dir(run_dir, overwrite=overwrite, flag="run_dir", how="overwrite=True")
    return launch_local(resolved, run_dir)
