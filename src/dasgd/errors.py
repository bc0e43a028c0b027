"""The exceptions dasgd raises on purpose, all derived from :class:`DasgdError`.

``except dasgd.DasgdError`` catches every one of them; each also derives from the builtin a caller would
naturally expect, so existing ``except ValueError`` (bad setup or input), ``except RuntimeError`` (the model
changed under the wrapper, a worker process failed), ``except TimeoutError`` (the end-of-run drain) or
``except FloatingPointError`` (divergence) keeps working. Defined here: the wrapper's
(:class:`dasgd.DecentralizedSGD`) and the transport failures it surfaces. Defined beside the code that raises
them and exported from ``dasgd`` as well: ``SpecError`` (a bad spec value or argument, naming it),
``RunFailed`` (a worker process of :func:`dasgd.train` failed), ``StartupTimeout`` (workers did not join in
time), and the input errors of the simulator's models, event logs, topologies, algorithms and wire format.

This module imports nothing from dasgd: any layer may raise these.
"""

from __future__ import annotations

__all__ = [
    "DasgdError",
    "DivergedError",
    "DrainTimeoutError",
    "ModelChangedError",
    "OutsideWriteError",
    "SetupError",
    "SnapshotError",
    "TransportFailedError",
    "UnsupportedModelError",
    "UnsupportedOptimizerError",
    "WrapperStateError",
]


class DasgdError(Exception):
    """Base class of every error dasgd raises on purpose."""


class SetupError(DasgdError, ValueError):
    """The wrapper was given something it cannot run (a bad argument or combination of them)."""


class UnsupportedOptimizerError(SetupError):
    """The optimizer (or one of its settings) is not what the chosen mode runs: faithful mode takes plain,
    single-stepsize SGD only; practical mode (``faithful=False``) takes any optimizer whose ``step()`` needs
    no closure."""


class UnsupportedModelError(SetupError):
    """The model cannot be a replica: no trainable parameters, mixed dtypes or devices, integer or complex
    parameters, or an optimizer over other parameters than the model's trainable ones."""


class ModelChangedError(DasgdError, RuntimeError):
    """The model changed under the wrapper after wrapping: moved or cast (``model.to(...)``), a parameter
    replaced, or a parameter frozen or unfrozen. The replica no longer lives where the wrapper updates it."""


class OutsideWriteError(ModelChangedError):
    """Parameters were written by something other than the wrapper (a second ``optimizer.step()``, a
    ``load_state_dict`` on the model mid-run, an in-place edit): peers never see that change, so the replicas
    would silently stop agreeing."""


class WrapperStateError(DasgdError, RuntimeError):
    """A call that does not fit the wrapper's state (``step()`` after ``finish()``, ``finish()`` twice)."""


class SnapshotError(DasgdError, ValueError):
    """A wrapper snapshot cannot be loaded: mid-run, from another world size or model, or not the same
    snapshot on every rank."""


class DrainTimeoutError(DasgdError, TimeoutError):
    """The end-of-run drain did not complete in time (a peer is stuck or gone)."""


class DivergedError(DasgdError, FloatingPointError):
    """This worker's own update held a NaN or an infinity: the model diverged."""


class TransportFailedError(DasgdError, RuntimeError):
    """A sender or receiver thread of the transport died; its exception is chained as ``__cause__``."""
