"""dasgd: decentralized asynchronous SGD (Tosi and Theobald, 2023) on PyTorch.

Public API:
- :func:`train`: run a spec with real local worker processes and return its summary.
- :class:`RunSummary`: that summary, typed (one field per ``summary.json`` key; also a read-only mapping).
- :class:`RunSpec`, :func:`resolve_spec`: the typed run spec.
- :class:`DecentralizedSGD`: DASGD inside your own torchrun training loop; :class:`FinishReport`: what its
  ``finish()`` returns.
- :func:`compute_staleness`: exact S_avg, S_max, S^_avg, S^_max of recorded gradients.
- Errors: :class:`DasgdError` is the base of every exception dasgd raises on purpose; the others name what
  went wrong (:class:`SpecError` for a bad setting, names the argument or flag; the wrapper's guards;
  :class:`RunFailed` when a worker process of :func:`train` failed). More in :mod:`dasgd.errors`.
"""

from dasgd.api import train
from dasgd.core.ledger import StalenessStats, compute_staleness
from dasgd.errors import (
    DasgdError,
    DivergedError,
    DrainTimeoutError,
    ModelChangedError,
    OutsideWriteError,
    SetupError,
    SnapshotError,
    TransportFailedError,
    UnsupportedModelError,
    UnsupportedOptimizerError,
    WrapperStateError,
)
from dasgd.experiments.spec import RunSpec, SpecError, resolve_spec
from dasgd.runs.launcher import RunFailed
from dasgd.runs.summary import RunSummary
from dasgd.runtime.session import StartupTimeout
from dasgd.runtime.wrapper import DecentralizedSGD, FinishReport

__all__ = [
    "DasgdError",
    "DecentralizedSGD",
    "DivergedError",
    "DrainTimeoutError",
    "FinishReport",
    "ModelChangedError",
    "OutsideWriteError",
    "RunFailed",
    "RunSpec",
    "RunSummary",
    "SetupError",
    "SnapshotError",
    "SpecError",
    "StalenessStats",
    "StartupTimeout",
    "TransportFailedError",
    "UnsupportedModelError",
    "UnsupportedOptimizerError",
    "WrapperStateError",
    "compute_staleness",
    "resolve_spec",
    "train",
]

__version__ = "0.1.0"


def __dir__() -> list[str]:
    # The public names only: not the submodules Python binds as attributes when they are imported.
    return sorted([*__all__, "__version__"])
