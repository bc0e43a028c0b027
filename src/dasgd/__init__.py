"""dasgd: decentralized asynchronous SGD (Tosi and Theobald, 2023) on PyTorch.

Public API:
- :func:`train`: run a spec with real local worker processes and return its summary.
- :class:`RunSummary`: that summary, typed (one field per ``summary.json`` key; also a read-only mapping).
- :class:`RunSpec`, :func:`resolve_spec`: the typed run spec.
- :class:`DecentralizedSGD`: DASGD inside your own torchrun training loop.
- :func:`compute_staleness`: exact S_avg, S_max, S^_avg, S^_max of recorded gradients.
"""

from dasgd.api import train
from dasgd.core.ledger import StalenessStats, compute_staleness
from dasgd.experiments.spec import RunSpec, SpecError, resolve_spec
from dasgd.runs.summary import RunSummary

__all__ = [
    "DecentralizedSGD",
    "RunSpec",
    "RunSummary",
    "SpecError",
    "StalenessStats",
    "compute_staleness",
    "resolve_spec",
    "train",
]

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - a class, imported on first use
    # Imported lazily: the wrapper pulls in torch.distributed, which plain users of the ledger do not need.
    if name == "DecentralizedSGD":
        from dasgd.runtime.wrapper import DecentralizedSGD

        return DecentralizedSGD
    raise AttributeError(f"module 'dasgd' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The public names only: not the submodules Python binds as attributes when they are imported.
    return sorted([*__all__, "__version__"])
