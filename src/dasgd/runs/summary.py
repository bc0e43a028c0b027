"""The run summary: :class:`RunSummary`, one typed field per ``summary.json`` key.

This module is the one place the summary's keys are documented: every key of ``RUN_DIR/summary.json`` is a
field of :class:`RunSummary` (the entries of ``per_worker`` are :class:`WorkerSummary`), in file order,
with its meaning in the field's docstring. :func:`dasgd.runs.results.summarize` builds one,
:meth:`RunSummary.to_dict` is what ``summary.json`` holds, and :meth:`RunSummary.from_dict` reads one back.

Optional keys. A few keys are in a summary only in some runs (``target_accuracy`` with its two
``*_to_target`` keys when the spec sets a target, ``failed_workers`` from the local launcher,
``simulation`` from the simulator, ``target_loss`` from ``dasgd simulate --target-loss``). Their fields are
declared with :func:`optional_field`: the default is the sentinel :data:`UNSET` and the field's metadata
says ``optional``. A field holding :data:`UNSET` is left out of :meth:`~RunSummary.to_dict` (so absent from
the file, not ``null``), and a key missing from a file reads back as :data:`UNSET`. ``None`` is a value
(``time_to_target_s`` is None when the target was never reached), never "absent". :data:`UNSET` is falsy,
so ``summary.simulation or {}`` reads an optional mapping.

Unknown keys. :meth:`RunSummary.from_dict` keeps keys it has no field for (an older or newer file) in
``extra``, in their order, and :meth:`~RunSummary.to_dict` writes them back after the known keys: reading
and rewriting a file loses nothing. The same holds for each ``per_worker`` entry.

Mapping access. A :class:`RunSummary` is a read-only :class:`collections.abc.Mapping` over the keys of
:meth:`~RunSummary.to_dict` (``summary["final_metrics"]["test_accuracy"]``, ``summary.get("exactly_once")``,
``"simulation" in summary``), so scripts written against the dict that ``dasgd.train`` used to return keep
working. Values read that way are the JSON form: ``summary["per_worker"]`` is a list of dicts. Code in this
package reads the typed attributes instead.

This module imports only the standard library: ``import dasgd`` loads it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

__all__ = ["UNSET", "RunSummary", "SummaryError", "Unset", "WorkerSummary", "optional_field"]


class _Unset(enum.Enum):
    """The type of :data:`UNSET` (an enum, so that type checkers narrow ``x is UNSET``)."""

    UNSET = "UNSET"

    def __bool__(self) -> Literal[False]:
        return False

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset.UNSET
"""An optional summary field that was never set: its key is absent from the summary (unlike ``None``)."""

Unset = Literal[_Unset.UNSET]
"""The type of :data:`UNSET`, for annotations: ``float | None | Unset``."""

_OPTIONAL = "optional"
"""Field-metadata flag of the keys a summary may lack."""


def optional_field() -> Any:
    """A summary field whose key may be absent: default :data:`UNSET`, flagged ``optional`` in its metadata."""
    return field(default=UNSET, metadata={_OPTIONAL: True})


class SummaryError(ValueError):
    """A mapping cannot be read as a run summary (a required key is missing, or a value has the wrong shape)."""


def _key_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields that are summary keys (all but ``extra``), in declaration (= file) order."""
    return tuple(f for f in dataclasses.fields(cls) if f.name != "extra")


def _check(obj: Any, names: frozenset[str]) -> None:
    """Raise SummaryError if ``obj.extra`` shadows a field or a required field holds :data:`UNSET`."""
    name = type(obj).__name__
    clash = sorted(k for k in obj.extra if k in names)
    if clash:
        raise SummaryError(f"{name}.extra holds {', '.join(clash)}, which are fields: set the fields instead")
    unset = [
        f.name
        for f in _key_fields(type(obj))
        if getattr(obj, f.name) is UNSET and not f.metadata.get(_OPTIONAL)
    ]
    if unset:
        raise SummaryError(f"{name}: {', '.join(unset)} cannot be UNSET (only optional fields can)")


