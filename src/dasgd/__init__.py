"""dasgd: decentralized asynchronous SGD (Tosi and Theobald, 2023) on PyTorch.

Public API:
- :func:`train`: run a spec with real local worker processes and return its summary.
- :class:`RunSpec`, :func:`resolve_spec`: the typed run spec.
- :class:`DecentralizedSGD`: DASGD inside your own torchrun training loop.
- :func:`compute_staleness`: exact S_avg, S_max, S^_avg, S^_max of recorded gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dasgd.core.ledger import StalenessStats, compute_staleness
from dasgd.experiments.spec import RunSpec, SpecError, resolve_spec

__all__ = [
    "DecentralizedSGD",
    "RunSpec",
    "SpecError",
    "StalenessStats",
    "compute_staleness",
    "resolve_spec",
    "train",
]

__version__ = "0.1.0"


def train(spec: RunSpec | dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Train with real worker processes on this machine; return the run summary (as summary.json).

    ``spec`` is a RunSpec, a dict of spec keys, or None; keyword arguments override it, e.g.
    ``dasgd.train(task="digits-logreg", workers=2, max_gradients=500)``. Raises SpecError for bad values.
    """
    import dataclasses
    import datetime

    from dasgd.runtime.launcher import launch_local

    values = dataclasses.asdict(spec) if isinstance(spec, RunSpec) else dict(spec or {})
    resolved = resolve_spec(values, **overrides)
    run_dir = (
        Path(resolved.run_dir)
        if resolved.run_dir
        else (Path("runs") / f"{resolved.task}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}")
    )
    resolved = dataclasses.replace(resolved, run_dir=str(run_dir))
    return launch_local(resolved, run_dir)


def __getattr__(name: str) -> Any:
    # Imported lazily: the wrapper pulls in torch.distributed, which plain users of the ledger do not need.
    if name == "DecentralizedSGD":
        from dasgd.runtime.wrapper import DecentralizedSGD

        return DecentralizedSGD
    raise AttributeError(f"module 'dasgd' has no attribute {name!r}")
