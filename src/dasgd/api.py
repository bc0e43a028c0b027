"""The library's entry point for a run on this machine: :func:`train` (re-exported as ``dasgd.train``)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dasgd.experiments.spec import RunSpec, SpecError, resolve_spec

if TYPE_CHECKING:
    from dasgd.runs.summary import RunSummary

__all__ = ["as_arguments", "train"]


def train(
    spec: RunSpec | dict[str, Any] | None = None, *, overwrite: bool = False, **overrides: Any
) -> RunSummary:
    """Train with real worker processes on this machine; return the run summary.

    The summary (:class:`dasgd.RunSummary`) has one typed attribute per key of the run's ``summary.json``
    (``summary.final_metrics``, ``summary.gradients_lost``) and also reads as a read-only mapping with the
    file's keys (``summary["final_metrics"]["test_accuracy"]``); ``summary.to_dict()`` is the file's content.

    ``spec`` is a RunSpec, a dict of spec keys, or None; keyword arguments override it, e.g.
    ``dasgd.train(task="digits-logreg", workers=2, max_gradients=500)``. Raises SpecError for bad values, a
    bad topology or an algorithm that cannot run on it, a missing dataset or an unset secret variable, before
    any worker process starts; its message names the Python argument (``max_gradients``), not the CLI flag.

    As ``dasgd train`` refuses an existing run directory without ``--overwrite``, a ``run_dir`` that already
    holds a run raises SpecError unless ``overwrite=True``, which removes that run's outputs first (only a
    directory with a ``spec.yaml``, ``summary.json`` or ``events.jsonl``; see :mod:`dasgd.runs.rundir`). An
    unwritable ``run_dir`` raises SpecError before any worker starts.
    """
    import datetime
    from collections.abc import Mapping

    from dasgd.runs.build import build_task, resolve, secret_key
    from dasgd.runs.launcher import launch_local
    from dasgd.runs.rundir import prepare_run_dir

    if isinstance(spec, RunSpec):
        values: Any = dataclasses.asdict(spec)
    else:
        values = dict(spec) if isinstance(spec, Mapping) else spec  # anything else: resolve_spec says why
    try:
        resolved = resolve_spec(values, **overrides)
        run_dir = (
            Path(resolved.run_dir)
            if resolved.run_dir
            else (Path("runs") / f"{resolved.task}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}")
        )
        resolved = dataclasses.replace(resolved, run_dir=str(run_dir))
        # Everything the CLI checks before a process starts: the topology and the algorithm's needs, a missing
        # dataset (with its install command), an unset secret variable, then the run directory.
        resolve(resolved)
        build_task(resolved)
        secret_key(resolved)
        prepare_run_dir(run_dir, overwrite=overwrite, flag="run_dir", how="overwrite=True")
    except SpecError as e:
        raise as_arguments(e) from None
    return launch_local(resolved, run_dir)


_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def as_arguments(error: SpecError) -> SpecError:
    """``error`` as a Python caller should read it: each CLI flag named as the keyword argument of
    :func:`train` (or key of its ``spec`` mapping) that sets it, ``--max-gradients`` as ``max_gradients``."""
    names = _argument_names()

    def name(flag: str) -> str:
        return names.get(flag, flag[2:].replace("-", "_"))

    prefix = f"{error.flag}: "
    text = str(error)
    body = text[len(prefix) :] if text.startswith(prefix) else text
    flag = name(error.flag) if error.flag.startswith("--") else error.flag
    converted = SpecError(flag, _FLAG.sub(lambda m: name(m.group(0)), body))
    converted.reason = getattr(error, "reason", body)
    return converted


def _argument_names() -> dict[str, str]:
    """Each flag of a setting, mapped to the spec key a Python caller passes (a simulation setting: the key of
    the ``simulation`` mapping; a ``--no-X`` flag: ``X=False``)."""
    from dasgd.experiments.settings import flag_of
    from dasgd.experiments.simspec import SimSpec

    names: dict[str, str] = {"--overwrite": "overwrite=True", "--spec": "spec"}
    for cls, inner in ((SimSpec, "simulation"), (RunSpec, "")):
        for f in dataclasses.fields(cls):
            flag = flag_of(cls, f.name)
            key = f"{f.name}=False" if flag.startswith("--no-") else f.name
            names[flag] = f"{inner}['{f.name}']" if inner else key
    return names