def _split(
    cls: type, data: Mapping[str, Any], names: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` as (known keys, unknown keys); raises SummaryError naming every required key it lacks."""
    if not isinstance(data, Mapping):
        raise SummaryError(f"a {cls.__name__} is read from a JSON object, got {type(data).__name__}")
    missing = [f.name for f in _key_fields(cls) if not f.metadata.get(_OPTIONAL) and f.name not in data]
    if missing:
        raise SummaryError(
            f"not a {cls.__name__}: missing {', '.join(missing)} (a summary.json from another version of "
            "dasgd? read it as a plain dict, or rerun the run)"
        )
    known = {k: v for k, v in data.items() if k in names}
    return known, {k: v for k, v in data.items() if k not in names}


@dataclass(frozen=True, kw_only=True)
class WorkerSummary:
    """One live worker's entry of ``per_worker`` (a worker that died has none)."""

    rank: int
    """The worker's rank."""
    computed: int
    """Gradients this worker computed."""
    applied: int
    """Gradients its replica holds at the end (the sum of its final vector clock)."""
    rejected: dict[str, int]
    """Messages refused on arrival, by reason (its transport's and its worker's counts added)."""
    sent_messages: int
    """Messages it sent."""
    sent_bytes: int
    """Bytes it sent."""
    coalesced: int
    """Gradient messages its transport merged into a queued one instead of sending them alone."""
    undelivered: int
    """Messages its transport could not deliver because their peer was dead."""
    slowdown: float
    """Its straggler factor from the spec (1.0 for a worker at full speed)."""
    drained: bool
    """Whether it finished the end-of-run drain (applied every gradient it was owed)."""
    gradient_set: str
    """Digest of its final vector clock (the same as its entry of ``gradient_set_digests``)."""
    param_checksum: str
    """Checksum of its final parameters (16 hex digits; ``""`` if the shard did not record one)."""
    compute_s_per_gradient: float
    """Mean compute time of its gradients, in seconds of the run's ``time_unit`` (0.0 without any)."""
    unreachable: list[int] | Unset = optional_field()
    """Live workers it could no longer reach at the end: dead workers cut the topology between them (their
    gradients after the cut never reached it). Absent in summaries written before this key existed."""
    non_finite_from: dict[str, int] | Unset = optional_field()
    """Messages refused because they carried a NaN or an infinity, by origin rank: a peer whose replica
    diverged, or a faulty one. Absent in summaries written before this key existed."""
    evaluation: dict[str, float] | Unset = optional_field()
    """What evaluating cost this worker, when it evaluated during a real run (absent otherwise: the other
    workers, simulated runs, summaries written before this key existed): ``background`` (True: snapshots of
    its replica evaluated on a background thread; False: on its training thread, all of ``eval_s`` lost to
    training), ``evaluations`` (count, the final one after the drain left out), ``eval_s`` (wall seconds they
    ran), ``eval_cpu_s`` (CPU seconds of the evaluation thread, taken from the cores training
    shares), ``eval_cpu_share`` (``eval_cpu_s`` / the training time), ``eval_pause_s`` (seconds its training
    thread stopped for evaluation while training: taking snapshots, or all of ``eval_s`` on the training
    thread) and ``eval_wait_s`` (seconds it waited after its drain for the evaluation still in flight)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (read from another version's file); written back after the others."""

    _NAMES: ClassVar[frozenset[str]]

    def __post_init__(self) -> None:
        _check(self, self._NAMES)

    def to_dict(self) -> dict[str, Any]:
        """The entry as ``summary.json`` holds it: the fields in order (those not :data:`UNSET`), then
        ``extra``."""
        out = {
            f.name: getattr(self, f.name)
            for f in _key_fields(type(self))
            if getattr(self, f.name) is not UNSET
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerSummary:
        """Read an entry of ``per_worker``; unknown keys go to ``extra``.

        Raises:
            SummaryError: ``data`` is not a mapping or lacks a key.
        """
        known, extra = _split(cls, data, cls._NAMES)
        return cls(**known, extra=extra)


WorkerSummary._NAMES = frozenset(f.name for f in _key_fields(WorkerSummary))


@dataclass(frozen=True, kw_only=True)
class RunSummary(Mapping[str, Any]):
    """What a finished run reports: ``RUN_DIR/summary.json``, and what ``dasgd.train`` returns.

    One field per key, declared in the order of the file. Fields declared with :func:`optional_field` may
    hold :data:`UNSET` and are then absent from :meth:`to_dict` (see the module docstring). Times are in
    seconds of ``time_unit``. The summary is frozen: derive a changed one with :func:`dataclasses.replace`.
    As a :class:`~collections.abc.Mapping` it reads like the dict of :meth:`to_dict`: no item can be set or
    deleted, but the containers it hands out (``summary["final_metrics"]``) are the summary's own, as
    :meth:`to_dict`'s are.
    """

    task: str
    """Workload name (``quadratic``, ``digits-logreg``, ...)."""
    algorithm: str
    """Algorithm name (``dasgd``, ``sync``, ...)."""
    workers: int
    """Number of workers the run started (dead ones included)."""
    topology: str
    """Topology name, as the spec gives it."""
    stop_reason: str
    """Why training stopped: the live workers' stop reasons, sorted and joined by commas, leaving out
    ``stop_requested`` (a peer's STOP); ``stop_requested`` when that is the only one."""
    time_unit: str
    """``"wall"`` (real runs) or ``"virtual"`` (the simulator): what every time and rate is measured in."""
    lr: float
    """The stepsize eta the workers used (the spec's, or the task's default)."""
    batch_size: int
    """Mini-batch size of one gradient."""
    wall_time_s: float
    """Training phase: the latest live worker's end of training (from the run's time origin), drain excluded."""
    drain_time_s: float
    """How long the end-of-run drain went on after ``wall_time_s`` (the latest drain end minus it)."""
    samples_per_s: float
    """Training samples per second, all workers together: ``gradients_computed * batch_size / wall_time_s``
    (0.0 when ``wall_time_s`` is 0)."""
    final_metrics: dict[str, Any]
    """The end-of-run evaluation (of the first live worker that has one): metric -> number, e.g.
    ``test_accuracy`` and ``test_loss`` (``loss`` for the quadratic); ``{}`` when there is none."""
    target_accuracy: float | Unset = optional_field()
    """Optional: the spec's target accuracy. Present, with ``time_to_target_s`` and ``gradients_to_target``
    right after it, exactly when the spec sets one."""
    time_to_target_s: float | None | Unset = optional_field()
    """Optional: time of the first evaluation (not the end-of-run one) that reached the target, None if none
    did. Present with ``target_accuracy``, or (after ``target_loss``) in the summary ``dasgd simulate
    --target-loss`` prints."""
    gradients_to_target: int | None | Unset = optional_field()
    """Optional: gradients the evaluated replica held at that evaluation, None if none reached the target.
    Present exactly when ``time_to_target_s`` is."""
    gradients_computed: int
    """T: gradients computed by all workers (a dead worker's count is the most any survivor holds of it)."""
    gradients_applied: list[int]
    """Per live worker, in rank order: gradients its replica holds at the end."""
    gradients_lost: int
    """Gradients computed but missing from some live replica that must hold every gradient (0 expected). A
    dead worker's gradients that some survivors hold and others do not count here; those no survivor got
    are not counted (nobody knows of them)."""
    gradients_duplicated: int
    """Vector-clock entries above the computed counts, summed over the replicas that must hold every gradient
    (0 expected)."""
    exactly_once: bool | None
    """Whether every replica that must hold every gradient holds each exactly once; None when no replica
    must (``replicas`` is ``"none"``) or none of those survived."""
    dead_workers: list[int]
    """Ranks that left no result (their process died or, simulated, crashed), ascending."""
    dead_gradients_held: dict[str, dict[str, int]] | Unset = optional_field()
    """For each dead worker, how many of its gradients each survivor holds (dead rank -> survivor rank ->
    count). They differ when its last messages reached some survivors and not others: it died with them in
    flight, or with only some links' queues sent. Those unequally held gradients are ``gradients_lost``, and
    they are why survivors' replicas can disagree after a death (see docs/failures.md)."""
    cut_apart: list[list[int]] | Unset = optional_field()
    """When deaths cut the topology apart: the live workers in groups that could still reach each other
    ([] when every survivor could reach every other)."""
    drained: bool
    """Whether every live worker finished its end-of-run drain."""
    staleness: dict[str, Any]
    """:meth:`dasgd.core.ledger.StalenessStats.to_dict` of the run's gradients: ``count``, ``s_avg``,
    ``s_max``, ``loose_avg``, ``loose_max``, ``anomalies``, ``histogram`` (``counts``, ``edges``)."""
    replicas: str
    """The algorithm's replica contract (``Algorithm.replicas``): ``"all"`` (every replica holds every
    gradient and equal parameters), ``"ids"`` (every gradient, weighted differently), ``"server"`` (only
    rank 0), ``"none"`` (models are averaged)."""
    replicas_agree: bool | None
    """For the contract ``"all"``: every gradient held exactly once and ``max_replica_diff`` within
    ``replica_tolerance``. None for the other contracts (agreement is not expected)."""
    algorithm_counts: dict[str, int]
    """The algorithm's own counters summed over the live workers (e.g. ``capped``, ``dropped``)."""
    max_replica_diff: float
    """Largest absolute parameter difference between the lowest live rank's replica and any other."""
    replica_tolerance: float
    """The largest ``max_replica_diff`` still counted as agreement, in parameter units."""
    gradient_set_digests: list[str]
    """Per live worker: a digest (16 hex digits) of its final vector clock; equal digests, equal sets."""
    per_worker: list[WorkerSummary]
    """One entry per live worker, in rank order."""
    task_info: dict[str, Any]
    """The task's description of itself (dataset, model, sizes)."""
    faithful: bool
    """Whether the run is inside the paper's theory: a faithful algorithm on shared (homogeneous) data."""
    notes: dict[str, Any]
    """The spec's free-form notes, copied."""
    failed_workers: dict[str, int] | Unset = optional_field()
    """Optional, from the local launcher (``dasgd train``, :func:`dasgd.train`): rank (as a string) -> exit
    code of each worker process that failed, ``{}`` when none did. Absent from simulated and torchrun runs."""
    recomputed_after_resume: int | Unset = optional_field()
    """Optional, from the local launcher, only for a run continued with ``dasgd train --resume``: the gradients
    computed after the checkpoint it resumed from (over every resume), discarded and computed again. They are
    not in the run's counts or log: those cover the run as it continued from the cut."""
    simulation: dict[str, Any] | Unset = optional_field()
    """Optional, from the simulator only: its settings (``SimSpec.to_dict()``) and facts: ``events``,
    ``virtual_end_s``, ``crashed_workers``, ``messages_lost``, ``gradients_lost_in_network``,
    ``retransmissions``, ``stragglers``, ``wall_time_s`` (real seconds), ``peak_memory_mb``."""
    target_loss: float | Unset = optional_field()
    """Optional: the ``--target-loss`` of ``dasgd simulate``, in the summary it prints with ``--json`` (not in
    ``summary.json``: the command measures it after the run directory is written). Then, unless
    ``target_accuracy`` is also set, ``gradients_to_target`` and ``time_to_target_s`` follow it, in that
    order, as that command always printed them."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Not a key: the keys this version does not know (read from another version's file), written back after
    the known ones."""

    __hash__ = None  # type: ignore[assignment]  # a mutable mapping's contents: unhashable, as a dict is

    _NAMES: ClassVar[frozenset[str]]
    _ORDER: ClassVar[tuple[str, ...]]
    _TO_TARGET: ClassVar[tuple[str, ...]] = ("gradients_to_target", "time_to_target_s")

    def __post_init__(self) -> None:
        _check(self, self._NAMES)

    # -- the keys, in file order ---------------------------------------------------------------------------

    def _known_keys(self) -> list[str]:
        """The fields :meth:`to_dict` writes, in order: those not :data:`UNSET`, in declaration order."""
        keys = [n for n in self._ORDER if getattr(self, n) is not UNSET]
        if self.target_accuracy is UNSET and self.target_loss is not UNSET:
            # `dasgd simulate --target-loss` assigned these after the run's keys; its printed summary keeps
            # that order (target_loss, then these two) so its --json output is what it always was.
            moved = [k for k in self._TO_TARGET if k in keys]
            keys = [k for k in keys if k not in moved] + moved
        return keys

    def _value(self, key: str) -> Any:
        """The JSON form of one known key's value (only ``per_worker`` differs from the attribute)."""
        if key == "per_worker":
            return [w.to_dict() for w in self.per_worker]
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The content of ``summary.json``: each set field in declaration order, then ``extra``.

        Values are as the run produced them (they may be numpy scalars): serialise with a ``default`` that
        converts those (:func:`dasgd.runs.results.write_run_outputs` does). The containers are the
        summary's own, not copies.
        """
        out = {k: self._value(k) for k in self._known_keys()}
        out.update(self.extra)  # no clash: __post_init__ keeps field names out of extra
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """Read a summary (``json.loads`` of a ``summary.json``). For a file dasgd wrote, :meth:`to_dict` of
        the result has the same keys in the same order, with the same values: dumped the same way, the same
        text (a hand-edited file's keys come back in the declared order, unknown ones last).

        A missing optional key reads as :data:`UNSET`; keys without a field go to ``extra`` (and so do each
        ``per_worker`` entry's). Values are taken as they are, not converted or validated.

        Raises:
            SummaryError: a required key is missing (a file from an older version: read it as a dict), or
                ``per_worker`` is not a list of objects.
        """
        known, extra = _split(cls, data, cls._NAMES)
        per_worker = known["per_worker"]
        if not isinstance(per_worker, list):
            raise SummaryError(f"per_worker must be a list, got {type(per_worker).__name__}")
        known["per_worker"] = [WorkerSummary.from_dict(w) for w in per_worker]
        return cls(**known, extra=extra)

    # -- read-only Mapping over to_dict()'s keys ------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        # Per key, not through to_dict(): at 10,000 workers a whole to_dict() per lookup would be wasteful.
        if key in self._NAMES and getattr(self, key) is not UNSET:
            return self._value(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from self._known_keys()
        yield from self.extra

    def __len__(self) -> int:
        return len(self._known_keys()) + len(self.extra)

    def __contains__(self, key: object) -> bool:
        # Mapping's default would build the value (per_worker's dicts) only to test for the key.
        return key in self.extra or (key in self._NAMES and getattr(self, str(key)) is not UNSET)

    def __or__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        """``summary | {...}``: a new plain dict, as ``dict | dict`` gives (the summary is unchanged)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self.to_dict(), **other}

    def __ror__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self.to_dict()}


RunSummary._NAMES = frozenset(f.name for f in _key_fields(RunSummary))
RunSummary._ORDER = tuple(f.name for f in _key_fields(RunSummary))
