"""Output directories: checked and created before anything runs, never mixed with an earlier run's files.

A run writes into its run directory (``--run-dir``; ``dasgd.train(run_dir=...)``). An existing non-empty one is
refused unless the caller says ``overwrite`` (``--overwrite``; ``overwrite=True``): a second run into it would
otherwise leave a mixture, for example the old ``plots/accuracy.png`` beside the new report. With
``overwrite`` the earlier run's outputs are removed first, and only those: a directory that does not look like
a dasgd run directory (none of :data:`RUN_MARKERS`) is refused even then, and files dasgd did not write are left
alone. A comparison or a sweep directory (:data:`COMPARE`, :data:`SWEEP`) is resumed instead: rerunning with the
same directory reuses its finished runs, and ``overwrite`` starts it afresh.

Every problem is a :class:`~dasgd.experiments.spec.SpecError` naming the flag (exit code 2 in the CLI),
including a directory that cannot be created or written (a path under a regular file, no permission).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dasgd.experiments.spec import SpecError

__all__ = ["COMPARE", "RUN", "RUN_MARKERS", "SWEEP", "DirKind", "prepare_run_dir"]

RUN_MARKERS = ("spec.yaml", "summary.json", "events.jsonl")
"""Files that make a directory a dasgd run directory (one of them is enough)."""


@dataclass(frozen=True)
class DirKind:
    """What kind of output directory a command writes, and which of its entries are dasgd's."""

    what: str
    """How the messages call it."""
    markers: tuple[str, ...]
    """Entries of which one marks a directory of this kind."""
    outputs: tuple[str, ...]
    """Entries a run of this kind writes (removed by ``overwrite``)."""
    resumable: bool = False
    """An existing directory of this kind is resumed rather than refused."""


RUN = DirKind(
    "run directory",
    RUN_MARKERS,
    (
        *RUN_MARKERS,
        "metrics.csv",
        "report.md",
        "theory.md",
        "plots",
        "logs",
        "progress",
        "shards",
        "audit",
        "tensorboard",
    ),
)
COMPARE = DirKind(
    "comparison directory",
    ("compare.yaml",),
    ("compare.yaml", "compare.csv", "compare_runs.csv", "compare.md", "report.md", "plots"),
    resumable=True,
)
SWEEP = DirKind(
    "sweep directory",
    ("sweep.yaml",),
    ("sweep.yaml", "sweep.csv", "sweep.md", "plots", "points"),
    resumable=True,
)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _looks_like_runs(entry: Path, depth: int = 2) -> bool:
    """Whether ``entry`` is a run directory, or a folder of them (a comparison's ``ALGORITHM/seed-S/``)."""
    if not entry.is_dir() or entry.is_symlink():
        return False
    children = list(entry.iterdir())
    if any(c.name in RUN_MARKERS for c in children):
        return True
    return depth > 1 and bool(children) and all(_looks_like_runs(c, depth - 1) for c in children)


def prepare_run_dir(
    path: str | Path,
    *,
    overwrite: bool = False,
    kind: DirKind = RUN,
    flag: str = "--run-dir",
    how: str = "--overwrite",
) -> Path:
    """Check ``path`` as the output directory of a new run of ``kind``, clear it if asked, and create it.

    Args:
        path: the directory.
        overwrite: remove an earlier run's outputs from it (only a directory of this ``kind``).
        kind: :data:`RUN`, :data:`COMPARE` or :data:`SWEEP`.
        flag: the flag (or argument) the messages name.
        how: how the caller allows overwriting, for the messages (``--overwrite``, ``overwrite=True``).

    Returns:
        the directory, created and known to be writable.

    Raises:
        SpecError: it exists and is not a directory; it is not empty and is not a directory of ``kind``; it is
            an earlier run and ``overwrite`` was not given (a run directory); or it cannot be created, read,
            cleared or written.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise SpecError(flag, f"{str(path)!r} exists and is not a directory; give a directory")
        entries = list(path.iterdir()) if path.is_dir() else []
        if entries:
            names = {e.name for e in entries}
            if not names & set(kind.markers):
                raise SpecError(
                    flag,
                    f"{str(path)!r} is not empty and is not a dasgd {kind.what} (it has no "
                    f"{' or '.join(kind.markers)}); give a new or an empty directory",
                )
            if overwrite:
                for entry in entries:
                    if entry.name in kind.outputs or (kind is COMPARE and _looks_like_runs(entry)):
                        _remove(entry)
            elif not kind.resumable:
                raise SpecError(
                    flag,
                    f"{str(path)!r} already holds a run; give {how} to replace its outputs, "
                    "or choose a new directory",
                )
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".dasgd-write-check-"):
            pass
    except OSError as exc:
        raise SpecError(
            flag,
            f"cannot use {str(path)!r} as the {kind.what}: {_reason(exc)}; give a directory you can write",
        ) from None
    return path
